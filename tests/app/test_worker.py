"""The job queue and the worker process: one job at a time per device, cancel, a failing job, a dying worker."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from app import backend
from app.jobs import JobQueue
from app.store import RunStore
from app.worker import Worker, ensure_worker, worker_alive
from tests.app.conftest import FACT, ROOT, TINY_FT


def _wait(predicate, timeout: float = 120.0, every: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


def _worker_proc(runs_dir: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)  # as ensure_worker starts it
    return subprocess.Popen([sys.executable, "-m", "app.worker", "--runs-dir", runs_dir, "--poll", "0.2", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_queue_claims_oldest_per_device_and_cancels(tmp_path):
    q = JobQueue(str(tmp_path))
    a = q.submit("playground", {"n": 1})
    b = q.submit("playground", {"n": 2}, device="cuda")
    c = q.submit("playground", {"n": 3})
    assert q.cancel(c) == "cancelled"
    job = q.claim("auto", os.getpid())
    assert job.job_id == a and job.status == "running"
    assert q.claim("auto", os.getpid()) is None  # c was cancelled; b belongs to another device
    assert q.claim("cuda", os.getpid()).job_id == b
    assert q.cancel(a) == "running" and q.cancel_requested(a)
    q.finish(a, "cancelled")
    assert q.get(a).status == "cancelled"
    assert set(q.list_jobs()["job_id"]) == {a, b, c}


def test_one_worker_per_device(tmp_path):
    first = Worker(str(tmp_path))
    assert first.acquire()
    try:
        assert worker_alive(str(tmp_path))
        assert Worker(str(tmp_path)).serve(max_jobs=1) == 0  # a second worker for the same device leaves at once
        assert not worker_alive(str(tmp_path), "cpu")
    finally:
        first.release()
    assert not worker_alive(str(tmp_path))


def test_cancel_a_running_run_keeps_its_rows(tmp_path, monkeypatch, tiny_dir):
    """The engine stops after its current step; run and job end ``cancelled``; the steps made stay in the store."""
    from app import engine
    from editors.requests import make_request
    reqs = [make_request(source="t", record=i, case_id=f"c{i}", prompt=f"Person {i} lives in the city of",
                         subject=f"Person {i}", target_new="Rome", target_true="Paris") for i in range(400)]
    monkeypatch.setattr(engine, "load_requests", lambda source, n: reqs[:n])
    store, queue = RunStore(str(tmp_path)), JobQueue(str(tmp_path))
    run_id, job_id = backend.submit_run(store, queue, {
        "model": tiny_dir, "method": "ft", "method_overrides": TINY_FT, "n_edits": 400, "eval_every": 0,
        "general": "none", "locality_probes": "none", "weights": False, "pre_eval": False}, start_worker=False)
    worker = Worker(str(tmp_path), poll=0.1)
    thread = threading.Thread(target=worker.serve, kwargs={"max_jobs": 1}, daemon=True)
    thread.start()
    _wait(lambda: store.get_run(run_id)["n_edits_done"] >= 2)
    backend.cancel_run(store, queue, run_id)
    thread.join(120)
    assert not thread.is_alive()
    run = store.get_run(run_id)
    assert run["status"] == "cancelled" and queue.get(job_id).status == "cancelled"
    assert 2 <= len(store.edits_frame(run_id)) < 400
    assert len(store.metrics_frame([run_id], kinds=["edit"])) > 0


def test_failing_run_marks_job_and_run_failed_with_the_error(tmp_path, tiny_dir):
    """A run whose data cannot be loaded fails in the worker process; the error reaches the job and the run."""
    store, queue = RunStore(str(tmp_path)), JobQueue(str(tmp_path))
    missing = str(tmp_path / "no-such-edits.json")
    run_id, job_id = backend.submit_run(store, queue, {"model": tiny_dir, "method": "ft", "data": missing,
                                                      "method_overrides": TINY_FT, "n_edits": 2},
                                        start_worker=False, data_roots=[str(tmp_path)])
    proc = _worker_proc(str(tmp_path), "--max-jobs", "1")
    out, _ = proc.communicate(timeout=300)
    job = queue.get(job_id)
    assert job.status == "failed", out.decode()[-2000:]
    run = store.get_run(run_id)
    assert run["status"] == "failed" and run["error"]
    assert "no-such-edits" in job.error and "no-such-edits" in run["error"]
    progress = backend.run_progress(store, queue, run_id)
    assert progress.status == "failed" and progress.error


def test_dead_worker_marks_its_job_failed_with_the_log_tail(tmp_path, tiny_dir):
    """SIGKILL the worker mid-job: the app's housekeeping marks the job failed and shows the worker's log."""
    queue = JobQueue(str(tmp_path))
    store = RunStore(str(tmp_path))
    job_id = backend.submit_playground(queue, {"model": tiny_dir, "method": "ft", "request": FACT,
                                               "overrides": {"layers": "1", "num_steps": "100000",
                                                             "early_stop_loss": "0"}}, start_worker=False)
    pid = ensure_worker(str(tmp_path), "auto")
    assert pid
    try:
        _wait(lambda: queue.get(job_id).status == "running")
        assert worker_alive(str(tmp_path))
        assert ensure_worker(str(tmp_path), "auto") is None  # one worker per device
    finally:
        os.kill(pid, signal.SIGKILL)
    _wait(lambda: not worker_alive(str(tmp_path)), timeout=30)
    try:  # reap it (it was started in its own session; we are its parent)
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    os.environ["EDITBENCH_NO_WORKER"] = "1"
    try:
        backend.housekeeping(store, queue)
    finally:
        del os.environ["EDITBENCH_NO_WORKER"]
    job = queue.get(job_id)
    assert job.status == "failed"
    assert f"pid {pid}" in job.error and "died" in job.error
    assert "serving" in job.error  # the tail of the worker's log


@pytest.mark.slow
def test_worker_uses_the_engine_like_the_cli(tmp_path, tiny_dir):
    """A run through the worker process records the rows ``python -m app run`` records."""
    import json
    data = tmp_path / "edits.json"
    data.write_text(json.dumps([{**FACT, "case_id": f"t{i}"} for i in range(3)]))
    store, queue = RunStore(str(tmp_path)), JobQueue(str(tmp_path))
    run_id, job_id = backend.submit_run(store, queue, {"model": tiny_dir, "method": "ft", "data": str(data),
                                                      "method_overrides": TINY_FT, "n_edits": 3, "eval_every": 1,
                                                      "locality_probes": "builtin"}, start_worker=False,
                                        data_roots=[str(tmp_path)])
    proc = _worker_proc(str(tmp_path), "--max-jobs", "1")
    out, _ = proc.communicate(timeout=300)
    assert queue.get(job_id).status == "finished", out.decode()[-3000:]
    run = store.get_run(run_id)
    assert run["status"] == "finished" and run["n_edits_done"] == 3 and run["model"] == tiny_dir
    kinds = set(store.metrics_frame([run_id])["kind"])
    assert {"edit", "retention"} <= kinds
