"""``python -m app``: errors for unknown methods / fields / bad data (exit 2, no traceback), ``run --json``, list,
show, export, methods."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

import tests.engine_doubles  # noqa: F401  (registers the test editor unit-shift)
from app.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_unknown_method_lists_valid_ones(tmp_path, capsys):
    code, out, err = run_cli(capsys, "run", "--method", "unit-shfit", "--runs-dir", tmp_path)
    assert code == 2
    assert "unknown method 'unit-shfit'" in err and "Did you mean unit-shift" in err and "Valid methods:" in err
    assert "Traceback" not in err
    code, _, err = run_cli(capsys, "methods", "nope")
    assert code == 2 and "Valid methods:" in err


def test_unknown_config_key_lists_fields(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--method", "unit-shift", "--set", "scael=2", "--runs-dir", tmp_path)
    assert code == 2 and "unknown config field 'scael'" in err
    assert "valid fields:" in err and "scale" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "run", "--method", "unit-shift", "--set", "run.evl_every=2", "--runs-dir",
                           tmp_path)
    assert code == 2 and "unknown run field 'evl_every'" in err and "eval_every" in err
    code, _, err = run_cli(capsys, "run", "--method", "unit-shift", "--set", "scale=big", "--runs-dir", tmp_path)
    assert code == 2 and "scale" in err
    code, _, err = run_cli(capsys, "run", "--method", "unit-shift", "--set", "scale", "--runs-dir", tmp_path)
    assert code == 2 and "KEY=VALUE" in err


def test_bad_data_file_names_record_and_field(tmp_path, capsys, tiny_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([
        {"case_id": 0, "prompt": "The Eiffel Tower is in", "subject": "The Eiffel Tower", "target_new": "Rome"},
        {"case_id": 1, "prompt": "Paris is the capital of", "subject": "Paris"},
    ]))
    code, out, err = run_cli(capsys, "run", "--method", "unit-shift", "--data", bad, "--model", tiny_dir,
                             "--runs-dir", tmp_path / "runs", "--no-progress", "--json")
    assert code == 2, err
    assert "record 1" in err and "target_new" in err and "Traceback" not in err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["status"] == "failed"


def test_run_json_list_show_export(tmp_path, capsys, standins, tiny_dir):
    runs = tmp_path / "runs"
    code, out, err = run_cli(capsys, "run", "--model", tiny_dir, "--method", "unit-shift", "--data", "builtin",
                             "--n-edits", 4, "--eval-every", 2, "--device", "cpu", "--runs-dir", runs,
                             "--set", "scale=0.02", "--set", "run.general=none", "--label", "cli test", "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) >= {"run_id", "status", "n_edits", "seconds_per_edit", "final"}
    assert summary["status"] == "finished" and summary["n_edits"] == 4
    assert set(summary["final"]) == {"reliability", "generality", "locality"}
    assert all(isinstance(v, float) for v in summary["final"].values())
    assert "edit/s" in err or "edit" in err  # the tqdm bar went to stderr
    run_id = summary["run_id"]

    code, out, _ = run_cli(capsys, "list", "--runs-dir", runs)
    assert code == 0 and run_id in out and "finished" in out and "cli test" in out
    code, out, _ = run_cli(capsys, "list", "--runs-dir", runs, "--json")
    assert json.loads(out)[0]["run_id"] == run_id

    code, out, _ = run_cli(capsys, "show", run_id[:15], "--runs-dir", runs)
    assert code == 0
    assert "finished" in out and "scale = 0.02" in out and "reliability" in out and "collapse" in out
    code, out, _ = run_cli(capsys, "show", run_id, "--runs-dir", runs, "--json")
    shown = json.loads(out)
    assert shown["summary"]["run_id"] == run_id and shown["run"]["config"]["n_edits"] == 4

    csv = tmp_path / "rows.csv"
    code, out, _ = run_cli(capsys, "export", run_id, "--format", "csv", "--out", csv, "--runs-dir", runs)
    assert code == 0 and os.path.exists(csv)
    df = pd.read_csv(csv)
    for col in ("run_id", "n_edits", "kind", "layer", "metric", "protocol", "value"):
        assert col in df.columns
    ret = df[(df["kind"] == "retention") & df["case_id"].isna()]
    assert sorted(ret["n_edits"].unique()) == [2, 4]
    assert set(df.loc[df["kind"] == "weights", "layer"]) == {1}
    assert df.loc[df["kind"] == "retention", "layer"].isna().all()
    pq = tmp_path / "rows.parquet"
    code, _, _ = run_cli(capsys, "export", run_id, "--out", pq, "--runs-dir", runs)  # format from the extension
    assert code == 0 and len(pd.read_parquet(pq)) == len(df)

    code, _, err = run_cli(capsys, "show", "no-such-run", "--runs-dir", runs)
    assert code == 2 and "no run" in err
    code, _, err = run_cli(capsys, "list", "--runs-dir", tmp_path / "empty")
    assert code == 2 and "no run store" in err
    code, out, _ = run_cli(capsys, "delete", run_id, "--runs-dir", runs)
    assert code == 0
    code, out, _ = run_cli(capsys, "list", "--runs-dir", runs)
    assert "no runs" in out


def test_diverged_run_reports_status(tmp_path, capsys, standins, tiny_dir):
    code, out, err = run_cli(capsys, "run", "--model", tiny_dir, "--method", "unit-shift", "--n-edits", 4,
                             "--set", "nan_at=2", "--set", "run.general=none", "--runs-dir", tmp_path,
                             "--no-progress", "--json")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "diverged" and summary["n_edits"] == 1 and "NaN" in summary["error"]
    assert "diverged" in err


def test_methods_lists_fields_with_help(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0 and "unit-shift: test editor" in out
    code, out, _ = run_cli(capsys, "methods", "unit-shift")
    assert code == 0 and "scale (float, default 0.05)" in out and "size of the rank-1 update" in out
    code, out, _ = run_cli(capsys, "methods", "unit-shift", "--json")
    info = json.loads(out)
    assert info[0]["name"] == "unit-shift" and {f["name"] for f in info[0]["fields"]} >= {"layer", "scale"}


def test_python_m_app_entry_point():
    proc = subprocess.run([sys.executable, "-m", "app", "methods", "definitely-not-a-method"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Valid methods:" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_runs_the_benchmark_with_the_arguments(capfd):
    """``bench`` runs ``python -m benchmarks.bench_editors`` with the arguments after it (--help included) and
    returns its exit status: 0 for its help, 2 for a method it refuses before loading any model."""
    code = main(["bench", "--help"])
    out, err = capfd.readouterr()
    assert code == 0 and "--methods" in out and "--batch-sizes" in out, err
    code = main(["bench", "--methods", "rome,memitt", "--n-edits", "1"])
    out, err = capfd.readouterr()
    assert code == 2 and "unknown method 'memitt'" in err and "Traceback" not in err


def test_run_sets_split_run_and_method_fields():
    from app.cli import run_sets
    from editors.base import ConfigError
    run_fields, method = run_sets(["lr=0.1", "run.eval_every=5", "layers=1,2"])
    assert run_fields == {"eval_every": "5"} and method == {"lr": "0.1", "layers": "1,2"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        run_sets(["lr"])


def test_threads_option(tmp_path, capsys, monkeypatch):
    """``--threads N`` sets torch's intra-op threads for the command; 0 is a usage error that names the option."""
    import torch
    old = torch.get_num_threads()
    seen = {}

    def study(args):
        seen["threads"] = torch.get_num_threads()
        return 0
    monkeypatch.setitem(__import__("app.cli", fromlist=["COMMANDS"]).COMMANDS, "study", study)
    try:
        code, _, err = run_cli(capsys, "study", "collapse", "--threads", 0, "--runs-dir", tmp_path)
        assert code == 2 and "--threads must be at least 1, got 0" in err
        assert "threads" not in seen  # the command never ran
        code, _, err = run_cli(capsys, "study", "collapse", "--threads", 1, "--runs-dir", tmp_path)
        assert code == 0, err
        assert seen["threads"] == 1
        code, _, err = run_cli(capsys, "run", "--method", "unit-shfit", "--threads", 1, "--runs-dir", tmp_path)
        assert code == 2 and "unknown method" in err  # the option parses for `run` too
    finally:
        torch.set_num_threads(old)


def test_study_set_must_name_a_method(tmp_path, capsys):
    """The study's ``--set`` takes METHOD.KEY=VALUE; anything else is a usage error before anything runs."""
    for bad in ("mose", "lam=50", "mose.=50"):
        code, _, err = run_cli(capsys, "study", "collapse", "--set", bad, "--runs-dir", tmp_path)
        assert code == 2 and f"--set expects METHOD.KEY=VALUE, got {bad!r}" in err and "Traceback" not in err
    assert not (tmp_path / "runs.sqlite").exists()
