"""Resume snapshots (app/snapshots.py, ``resume_run``): a run stopped part-way and resumed from its newest snapshot
records the same rows as the same run made without a stop — for EVERY shipped method (an editor whose sequential
state is not in its ``state_dict``, or that draws from an unsaved random generator, fails here) — and the store
keeps exactly one copy of every row."""
from __future__ import annotations

import os
import random

import numpy as np
import pandas as pd
import pytest
import torch

from app import snapshots as snaps
from app.engine import ResumeError, resume_run, run_sequential
from app.runconfig import RunConfig
from app.store import RunStore
from editors.registry import method_info, methods_in_order, register
from tests.engine_doubles import ShiftEditor

SHIPPED = [m for m in methods_in_order() if method_info(m).module.startswith("editors.")]
#: metric rows that measure time or memory (differ between any two runs)
_CLOCK = ("second", "time", "peak_mem", "mem_mb")
_EXTRA = {  # methods whose tiny overrides need more to run without a trained network
    "mend": {"allow_untrained": True}, "malmen": {"allow_untrained": True}, "agrade": {"allow_untrained": True},
}


def _cfg(tmp_path, method: str, **kw) -> RunConfig:
    extra: dict = {}
    if method in _VARIANTS:
        method, extra = _VARIANTS[method]
    over = {**dict(method_info(method).tiny), **_EXTRA.get(method, {}), **extra}
    base = dict(method=method, method_overrides=over, n_edits=4, batch_size=1, eval_every=2, runs_dir=str(tmp_path),
                general="none", device="cpu", update_angles=True, use_preset=False)
    base.update(kw)
    return RunConfig(**base)


def _rows(store: RunStore, run_id: str) -> pd.DataFrame:
    df = store.metrics_frame([run_id])
    df = df[(df["kind"] != "timing") & (df["kind"] != "resume")]
    df = df[~df["metric"].str.contains("|".join(_CLOCK))]
    return df.sort_values(["n_edits", "kind", "metric", "protocol", "case_id", "param", "layer"],
                          na_position="first").reset_index(drop=True)


