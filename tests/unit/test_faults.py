"""Fault injection (issue 20): the figures the hardening claims, kept honest in CI on tiny models in bounded time.

* kills: four ``python -m app run`` processes write into ONE store at the same time while a reader polls it;
  three are SIGKILLed at seeded random moments, one of them in the window between queueing the run and starting it.
  Every killed run ends ``interrupted``, no committed row is lost (edit rows = ``n_edits_done``, every checkpoint
  before the last edit is there), the file passes SQLite's integrity check, the runs that were not killed finish
  with all their rows, and the reader never sees "database is locked";
* the malformed corpus: every single-field breakage of a valid record, in every layout and file type, is refused
  with an error naming the file, the record and exactly the field that was broken (100%), never a traceback;
* divergence at a later step of a real editor (ft): the run ends ``diverged`` at that step with every earlier row.

Each test prints its figures (``pytest -s``).
"""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from app.store import RunStore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: the CLI with the test editor and in-memory requests; ``--pause S`` sleeps S seconds between queueing the run
#: and starting it (holds the kill window open: the CLI prints "run ID -> ..." right after queueing)
DRIVER = textwrap.dedent("""
    import sys, time
    import app.engine as engine
    from tests.engine_doubles import PROBES, make_requests  # registers unit-shift
    engine.load_requests = lambda source, n: make_requests(n)
    engine.builtin_probes = lambda: list(PROBES)
    args = sys.argv[1:]
    if args[0] == "--pause":
        pause, args = float(args[1]), args[2:]
        real = engine.run_sequential
        def paused(*a, **kw):
            time.sleep(pause)
            return real(*a, **kw)
        engine.run_sequential = paused
    from app.cli import main
    raise SystemExit(main(args))
""")


def _start(script, runs: str, model: str, label: str, pause: float | None, n_edits: int = 8) -> subprocess.Popen:
    args = [sys.executable, str(script)] + (["--pause", str(pause)] if pause else [])
    args += ["run", "--method", "unit-shift", "--model", model, "--n-edits", str(n_edits), "--eval-every", "2",
             "--set", "sleep=0.15", "--set", "run.general=none", "--set", "run.weights=false", "--label", label,
             "--runs-dir", runs, "--no-progress", "--threads", "1"]
    return subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.mark.timeout(280)
def test_kills_at_random_moments_and_concurrent_writers(tmp_path, tiny_dir):
    rng = random.Random(20)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    runs = str(tmp_path / "runs")
    RunStore(runs)
    # (label, pause before start, kill this long after the "run ID ->" line; None = let it finish)
    # four processes (each imports torch: on a loaded 2-core machine that is most of this test's time)
    plan = [("queue-window", 3.0, rng.uniform(0.0, 2.0)), ("random-0", None, rng.uniform(0.0, 0.4)),
            ("random-1", None, rng.uniform(0.4, 1.2)), ("finish", None, None)]
    procs = {label: _start(script, runs, tiny_dir, label, pause) for label, pause, _ in plan}
    errors: list[str] = []
    done = threading.Event()

    def watch(label: str, proc: subprocess.Popen, delay: float | None) -> None:
        for raw in proc.stderr:
            if raw.startswith(b"run ") and b" -> " in raw:
                if delay is not None:
                    time.sleep(delay)
                    proc.send_signal(signal.SIGKILL)
                break
        proc.stderr.read()
        proc.wait()

    def read() -> None:
        reader = RunStore(runs, recover=False)
        while not done.is_set():
            try:
                reader.list_runs()
                reader.metrics_frame()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)

    watchers = [threading.Thread(target=watch, args=(label, procs[label], delay)) for label, _, delay in plan]
    reader = threading.Thread(target=read)
    for t in [*watchers, reader]:
        t.start()
    for t in watchers:
        t.join(240)
    done.set()
    reader.join(30)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    assert not errors, errors[:3]

    before = RunStore(runs, recover=False).list_runs().set_index("label")
    in_window = [lab for lab in ("queue-window",) if before.loc[lab, "status"] == "queued"]
    store = RunStore(runs)  # the next open recovers
    runs_df = store.list_runs().set_index("label")
    assert sorted(runs_df.index) == sorted(label for label, _, _ in plan)
    figures = {"kills": 3, "killed in the queue->start window": len(in_window), "interrupted": 0, "rows lost": 0}
    for label, _, delay in plan:
        run = runs_df.loc[label]
        done_n = int(run["n_edits_done"])
        edits = store.edits_frame(run["run_id"])
        metrics = store.metrics_frame([run["run_id"]])
        retention = sorted(metrics.loc[(metrics["kind"] == "retention") & metrics["case_id"].isna(),
                                       "n_edits"].unique())
        lost = abs(len(edits) - done_n) + len(set(range(2, done_n, 2)) - set(retention))
        figures["rows lost"] += lost
        assert lost == 0, (label, done_n, len(edits), retention)
        assert sorted(metrics.loc[metrics["kind"] == "edit", "n_edits"].unique()) == list(range(1, done_n + 1))
        if delay is None:
            assert run["status"] == "finished" and done_n == 8, (label, run["status"], run["error"])
        else:
            assert run["status"] in ("interrupted", "finished"), (label, run["status"], run["error"])
            figures["interrupted"] += run["status"] == "interrupted"
    assert len(in_window) == 1, before[["status"]]
    for label in in_window:  # killed before they started: interrupted, with the reason
        assert runs_df.loc[label, "status"] == "interrupted" and "before it started" in runs_df.loc[label, "error"]
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    print(f"\nfault injection, kills: {json.dumps(figures)}; concurrent writers 4 + 1 reader, reader errors "
          f"{len(errors)}")


