"""Regression tests of issue 20's defects: run-id prefixes, runs without seconds, queued runs whose owner died, the
worker spawn storm, overflow as divergence, NaN config values, bounded and streamed data files, control characters,
the app's bind address, server paths of the New-run page, and the precise messages."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import tests.engine_doubles  # noqa: F401  (registers the test editor unit-shift)
from app.store import RunNotFoundError, RunStore


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- 4. run-id prefixes ---------------------------------------------------------------------------------------
def test_empty_and_short_prefixes_are_refused(tmp_path):
    store = RunStore(tmp_path)
    only = store.create_run(run_id="20260101-120000-abcdef")
    for bad in ("", "  ", "2", "20"):
        with pytest.raises(RunNotFoundError, match="too short|empty"):
            store.resolve(bad)
    assert store.resolve("2026") == only
    assert store.resolve(only) == only


def test_ambiguous_prefix_lists_every_match(tmp_path):
    store = RunStore(tmp_path)
    ids = [store.create_run(run_id=f"20260101-12000{i}-abcdef") for i in range(7)]
    with pytest.raises(RunNotFoundError) as info:
        store.resolve("2026")
    text = str(info.value)
    assert "7 runs" in text and all(i in text for i in ids)


def test_cli_refuses_an_empty_id_and_deletes_nothing(tmp_path, capsys):
    from app.cli import main
    store = RunStore(tmp_path)
    rid = store.create_run(status="finished")
    for cmd in ("delete", "show", "export", "cancel"):
        assert main([cmd, "", "--runs-dir", str(tmp_path)]) == 2
        assert "run id" in capsys.readouterr().err
    assert store.get_run(rid)["status"] == "finished"


# ---- 3. runs without seconds_total ----------------------------------------------------------------------------
def test_list_with_only_queued_runs(tmp_path, capsys):
    from app.cli import main
    store = RunStore(tmp_path)
    store.create_run(status="queued", method="ft", pid=os.getpid())
    store.create_run(status="queued", method="rome", pid=os.getpid())
    assert str(store.list_runs()["seconds_total"].dtype) == "float64"
    assert main(["list", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "queued" in out and "rome" in out
    assert main(["list", "--runs-dir", str(tmp_path), "--status", "queued"]) == 0


# ---- 2. a queued run whose owner died --------------------------------------------------------------------------
def test_queued_run_of_a_dead_process_becomes_interrupted(tmp_path):
    store = RunStore(tmp_path)
    dead = store.create_run(status="queued", pid=_dead_pid())
    alive = store.create_run(status="queued", pid=os.getpid())
    by_queue = store.create_run(status="queued", pid=None)  # the worker's job queue owns it
    assert store.recover_interrupted() == [dead]
    run = store.get_run(dead)
    assert run["status"] == "interrupted" and "before it started" in run["error"]
    assert store.get_run(alive)["status"] == "queued" and store.get_run(by_queue)["status"] == "queued"


def test_a_submitted_run_is_owned_by_the_queue(tmp_path):
    """The app's runs wait for the worker, not for the web server's process."""
    from app import backend
    from app.jobs import JobQueue
    store, queue = RunStore(tmp_path), JobQueue(tmp_path)
    run_id, _ = backend.submit_run(store, queue, {"method": "unit-shift", "n_edits": 1}, start_worker=False)
    assert store.get_run(run_id)["pid"] is None


# ---- 1. the worker spawn storm ---------------------------------------------------------------------------------
def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_concurrent_ensure_worker_starts_exactly_one(tmp_path):
    """Eight callers at once (as Streamlit polls while the first worker still imports torch) start one worker;
    calls after it, while it starts, start none; the worker's exit leaves no zombie behind."""
    import threading
    import time

    from app.worker import ensure_worker, worker_alive
    runs = str(tmp_path)
    barrier = threading.Barrier(8)
    pids: list = []

    def call():
        barrier.wait()
        pids.append(ensure_worker(runs, "cpu", idle_exit=1.0))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    started = [p for p in pids if p]
    assert len(pids) == 8 and len(started) == 1, (pids, open(os.path.join(runs, "worker-cpu.log")).read())
    assert ensure_worker(runs, "cpu", idle_exit=1.0) is None  # still starting (or serving): not another one
    pid = started[0]
    deadline = time.time() + 120
    while time.time() < deadline and not worker_alive(runs, "cpu"):
        time.sleep(0.1)
    assert worker_alive(runs, "cpu")
    while time.time() < deadline and worker_alive(runs, "cpu"):  # idle_exit: it leaves after a second idle
        time.sleep(0.2)
    time.sleep(1.0)
    assert not _zombie(pid), "the exited worker was not reaped"
    log_text = open(os.path.join(runs, "worker-cpu.log")).read()
    assert "another worker serves" not in log_text


