"""The sequential run engine on tiny random models: rows per step and checkpoint, divergence, cancellation, failure,
a killed writer, a model loaded from its path, and real editors (ft, rome). The trivial editor ``unit-shift`` and the
in-memory requests are in tests/engine_doubles.py; the ``standins`` fixture in tests/conftest.py."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch

import app.engine as engine
from analysis.general import BUILTIN_PATH
from app.engine import run_sequential, run_summary
from app.runconfig import RunConfig, general_tasks
from app.store import RunStore
from editors.base import ConfigError
from editors.registry import UnknownMethodError
from tests.engine_doubles import PROBES, ShiftEditor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def snapshot(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def assert_same(lm, snap):
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, snap[n])]
    assert not changed, f"model left changed: {changed[:3]}"


def cfg(tmp_path, **kw) -> RunConfig:
    base = dict(method="unit-shift", n_edits=6, eval_every=2, runs_dir=str(tmp_path), general="none",
                device="cpu")
    base.update(kw)
    return RunConfig(**base)


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------
def test_config_validation_lists_valid_choices(tmp_path):
    with pytest.raises(UnknownMethodError, match="Valid methods: .*unit-shift"):
        RunConfig(method="unit-shfit").validate()
    with pytest.raises(ConfigError, match="valid fields: .*scale"):
        RunConfig(method="unit-shift", method_overrides={"scael": 1}).validate()
    with pytest.raises(ConfigError, match="valid fields: .*batch_size"):
        RunConfig.from_dict({"method": "unit-shift", "batchsize": 2})
    with pytest.raises(ConfigError, match="valid fields"):
        RunConfig().replace(eval_evry="3")
    with pytest.raises(ConfigError, match="protocol"):
        RunConfig(method="unit-shift", protocols=("accuracy",)).validate()
    c = RunConfig(method="unit-shift").replace(eval_every="3", weights="false", protocols="tf_token_acc,gen_exact",
                                               device="none")
    assert (c.eval_every, c.weights, c.protocols, c.device) == (3, False, ("tf_token_acc", "gen_exact"), None)
    assert RunConfig.from_dict(c.to_dict()) == c
    # nothing was written for an invalid config
    with pytest.raises(UnknownMethodError):
        run_sequential(RunConfig(method="nope", runs_dir=str(tmp_path)))
    assert RunStore(tmp_path).list_runs().empty


def test_general_tasks():  # the --set parser's test moved to test_cli.py (run_sets) and test_fields.py
    assert general_tasks("builtin, glue:/data/glue") == (("builtin", "glue"), "/data/glue")
    assert general_tasks("sst2,rte") == (("sst2", "rte"), None)
    with pytest.raises(ConfigError, match="unknown task 'trivia'"):
        RunConfig(method="unit-shift", general="builtin,trivia").validate()
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig(method="unit-shift", general="glue:/no/such/dir").validate()


# ---------------------------------------------------------------------------------------------------------------
# a whole run
# ---------------------------------------------------------------------------------------------------------------
def test_sequential_run_records_every_step_and_checkpoint(tmp_path, tiny_llama, standins, monkeypatch):
    general = pd.DataFrame({"task": ["builtin"], "metric": ["accuracy"], "value": [0.5], "n": [3]})
    monkeypatch.setattr(engine, "general_abilities", lambda lm, spec, n: general)
    monkeypatch.setattr(engine, "detect_collapse",
                        lambda df: pd.DataFrame({"n_edits": [4], "metric": ["collapsed"], "value": [True]}))
    snap = snapshot(tiny_llama)
    seen = []
    run_id = run_sequential(cfg(tmp_path, general="builtin", hidden_states=True), lm=tiny_llama,
                            progress=lambda done, total, info: seen.append((done, total, info["phase"])))
    assert_same(tiny_llama, snap)  # the given model is restored exactly

    store = RunStore(tmp_path)
    run = store.get_run(run_id)
    assert run["status"] == "finished" and run["error"] is None
    assert (run["n_edits_done"], run["n_edits_planned"]) == (6, 6)
    assert run["model_hash"] == tiny_llama.model_hash and run["method"] == "unit-shift"
    assert run["config"]["n_edits"] == 6 and run["method_config"]["scale"] == 0.05
    assert "torch" in run["package_versions"]

    df = store.metrics_frame([run_id])
    agg = df[df["case_id"].isna()]
    # immediate metrics after every step, for that step's edit
    edit = df[df["kind"] == "edit"]
    assert sorted(edit["n_edits"].unique()) == [1, 2, 3, 4, 5, 6]
    assert list(edit[edit["case_id"].notna() & (edit["metric"] == "reliability")
                     & (edit["protocol"] == "tf_token_acc")]["case_id"]) == [f"c{i}" for i in range(6)]
    # retention of ALL edits so far at every checkpoint
    ret = df[(df["kind"] == "retention") & (df["metric"] == "reliability") & (df["protocol"] == "tf_token_acc")]
    assert sorted(ret.loc[ret["case_id"].isna(), "n_edits"]) == [2, 4, 6]
    assert ret[ret["case_id"].notna()].groupby("n_edits").size().to_dict() == {2: 2, 4: 4, 6: 6}
    assert {"reliability", "generality", "locality"} <= set(agg.loc[agg["kind"] == "retention", "metric"])
    assert set(agg.loc[agg["kind"] == "retention", "protocol"]) == {"tf_token_acc", "prob_margin"}
    # pre-edit scores of every planned request
    assert len(df[(df["kind"] == "pre") & df["case_id"].notna() & (df["metric"] == "reliability")
                  & (df["protocol"] == "tf_token_acc")]) == 6
    # fixed probe set: agreement with the unedited model
    loc = df[df["kind"] == "locality"]
    assert sorted(loc.loc[loc["case_id"].isna(), "n_edits"]) == [2, 4, 6]
    assert len(loc[loc["case_id"].notna()]) == 3 * len(PROBES)
    assert loc["value"].between(0, 1).all()
    # general abilities at the start and at checkpoints
    gen = df[df["kind"] == "general"]
    assert sorted(gen["n_edits"]) == [0, 2, 4, 6] and set(gen["metric"]) == {"builtin/accuracy"}
    # weights of the edited matrix, with its layer
    w = df[df["kind"] == "weights"]
    assert set(w["layer"]) == {1} and set(w["param"]) == {tiny_llama.spec.mlp_out_weight(1)}
    assert sorted(w["n_edits"].unique()) == [2, 4, 6]
    if "delta_fro" in set(w["metric"]):
        dfro = w[w["metric"] == "delta_fro"].sort_values("n_edits")["value"].to_numpy()
        assert (dfro > 0).all()
    # update angles after every step but the first; info scalars
    ang = df[df["kind"] == "update_angle"]
    assert sorted(ang.loc[ang["metric"] == "update_norm", "n_edits"]) == [1, 2, 3, 4, 5, 6]
    info = df[df["kind"] == "info"]
    assert set(info["metric"]) == {"call", "norm", "per_layer.1"}
    assert list(info[info["metric"] == "call"].sort_values("n_edits")["value"]) == [1, 2, 3, 4, 5, 6]
    # timings
    t = agg[agg["kind"] == "timing"]
    assert {"seconds_per_edit", "peak_mem_mb", "eval_seconds"} <= set(t["metric"])
    # collapse rows from analysis.collapse (stand-in)
    col = df[df["kind"] == "collapse"]
    assert list(col["metric"]) == ["collapsed"] and list(col["value"]) == [1.0] and list(col["n_edits"]) == [4]

    edits = store.edits_frame(run_id)
    assert list(edits["idx"]) == list(range(6)) and list(edits["n_edits"]) == [1, 2, 3, 4, 5, 6]
    assert edits["request"][0]["case_id"] == "c0" and edits["info"][2]["call"] == 3
    assert (edits["seconds"] > 0).all()

    arts = store.list_artifacts(run_id)
    assert set(arts["name"]) == {"editor", "singular_values", "hidden_states"}
    hs0 = store.get_artifact(run_id, "hidden_states", n_edits=0)
    hs6 = store.get_artifact(run_id, "hidden_states", n_edits=6)
    assert hs0["layer1"].shape == hs6["layer1"].shape == (len(PROBES), tiny_llama.spec.hidden_size)
    assert not np.allclose(hs0["layer1"], hs6["layer1"])
    shift = df[df["kind"] == "hidden_shift"]
    assert sorted(shift["n_edits"].unique()) == [2, 4, 6] and set(shift["layer"]) == {1}
    assert {"mean_cosine_shift", "linear_cka"} <= set(shift["metric"])
    sv = store.get_artifact(run_id, "singular_values", n_edits=6)
    assert any(k.endswith("|delta") for k in sv)

    assert seen[-1][2] == "done" and max(d for d, _, _ in seen) == 6
    summary = run_summary(store, run_id)
    assert summary["status"] == "finished" and summary["n_edits"] == 6
    assert set(summary["final"]) == {"reliability", "generality", "locality"}
    assert all(v is not None for v in summary["final"].values())


def test_batches_and_checkpoint_only_at_end(tmp_path, tiny_gpt2, standins):
    run_id = run_sequential(cfg(tmp_path, n_edits=5, batch_size=2, eval_every=0, protocols=("tf_token_acc",)),
                            lm=tiny_gpt2)
    store = RunStore(tmp_path)
    df = store.metrics_frame([run_id])
    assert store.get_run(run_id)["status"] == "finished"
    assert sorted(df.loc[df["kind"] == "edit", "n_edits"].unique()) == [2, 4, 5]  # steps of 2, 2, 1
    assert sorted(df.loc[(df["kind"] == "retention") & df["case_id"].isna(), "n_edits"].unique()) == [5]
    assert set(df.loc[df["kind"] == "weights", "layer"]) == {1}  # GPT-2 Conv1D layout handled
    edits = store.edits_frame(run_id)
    assert list(edits["step"]) == [1, 1, 2, 2, 3]
    assert [None if i is None else i["call"] for i in edits["info"]] == [1, None, 2, None, 3]  # once per step


# ---------------------------------------------------------------------------------------------------------------
# how runs end
# ---------------------------------------------------------------------------------------------------------------
def test_nan_update_diverges_and_keeps_earlier_rows(tmp_path, tiny_llama, standins):
    snap = snapshot(tiny_llama)
    run_id = run_sequential(cfg(tmp_path, method_overrides={"nan_at": 4}), lm=tiny_llama)
    assert_same(tiny_llama, snap)
    store = RunStore(tmp_path)
    run = store.get_run(run_id)
    assert run["status"] == "diverged" and run["n_edits_done"] == 3
    assert "NaN" in run["error"] and "step 4" in run["error"]
    df = store.metrics_frame([run_id])
    assert sorted(df.loc[df["kind"] == "edit", "n_edits"].unique()) == [1, 2, 3]
    assert sorted(df.loc[(df["kind"] == "retention") & df["case_id"].isna(), "n_edits"].unique()) == [2]
    assert len(store.edits_frame(run_id)) == 3


def test_overflowing_weights_diverge(tmp_path, tiny_llama, standins):
    snap = snapshot(tiny_llama)
    run_id = run_sequential(cfg(tmp_path, method_overrides={"overflow_at": 3}), lm=tiny_llama)
    assert_same(tiny_llama, snap)
    run = RunStore(tmp_path).get_run(run_id)
    assert run["status"] == "diverged", run["error"]
    assert "non-finite" in run["error"] and run["n_edits_done"] in (3, 4)


def test_nan_logits_diverge(tmp_path, tiny_llama, standins, monkeypatch):
    editors = []
    original = ShiftEditor.__init__

    def init(self, *args, **kw):
        original(self, *args, **kw)
        editors.append(self)

    monkeypatch.setattr(ShiftEditor, "__init__", init)
    try:
        run_id = run_sequential(cfg(tmp_path, method_overrides={"nan_logits_at": 3}), lm=tiny_llama)
    finally:
        for e in editors:
            if getattr(e, "nan_hook", None) is not None:
                e.nan_hook.remove()
    store = RunStore(tmp_path)
    run = store.get_run(run_id)
    assert run["status"] == "diverged", run["error"]
    assert "non-finite logits" in run["error"] and run["n_edits_done"] == 3
    # the edit rows of the step that blew up are kept; its immediate metrics are not (they are garbage)
    assert len(store.edits_frame(run_id)) == 3
    df = store.metrics_frame([run_id])
    assert sorted(df.loc[df["kind"] == "edit", "n_edits"].unique()) == [1, 2]


def test_should_cancel_stops_as_cancelled(tmp_path, tiny_llama, standins):
    snap = snapshot(tiny_llama)
    steps = []
    run_id = run_sequential(cfg(tmp_path), lm=tiny_llama, should_cancel=lambda: len(steps) >= 3,
                            progress=lambda d, t, info: steps.append(d) if info["phase"] == "edit" else None)
    assert_same(tiny_llama, snap)
    store = RunStore(tmp_path)
    run = store.get_run(run_id)
    assert run["status"] == "cancelled" and run["n_edits_done"] == 3
    assert len(store.edits_frame(run_id)) == 3


def test_store_cancel_request_stops_the_run(tmp_path, tiny_llama, standins):
    store = RunStore(tmp_path)

    def progress(done, total, info):
        if info["phase"] == "edit" and done == 2:
            store.request_cancel(info["run_id"])  # as another process (the web app) would

    run_id = run_sequential(cfg(tmp_path), store, lm=tiny_llama, progress=progress)
    assert store.get_run(run_id)["status"] == "cancelled"
    assert store.get_run(run_id)["n_edits_done"] == 2


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupt_after_apply_before_commit_keeps_counts_equal_to_rows(tmp_path, tiny_llama, standins, monkeypatch,
                                                                        exc):
    """Ray's cancellation is a KeyboardInterrupt that can land anywhere: here while step 3 is being evaluated (its
    edit applied, its rows not committed). The run's n_edits_done must say what its committed rows say (2)."""
    real = engine.SequentialRun._evaluate

    def evaluate(self, requests, what, *a, **kw):
        if what == "immediate evaluation" and self.n_done == 3:
            raise exc("stopped mid-step")
        return real(self, requests, what, *a, **kw)

    monkeypatch.setattr(engine.SequentialRun, "_evaluate", evaluate)
    with pytest.raises(exc, match="stopped mid-step"):
        run_sequential(cfg(tmp_path), lm=tiny_llama)
    store = RunStore(tmp_path)
    run = store.list_runs().iloc[0]
    assert run["status"] == ("interrupted" if exc is KeyboardInterrupt else "failed")
    assert run["n_edits_done"] == 2 and len(store.edits_frame(run["run_id"])) == 2
    edits = store.metrics_frame([run["run_id"]], kinds=["edit"])
    assert sorted(edits["n_edits"].unique()) == [1, 2]


