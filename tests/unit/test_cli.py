"""``python -m app``: errors for unknown methods / fields / bad data (exit 2, no traceback), ``run --json``, list,
show, export, methods."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

import app.engine as engine
from app.cli import main
from editors.requests import RequestError
# ShiftEditor registers unit-shift; standins is the fixture of in-memory requests and probes
from tests.unit.test_engine import ShiftEditor, standins  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_llama):
    path = tmp_path_factory.mktemp("tiny-llama")
    # a copy: save_pretrained fills in config fields (dtype, architectures) that the session model's fingerprint
    # covers, and later tests that compute statistics on it would then refuse it as edited
    copy.deepcopy(tiny_llama.model).save_pretrained(path)
    tiny_llama.tokenizer.save_pretrained(path)
    return str(path)


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


def test_bad_data_file_names_record_and_field(tmp_path, capsys, monkeypatch, tiny_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([
        {"case_id": 0, "prompt": "The Eiffel Tower is in", "subject": "The Eiffel Tower", "target_new": "Rome"},
        {"case_id": 1, "prompt": "Paris is the capital of", "subject": "Paris"},
    ]))
    try:
        import editors.data  # noqa: F401
    except ModuleNotFoundError:  # not written yet: a stand-in that fails the way it will
        def load(source, n):
            raise RequestError(str(bad), 1, "target_new", "missing")
        monkeypatch.setattr(engine, "load_requests", load)
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


def test_bench_without_benchmarks(capsys, monkeypatch):
    import importlib
    real = importlib.import_module

    def fake(name, *a, **kw):
        if name == "benchmarks.bench_editors":
            err = ModuleNotFoundError(f"No module named {name!r}")
            err.name = name
            raise err
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", fake)
    code, _, err = run_cli(capsys, "bench", "--help")
    assert code == 2 and "bench_editors" in err


def test_python_m_app_entry_point():
    proc = subprocess.run([sys.executable, "-m", "app", "methods", "definitely-not-a-method"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Valid methods:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("takes_argv", [True, False])
def test_bench_delegates_to_benchmarks(capsys, monkeypatch, takes_argv):
    import importlib
    import types
    seen = []
    fake = types.ModuleType("benchmarks.bench_editors")
    if takes_argv:
        # as the real one: it returns its table, which is not an exit status
        fake.main = lambda argv: seen.append(list(argv)) or pd.DataFrame({"method": ["rome"]})
    else:
        fake.main = lambda: seen.append(sys.argv[1:]) or 3
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a, **kw: fake if name == "benchmarks.bench_editors" else real(name, *a, **kw))
    code, _, _ = run_cli(capsys, "bench", "--methods", "rome", "--quick")
    assert seen == [["--methods", "rome", "--quick"]]
    assert code == (0 if takes_argv else 3)


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
