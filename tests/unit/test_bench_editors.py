"""The editor benchmark on a tiny random model: step sizes, the z-opt / solve split, exact restoration."""
from __future__ import annotations

import torch

from benchmarks.bench_editors import run_bench

TINY_MEMIT = {"layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2}


def test_bench_rows_per_batch_size_and_model_restored(tiny_llama, tmp_path):
    lm = tiny_llama
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    df = run_bench(["memit"], n_edits=2, batch_sizes=[1, 3], data="builtin", lm=lm, use_preset=False,
                   overrides={"memit": TINY_MEMIT}, cache_dir=str(tmp_path))
    # bs=1 edits n_edits requests; a batch larger than n_edits is timed as one step of that many
    assert list(df["batch_size"]) == [1, 3] and list(df["n_edits"]) == [2, 3]
    assert set(df["overrides"]) == {"layers=(1, 2),mom2_n_tokens=2000,v_num_grad_steps=2"}
    steps = df.attrs["per_step"]
    assert list(steps.groupby("batch_size")["step"].max()) == [2, 1]
    # the locate-then-edit split is reported and is part of the edit time
    for _, row in df.iterrows():
        assert 0 < row["median_z_s"] <= row["max_s"] and row["median_solve_s"] > 0
    # statistics were computed into the given (empty) cache, outside the per-edit time
    assert any(tmp_path.rglob("*")) and (df["setup_s"] > 0).all()
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_bench_reports_no_split_for_methods_without_targets(tiny_llama):
    df = run_bench(["ft"], n_edits=2, batch_sizes=[1], data="builtin", lm=tiny_llama, use_preset=False,
                   overrides={"ft": {"layers": (1,), "num_steps": 2}})
    assert df["median_z_s"].isna().all() and df["n_edits"].tolist() == [2]


def test_cli_refuses_bad_arguments_before_loading_the_model(capsys, monkeypatch):
    """A mistyped method or batch size is a one-line usage error (exit 2), before any model is loaded."""
    import pytest

    import benchmarks.bench_editors as bench

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a command that cannot run")
    monkeypatch.setattr(bench, "run_bench", no_load)
    for argv, needle in ((["--methods", "rome,memitt"], "unknown method 'memitt'"),
                         (["--batch-sizes", "1,ten"], "--batch-sizes expects comma-separated integers"),
                         (["--batch-sizes", "0"], "must be >= 1"),
                         (["--methods", "adaedit", "--set", "adaedit.rr=100"], "unknown config field 'rr'"),
                         (["--methods", "adaedit", "--set", "adaedit.r=many"], "config field 'r' of adaedit"),
                         (["--methods", "rome", "--set", "adaedit.r=100"], "for a method of --methods")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