def test_exception_marks_failed_and_reraises(tmp_path, tiny_llama, standins):
    snap = snapshot(tiny_llama)
    with pytest.raises(RuntimeError, match="told to fail"):
        run_sequential(cfg(tmp_path, method_overrides={"fail_at": 3}), lm=tiny_llama)
    assert_same(tiny_llama, snap)
    store = RunStore(tmp_path)
    run = store.list_runs().iloc[0]
    assert run["status"] == "failed" and "RuntimeError: unit-shift was told to fail" in run["error"]
    assert run["n_edits_done"] == 2
    assert len(store.edits_frame(run["run_id"])) == 2


def test_killed_writer_keeps_committed_rows_and_is_interrupted(tmp_path):
    """A separate process runs a slow run; it is killed with SIGKILL mid-way; the next open marks it interrupted."""
    script = tmp_path / "slow_run.py"
    script.write_text(textwrap.dedent(f"""
        import app.engine as engine
        from app.runconfig import RunConfig
        from tests.engine_doubles import make_requests, PROBES  # registers unit-shift
        from editors.testing import tiny_model
        engine.load_requests = lambda source, n: make_requests(n)
        engine.builtin_probes = lambda: list(PROBES)
        config = RunConfig(method="unit-shift", method_overrides={{"sleep": 0.3}}, n_edits=8, eval_every=2,
                                  runs_dir={str(tmp_path)!r}, general="none", weights=False, device="cpu")
        engine.run_sequential(config, lm=tiny_model("llama"))
    """))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        run_id = None
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            if os.path.exists(tmp_path / "runs.sqlite"):
                runs = RunStore(tmp_path, recover=False).list_runs()
                if len(runs) and (runs["n_edits_done"].iloc[0] or 0) >= 3:
                    run_id = runs["run_id"].iloc[0]
                    break
            time.sleep(0.1)
        assert run_id is not None, "the run did not get going"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    store = RunStore(tmp_path)
    run = store.get_run(run_id)
    assert run["status"] == "interrupted" and "pid" in run["error"]
    done = run["n_edits_done"]
    assert 3 <= done < 8
    assert len(store.edits_frame(run_id)) == done
    df = store.metrics_frame([run_id])
    assert sorted(df.loc[df["kind"] == "edit", "n_edits"].unique()) == list(range(1, done + 1))
    assert (df.loc[(df["kind"] == "retention") & df["case_id"].isna(), "n_edits"] >= 2).any()