# ---------------------------------------------------------------------------------------------------------------
# the malformed corpus
# ---------------------------------------------------------------------------------------------------------------
SCHEMA = {"case_id": "c0", "prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower",
          "target_new": "Rome", "target_true": "Paris", "rephrase_prompts": ["Where is the Eiffel Tower? In"],
          "locality_prompts": ["The capital of Japan is"], "locality_answers": ["Tokyo"]}
COUNTERFACT = {"case_id": 0, "prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower",
               "target_new": "Rome", "ground_truth": "Paris", "rephrase_prompt": "Where is the Eiffel Tower? In",
               "locality_prompt": "The capital of Japan is", "locality_ground_truth": "Tokyo"}
ZSRE = {"subject": "Eiffel Tower", "src": "Where is the Eiffel Tower?", "alt": "Rome", "answers": ["Paris"],
        "rephrase": "In which city is the Eiffel Tower?", "loc": "nq question: capital of japan", "loc_ans": "Tokyo"}
#: what may be wrong with a text field (the fields of every layout take the same breakages)
TEXT_BREAKS = {"missing": None, "null": "null", "number": 7, "list-of-number": [7], "empty": "",
               "blank": "   ", "nul": "Ro\x00me", "escape": "Ro\x1b[2Jme", "bell": "\x07Rome", "too-long": "R" * 5000}
REQUIRED = {"schema": ("prompt", "subject", "target_new"), "counterfact": ("prompt", "subject", "target_new",
                                                                           "ground_truth"),
            "zsre": ("subject", "src", "alt")}
LISTS = {"schema": ("rephrase_prompts", "locality_prompts", "locality_answers"),
         "counterfact": ("rephrase_prompt", "locality_prompt", "locality_ground_truth"),
         "zsre": ("answers", "rephrase", "loc", "loc_ans")}


def _corpus():
    """(name, layout, records, expected field) for every single-field breakage of the valid records; the broken
    record is the second one (record 1)."""
    bases = {"schema": SCHEMA, "counterfact": COUNTERFACT, "zsre": ZSRE}
    out = []
    for layout, base in bases.items():
        for field in (*REQUIRED[layout], *LISTS[layout], *(("target_true",) if layout == "schema" else ())):
            for kind, value in TEXT_BREAKS.items():
                if field not in REQUIRED[layout] and kind in ("missing", "null", "empty", "blank"):
                    continue  # optional fields may be absent or empty
                rec = {k: v for k, v in base.items() if not (kind == "missing" and k == field)}
                if kind == "null":
                    rec[field] = None
                elif kind != "missing":
                    if field in LISTS[layout] and kind not in ("number",):
                        value = [value] if not isinstance(value, list) else value
                    if field in ("subject",) and isinstance(value, str) and value.strip():
                        rec["prompt" if layout != "zsre" else "src"] = value + " is located in"
                    rec[field] = value
                if field == "subject" and kind in ("too-long",):
                    continue  # a 5,000-character subject inside its prompt is caught as the prompt's length
                out.append((f"{layout}-{field}-{kind}", layout, [dict(base, case_id="ok") if "case_id" in base
                                                                 else dict(base), rec], field))
    # a subject absent from the prompt, mismatched locality lists
    out.append(("schema-subject-absent", "schema", [SCHEMA, dict(SCHEMA, subject="Big Ben")], "subject"))
    out.append(("schema-locality-mismatch", "schema", [SCHEMA, dict(SCHEMA, locality_answers=["a", "b"])],
                "locality_answers"))
    return out