# ---- 5. overflow inside an edit is a divergence; NaN config values are refused --------------------------------
def test_optimiser_overflow_ends_diverged_with_rows_kept(tmp_path, tiny_llama, standins):
    """ft with lr=3e38: torch's Adam raises "value cannot be converted to type float without overflow" in the
    second edit; the run ends ``diverged`` (not ``failed``) and the first edit's rows stay."""
    from app.engine import run_sequential
    from app.runconfig import RunConfig
    snap = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    config = RunConfig(method="ft", n_edits=3, eval_every=1, runs_dir=str(tmp_path), general="none", device="cpu",
                       locality_probes="none", method_overrides={"layers": "1", "num_steps": "2", "lr": "1e-3"})
    store = RunStore(tmp_path)
    calls = []
    from editors.registry import get_editor_class
    cls = get_editor_class("ft")
    original = cls.edit

    def edit(self, requests):
        calls.append(1)
        if len(calls) >= 2:
            self.config.lr = 3e38
        return original(self, requests)

    cls.edit = edit
    try:
        run_id = run_sequential(config, store, lm=tiny_llama)
    finally:
        cls.edit = original
    run = store.get_run(run_id)
    assert run["status"] == "diverged", run["error"]
    assert "overflow" in run["error"] and run["n_edits_done"] == 1
    assert len(store.edits_frame(run_id)) == 1
    assert all(torch_equal(p, snap[n]) for n, p in tiny_llama.model.named_parameters())


def torch_equal(a, b) -> bool:
    import torch
    return bool(torch.equal(a, b))


@pytest.mark.parametrize("value", ["nan", "NaN", float("nan")])
def test_nan_config_values_are_refused(value):
    from editors.base import ConfigError
    from editors.presets import build_config
    with pytest.raises(ConfigError, match="clamp_norm_factor.*NaN"):
        build_config("rome", "default", {"clamp_norm_factor": value})
    with pytest.raises(ConfigError, match="NaN"):
        build_config("memit", "default", {"mom2_update_weight": value})


# ---- 7. control characters; 6. size bounds and streaming -------------------------------------------------------
GOOD = {"prompt": "The Eiffel Tower is in", "subject": "The Eiffel Tower", "target_new": "Rome"}


@pytest.mark.parametrize("field,value", [("target_new", "Ro\x00me"), ("prompt", "The Eiffel Tower is\x1b[31m in"),
                                         ("subject", "The Eiffel\x07 Tower"), ("target_new", "Rome\nParis"),
                                         ("locality_answers", ["To\x00kyo"])])
def test_control_characters_are_refused_with_the_field(tmp_path, field, value):
    import json

    from editors.data import load_requests
    from editors.requests import RequestError
    rec = dict(GOOD, **{field: value})
    if field == "subject":
        rec["prompt"] = "The Eiffel\x07 Tower is in"
    if field == "locality_answers":
        rec["locality_prompts"] = ["The capital of Japan is"]
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(RequestError, match="control character") as info:
        load_requests(str(path))
    named = info.value.field_name
    assert named.split("[")[0] == field or (field == "subject" and named == "prompt")