# ---------------------------------------------------------------------------------------------------------------
# a model named by its path
# ---------------------------------------------------------------------------------------------------------------
def test_run_loads_model_from_path(tmp_path, tiny_dir, standins):
    """Without ``lm`` the run loads the model its config names (a directory here), from a plain-data config dict."""
    config = cfg(tmp_path / "runs", model=tiny_dir, n_edits=2, eval_every=1).to_dict()
    run_id = run_sequential(pickle.loads(pickle.dumps(config)))
    run = RunStore(tmp_path / "runs").get_run(run_id)
    assert run["status"] == "finished" and run["model"] == tiny_dir


# ---------------------------------------------------------------------------------------------------------------
# real editors, where present
# ---------------------------------------------------------------------------------------------------------------
REAL = {"ft": {"layers": "1", "num_steps": "3"},
        "rome": {"layer": "1", "v_num_grad_steps": "3", "context_templates": "memit"}}


@pytest.mark.parametrize("method", sorted(REAL))
def test_real_editor_sequential_run(tmp_path, tiny_llama, standins, method):
    snap = snapshot(tiny_llama)
    assert os.path.exists(BUILTIN_PATH)
    run_id = run_sequential(cfg(tmp_path, method=method, method_overrides=REAL[method], n_edits=3, eval_every=2,
                                general="builtin", general_n=4), lm=tiny_llama)
    assert_same(tiny_llama, snap)
    store = RunStore(tmp_path)
    run = store.get_run(run_id)
    assert run["status"] == "finished", run["error"]
    df = store.metrics_frame([run_id])
    assert sorted(df.loc[(df["kind"] == "retention") & df["case_id"].isna(), "n_edits"].unique()) == [2, 3]
    assert set(df.loc[df["kind"] == "weights", "layer"].dropna()) == {1}
    gen = df[df["kind"] == "general"]  # the real general-ability probes
    assert sorted(gen["n_edits"].unique()) == [0, 2, 3]
    assert {"builtin/accuracy", "builtin/chance"} <= set(gen["metric"])