class _StopBefore:
    """``should_cancel`` that stops the run before its step ``k`` (steps 1..k-1 are made)."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.k


def _same(a: pd.DataFrame, b: pd.DataFrame, what: str) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} rows uninterrupted vs {len(b)} resumed"
    for col in ("n_edits", "kind", "metric", "protocol", "case_id", "param"):
        assert list(a[col].astype(str)) == list(b[col].astype(str)), f"{what}: column {col} differs"
    va, vb = a["value"].to_numpy(float), b["value"].to_numpy(float)
    bad = ~np.isclose(va, vb, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert not bad.any(), f"{what}: {a[bad][['n_edits', 'kind', 'metric']].head(3).to_dict('records')} " \
                          f"{va[bad][:3]} vs {vb[bad][:3]}"


#: config paths with sequential state of their own beyond the tiny defaults
_VARIANTS = {"memit:sequential": ("memit", {"sequential": True}),
             "prune:memit-seq": ("prune", {"base_overrides": {**dict(method_info("memit").tiny), "sequential": True}})}


@pytest.mark.parametrize("method", SHIPPED + sorted(_VARIANTS))
def test_a_resumed_run_records_what_an_uninterrupted_one_does(tmp_path, tiny_llama, standins, method):
    before = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    store = RunStore(tmp_path)
    a = run_sequential(_cfg(tmp_path, method), store, lm=tiny_llama)
    assert store.get_run(a)["status"] == "finished", store.get_run(a)["error"]
    assert snaps.list_snapshots(str(tmp_path), a) == []  # a finished run keeps no snapshot
    # the same run stopped before step 4: steps 1-3 recorded, the snapshot is the checkpoint's at step 2
    b = run_sequential(_cfg(tmp_path, method), store, lm=tiny_llama, should_cancel=_StopBefore(4))
    run = store.get_run(b)
    assert run["status"] == "cancelled" and run["n_edits_done"] == 3
    assert [s for s, _ in snaps.list_snapshots(str(tmp_path), b)] == [2]
    resume_run(store, b, lm=tiny_llama)
    run = store.get_run(b)
    assert run["status"] == "finished", run["error"]
    assert run["n_edits_done"] == 4
    assert list(store.edits_frame(b)["idx"]) == [0, 1, 2, 3]  # step 3 dropped and made again, once
    _same(_rows(store, a), _rows(store, b), method)
    arts_a, arts_b = store.list_artifacts(a), store.list_artifacts(b)
    assert sorted(zip(arts_a["name"], arts_a["n_edits"])) == sorted(zip(arts_b["name"], arts_b["n_edits"]))
    if "editor_state" in set(arts_a["name"]):
        sa, sb = store.get_artifact(a, "editor_state", 4), store.get_artifact(b, "editor_state", 4)
        assert set(sa) == set(sb)
        for k in sa:
            if sa[k].dtype.kind in "fc":
                np.testing.assert_allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6, err_msg=k)
            else:
                assert np.array_equal(sa[k], sb[k]), k
    resumed = store.metrics_frame([b], kinds=["resume"])
    assert list(resumed["value"]) == [2.0]
    after = dict(tiny_llama.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # the model given is restored


class _GlobalRNGEditor(ShiftEditor):
    """unit-shift whose shift is drawn from the GLOBAL generators of torch, numpy and random (as dropout or a data
    shuffle inside an editor would): a resume reproduces it only if the snapshot restores all three states."""

    name = "unit-global-rng"

    def edit(self, requests):
        name = self.spec.mlp_out_weight(self.config.layer)
        W = self.spec.to_canonical(dict(self.model.named_parameters())[name])
        scale = self.config.scale * (1.0 + np.random.rand()) * (1.0 + random.random())
        delta = scale * torch.randn(W.shape[0], 1) @ torch.randn(1, W.shape[1])
        return self._result(deltas={name: self.spec.to_param_layout(delta).contiguous()}, info={})


register(_GlobalRNGEditor)


def test_a_resume_restores_the_global_random_generators(tmp_path, tiny_llama, standins):
    store = RunStore(tmp_path)
    kw = dict(method="unit-global-rng", method_overrides={}, n_edits=4, batch_size=1, eval_every=2,
              runs_dir=str(tmp_path), general="none", device="cpu", update_angles=False)
    a = run_sequential(RunConfig(**kw), store, lm=tiny_llama)
    b = run_sequential(RunConfig(**kw), store, lm=tiny_llama, should_cancel=_StopBefore(4))
    resume_run(store, b, lm=tiny_llama)
    assert store.get_run(b)["status"] == "finished"
    _same(_rows(store, a), _rows(store, b), "global RNG")


def test_snapshot_every_k_steps_keeps_the_newest_two(tmp_path, tiny_llama, standins):
    store = RunStore(tmp_path)
    cfg = _cfg(tmp_path, "rome", n_edits=6, eval_every=0, snapshot_every=1, update_angles=False)
    b = run_sequential(cfg, store, lm=tiny_llama, should_cancel=_StopBefore(6))
    assert store.get_run(b)["n_edits_done"] == 5
    assert [s for s, _ in snaps.list_snapshots(str(tmp_path), b)] == [4, 5]
    snap = snaps.load_snapshot(snaps.list_snapshots(str(tmp_path), b)[-1][1])
    assert snap["meta"]["n_done"] == 5 and snap["meta"]["step"] == 5
    # the snapshot's matrix is the model's after 5 edits: resume from it edits only the 6th request
    resume_run(store, b, lm=tiny_llama)
    assert store.get_run(b)["status"] == "finished"
    edits = store.edits_frame(b)
    assert list(edits["idx"]) == list(range(6))
    assert list(store.metrics_frame([b], kinds=["resume"])["value"]) == [5.0]


def test_never_snapshotting_and_the_refusals(tmp_path, tiny_llama, standins):
    store = RunStore(tmp_path)
    cfg = _cfg(tmp_path, "rome", snapshot_every=-1, update_angles=False)
    b = run_sequential(cfg, store, lm=tiny_llama, should_cancel=_StopBefore(4))
    assert snaps.list_snapshots(str(tmp_path), b) == []
    with pytest.raises(ResumeError, match="no resume snapshot"):
        resume_run(store, b, lm=tiny_llama)
    a = run_sequential(_cfg(tmp_path, "rome", update_angles=False), store, lm=tiny_llama)
    with pytest.raises(ResumeError, match="is finished"):
        resume_run(store, a, lm=tiny_llama)
    c = run_sequential(_cfg(tmp_path, "rome", update_angles=False), store, lm=tiny_llama,
                       should_cancel=_StopBefore(4))
    assert snaps.list_snapshots(str(tmp_path), c)
    store.delete_run(c)  # deleting a run deletes its snapshots
    assert not os.path.exists(snaps.snapshot_dir(str(tmp_path), c))
    with pytest.raises(Exception, match="snapshot_every"):
        _cfg(tmp_path, "rome", snapshot_every=-2).validate()


def test_a_snapshot_of_another_model_is_refused(tmp_path, tiny_llama, tiny_gpt2, standins):
    store = RunStore(tmp_path)
    b = run_sequential(_cfg(tmp_path, "rome", update_angles=False), store, lm=tiny_llama,
                       should_cancel=_StopBefore(4))
    with pytest.raises(snaps.SnapshotError, match="model"):
        resume_run(store, b, lm=tiny_gpt2)


def test_a_damaged_snapshot_names_the_file(tmp_path, tiny_llama, standins):
    store = RunStore(tmp_path)
    b = run_sequential(_cfg(tmp_path, "rome", update_angles=False), store, lm=tiny_llama,
                       should_cancel=_StopBefore(4))
    (_, path), = snaps.list_snapshots(str(tmp_path), b)
    with open(path, "wb") as f:
        f.write(b"not a snapshot")
    with pytest.raises(snaps.SnapshotError, match=os.path.basename(path)):
        resume_run(store, b, lm=tiny_llama)


def test_truncate_run_drops_only_later_rows_and_their_files(tmp_path):
    store = RunStore(tmp_path)
    store.blob_limit = 10  # every artifact goes to a file
    rid = store.create_run(status="interrupted", method="rome", n_edits_done=3)
    for n in (1, 2, 3):
        store.write_step(rid, edit_rows=[{"idx": n - 1, "step": n, "n_edits": n}],
                         metric_rows=[{"n_edits": n, "step": n, "kind": "edit", "metric": "m", "value": float(n)}],
                         artifacts=[("a", {"x": np.arange(100)}, n, n)])
    files = sorted(os.listdir(store.artifact_dir(rid)))
    assert len(files) == 3
    counts = store.truncate_run(rid, 2)
    assert counts == {"edits": 1, "metrics": 1, "artifacts": 1}
    assert list(store.edits_frame(rid)["n_edits"]) == [1, 2]
    assert list(store.metrics_frame([rid])["value"]) == [1.0, 2.0]
    assert sorted(store.list_artifacts(rid)["n_edits"]) == [1, 2]
    assert len(os.listdir(store.artifact_dir(rid))) == 2
    assert store.get_run(rid)["n_edits_done"] == 2


@pytest.mark.timeout(240)
def test_a_killed_cli_run_resumes_from_the_command_line(tmp_path, tiny_dir):
    """``python -m app run`` SIGKILLed after its 3rd edit; ``python -m app resume`` finishes it: every edit row
    once, every checkpoint's retention rows once, the same values as the same run made without a kill."""
    import signal
    import subprocess
    import sys
    import time

    from tests.unit.test_faults import DRIVER, ROOT
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    runs = str(tmp_path / "runs")
    common = ["--method", "unit-shift", "--model", tiny_dir, "--n-edits", "8", "--eval-every", "2",
              "--set", "run.general=none", "--runs-dir", runs, "--no-progress", "--threads", "1"]

    def cli(*argv, **kw):
        return subprocess.run([sys.executable, str(script), *argv], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                              capture_output=True, text=True, timeout=180, **kw)

    ref = cli("run", *common, "--label", "uninterrupted")
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen([sys.executable, str(script), "run", *common, "--set", "sleep=0.4", "--label", "killed"],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    reader = RunStore(runs, recover=False)
    deadline = time.time() + 150
    run_id = None
    while time.time() < deadline:
        found = reader.list_runs()
        found = found[found["label"] == "killed"] if len(found) else found
        if len(found) and int(found["n_edits_done"].iloc[0] or 0) >= 3:
            run_id = str(found["run_id"].iloc[0])
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert run_id is not None, "the run never reached 3 edits"
    out = cli("resume", run_id, "--runs-dir", runs, "--no-progress", "--json")
    assert out.returncode == 0, out.stderr
    assert "resuming run" in out.stderr
    store = RunStore(runs)
    run = store.get_run(run_id)
    assert run["status"] == "finished" and run["n_edits_done"] == 8
    assert list(store.edits_frame(run_id)["idx"]) == list(range(8))
    ref_id = str(store.list_runs().set_index("label").loc["uninterrupted", "run_id"])
    _same(_rows(store, ref_id), _rows(store, run_id), "killed + resumed CLI run")
    again = cli("resume", run_id, "--runs-dir", runs, "--no-progress")
    assert again.returncode != 0 and "is finished" in again.stderr