def test_field_size_limits_name_the_record(tmp_path, monkeypatch):
    import json

    from editors.data import load_requests
    from editors.requests import RequestError
    path = tmp_path / "big.json"
    path.write_text(json.dumps([GOOD, dict(GOOD, prompt="The Eiffel Tower is in " + "x" * 20_000)]))
    with pytest.raises(RequestError, match=r"record 1.*'prompt'.*20,023 characters.*limit of 2,000"):
        load_requests(str(path))
    monkeypatch.setenv("EDITBENCH_MAX_PROMPT_CHARS", "30000")  # configurable
    assert len(load_requests(str(path))) == 2
    with pytest.raises(RequestError, match="target_new.*limit"):
        load_requests(_write(tmp_path / "t.jsonl", [dict(GOOD, target_new="Rome" * 100)]))


def _write(path, records) -> str:
    import json
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("ext", [".jsonl", ".csv"])
def test_n_records_are_read_from_a_huge_file_without_reading_it_whole(tmp_path, ext):
    """--n-edits 3 of a long file reads 3 records: the file's later bytes are never read (here they are 8 MB of
    bytes that are not UTF-8, which a whole-file read refuses)."""
    from editors.data import DataSourceError, load_requests
    path = tmp_path / f"many{ext}"
    with open(path, "wb") as fh:
        if ext == ".csv":
            fh.write(b"prompt,subject,target_new\n")
            fh.writelines(f"Person {i} lives in,Person {i},Rome\n".encode() for i in range(1000))
        else:
            fh.writelines(f'{{"prompt": "Person {i} lives in", "subject": "Person {i}", "target_new": "Rome"}}\n'
                          .encode() for i in range(1000))
        fh.write(b"\xff\xfe\n" * 3_000_000)
    reqs = load_requests(str(path), 3)
    assert [r.subject for r in reqs] == ["Person 0", "Person 1", "Person 2"]
    assert len(load_requests(str(path), 500)) == 500
    with pytest.raises(DataSourceError, match="not UTF-8"):  # reading on into the bad bytes still says so
        load_requests(str(path), 1001)


def test_an_over_long_jsonl_line_is_refused_before_parsing(tmp_path, monkeypatch):
    from editors.data import load_requests
    from editors.requests import RequestError
    monkeypatch.setenv("EDITBENCH_MAX_RECORD_KB", "64")
    path = tmp_path / "long.jsonl"
    with open(path, "w") as fh:
        fh.write('{"prompt": "A is in", "subject": "A", "target_new": "Rome"}\n')
        fh.write('{"prompt": "' + "y" * 200_000 + '"}\n')
    with pytest.raises(RequestError, match=r"record 1 \(line 2\).*over the limit of 64 KB"):
        load_requests(str(path))
    assert len(load_requests(str(path), 1)) == 1


def test_a_data_file_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    from editors.data import DataSourceError, load_requests
    monkeypatch.setenv("EDITBENCH_MAX_DATA_MB", "1")
    path = tmp_path / "big.json"
    path.write_text("[" + ",".join(['{"prompt": "A is in", "subject": "A", "target_new": "Rome"}'] * 30_000) + "]")
    with pytest.raises(DataSourceError, match=r"big.json: .*MB.*over the limit of 1 MB.*EDITBENCH_MAX_DATA_MB"):
        load_requests(str(path))


# ---- 10. precise messages: CSV -------------------------------------------------------------------------------
def test_a_zsre_csv_is_read_as_zsre(tmp_path):
    from editors.data import load_requests
    path = tmp_path / "z.csv"
    path.write_text("subject,src,alt,answers,rephrase,loc,loc_ans\n"
                    "Paris,What country is Paris in?,Italy,France,Where is Paris?,nq question: who,someone\n")
    (req,) = load_requests(f"zsre:{path}")
    assert req.target_new == "Italy" and req.target_true == "France"