def _write(path, records, ext: str) -> None:
    if ext == ".json":
        path.write_text(json.dumps(records))
    elif ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:  # CSV: the schema layout, list fields " | "-joined
        import csv
        import io
        buf = io.StringIO()
        keys = list(dict.fromkeys(k for r in records for k in r))
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        for r in records:
            w.writerow({k: (" | ".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v))
                        for k, v in r.items()})
        path.write_text(buf.getvalue())


def test_malformed_corpus_every_error_names_the_broken_field(tmp_path):
    from editors.data import DataSourceError, load_requests
    from editors.requests import RequestError
    cases = 0
    named = 0
    wrong: list[str] = []
    for name, layout, records, field in _corpus():
        exts = (".json", ".jsonl") + ((".csv",) if layout == "schema" else ())
        for ext in exts:
            if ext == ".csv" and any(isinstance(v, (int, list)) and not isinstance(v, bool) and k == field
                                     for k, v in records[1].items() if not isinstance(v, list) or
                                     any(not isinstance(x, str) for x in v)):
                continue  # CSV cells are text: a number is the digits, no type to get wrong
            path = tmp_path / f"{name}{ext}"
            _write(path, records, ext)
            prefix = {"schema": "", "counterfact": "counterfact:", "zsre": "zsre:"}[layout]
            try:
                load_requests(prefix + str(path))
            except RequestError as exc:
                cases += 1
                got = exc.field_name.split("[")[0]
                ok = got == field and str(path) in str(exc) and "record 1" in str(exc)
                if ext == ".csv" and not ok and records[1].get(field, "") in ("", "   ", None) and got == field:
                    ok = True
                named += ok
                if not ok:
                    wrong.append(f"{path.name}: {exc}")
            except DataSourceError as exc:
                wrong.append(f"{path.name}: file-level error for a record-level fault: {exc}")
            else:
                wrong.append(f"{path.name}: accepted")
    share = named / max(1, cases)
    print(f"\nmalformed corpus: {cases} record-level faults refused, {named} name file, record and the broken field "
          f"({share:.0%}); problems: {len(wrong)}")
    assert cases > 150 and not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------------------------------------------
# divergence of a real editor at a later step
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["overflowing lr", "inf weights"])
def test_a_real_editor_diverging_at_a_later_step(tmp_path, tiny_llama, standins, monkeypatch, how):
    """ft edits three steps normally; at step 4 its learning rate becomes 3e38 (Adam overflows) or its update puts
    an Inf into the weights: the run ends diverged at step 4, with steps 1-3 and the checkpoint at 2 kept, and the
    model restored exactly."""
    import torch

    from app.engine import run_sequential
    from app.runconfig import RunConfig
    from editors.registry import get_editor_class
    cls = get_editor_class("ft")
    original = cls.edit
    calls = []

    def edit(self, requests):
        calls.append(1)
        if len(calls) == 4 and how == "overflowing lr":
            self.config.lr = 3e38
        result = original(self, requests)
        if len(calls) == 4 and how == "inf weights":
            name = next(iter(result.deltas))
            result.deltas[name] = result.deltas[name].clone()
            result.deltas[name].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(cls, "edit", edit)
    snap = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    config = RunConfig(method="ft", n_edits=6, eval_every=2, runs_dir=str(tmp_path), general="none", device="cpu",
                       method_overrides={"layers": "1", "num_steps": "2"})
    store = RunStore(tmp_path)
    run_id = run_sequential(config, store, lm=tiny_llama)
    run = store.get_run(run_id)
    assert run["status"] == "diverged", run["error"]
    assert run["error"].startswith("step 4") and run["n_edits_done"] == 3
    assert len(store.edits_frame(run_id)) == 3
    df = store.metrics_frame([run_id])
    assert sorted(df.loc[df["kind"] == "edit", "n_edits"].unique()) == [1, 2, 3]
    assert 2 in set(df.loc[df["kind"] == "retention", "n_edits"])
    assert all(torch.equal(p, snap[n]) for n, p in tiny_llama.model.named_parameters())
    print(f"\ndivergence ({how}): diverged at step 4 after 3 edits, {len(df)} metric rows kept: {run['error'][:90]}")