def test_an_unterminated_csv_quote_is_reported_as_such(tmp_path):
    from editors.data import DataSourceError, load_requests
    path = tmp_path / "q.csv"
    path.write_text('prompt,subject,target_new\n"The Eiffel Tower is in,The Eiffel Tower,Rome\nA is in,A,B\n')
    with pytest.raises(DataSourceError, match="unterminated quote.*line 2"):
        load_requests(str(path))


def test_token_bounds_name_the_record(tiny_llama, monkeypatch):
    from app.engine import check_token_counts
    from editors.requests import RequestError, make_request
    ok = make_request(source="t", record=0, case_id="a", prompt="The Eiffel Tower is in", subject="The Eiffel Tower",
                      target_new="Rome")
    long = make_request(source="t", record=1, case_id="b", prompt="The Eiffel Tower is in " + "very " * 200,
                        subject="The Eiffel Tower", target_new="Rome")
    check_token_counts([ok, long], tiny_llama.tokenizer)
    monkeypatch.setenv("EDITBENCH_MAX_PROMPT_TOKENS", "100")
    with pytest.raises(RequestError, match=r"case_id b.*'prompt'.*tokens, over the limit of 100"):
        check_token_counts([ok, long], tiny_llama.tokenizer, source="f.json")


# ---- 10. precise messages: models and layers ------------------------------------------------------------------
def test_model_paths_get_precise_messages(tmp_path, capsys):
    from app.cli import main
    from app.store import DB_NAME
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "tokenizer.json").write_text("{}")
    runs = tmp_path / "runs"
    for model, expected in ((tmp_path / "no" / "such", "no such model directory"),
                            (empty, "has no config.json"), (empty / "tokenizer.json", "is a file, not a model")):
        code = main(["run", "--method", "unit-shift", "--model", str(model), "--runs-dir", str(runs),
                     "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Repo id" not in err, err
    assert not (runs / DB_NAME).exists() or RunStore(runs).list_runs().empty  # nothing was queued


def test_a_layer_out_of_range_is_a_usage_error_before_anything_runs(tmp_path, capsys, tiny_dir):
    from app.cli import main
    runs = tmp_path / "runs"
    code = main(["run", "--method", "unit-shift", "--model", tiny_dir, "--set", "layer=99", "--runs-dir", str(runs),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "layer 99 out of range" in err and "4 layers" in err, err
    assert RunStore(runs).list_runs().empty


# ---- 8. the app binds to this machine wherever it starts -------------------------------------------------------
def test_serve_command_sets_safe_options_unless_the_user_does():
    from app.serve import streamlit_command
    cmd = streamlit_command(["--server.port", "9999"])
    assert "--server.address=localhost" in cmd and "--browser.gatherUsageStats=false" in cmd
    assert cmd[-2:] == ["--server.port", "9999"]
    cmd = streamlit_command(["--server.address=0.0.0.0"])
    assert not any(a.startswith("--server.address=localhost") for a in cmd)
    assert "--browser.gatherUsageStats=false" in cmd


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) listening on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if int(p, 16) == port and state == "0A":
                out.add(addr)
    return out


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the listening sockets from /proc")
@pytest.mark.timeout(180)
def test_the_app_started_from_another_directory_listens_on_localhost_only(tmp_path):
    from tests.helpers import free_port, stop_process, wait_healthy
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root, EDITBENCH_RUNS=str(tmp_path / "runs"), EDITBENCH_NO_WORKER="1")
    proc = subprocess.Popen([sys.executable, "-m", "app", "ui", "--server.port", str(port),
                             "--server.fileWatcherType", "none"], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        healthy = wait_healthy(f"http://localhost:{port}", proc, 120)
        assert healthy, proc.stdout.read1().decode() if proc.poll() is not None else "not healthy"
        addrs = _listening(port)
        anywhere = {"00000000", "00000000000000000000000000000000"}
        assert addrs and not addrs & anywhere, addrs
    finally:
        stop_process(proc)
