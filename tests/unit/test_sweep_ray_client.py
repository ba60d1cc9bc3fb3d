"""A sweep driven from outside a Ray cluster (Ray Client, ``--address ray://HOST:PORT``).

A head node is started as a user would (``ray start --head --ray-client-server-port``, in its own folder, without
this checkout on its ``PYTHONPATH``), and the driver runs in another process. What is checked: the library's code
travels with the job (the trials import it from Ray's runtime resources, not from the checkout), the writer keeps
its shard on the cluster and the driver merges it into the local store at the end (every run, edit row, metric row
and artifact), and the trials' results match the store.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from app.store import RunStore

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
pytest.importorskip("grpc", reason="Ray Client needs ray[client] (grpcio)")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    exe = shutil.which("ray")
    if exe is None:  # pragma: no cover - Ray installed without its CLI
        pytest.skip("the `ray` command is not on PATH")
    if ray.is_initialized():
        ray.shutdown()
    home = tmp_path_factory.mktemp("ray-head")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    client_port = _free_port()
    cmd = [exe, "start", "--head", f"--port={_free_port()}", f"--ray-client-server-port={client_port}",
           "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"]
    done = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:  # pragma: no cover - a machine where Ray cannot start
        pytest.skip(f"`ray start --head` failed here: {done.stderr[-500:]}")
    try:
        yield f"ray://127.0.0.1:{client_port}"
    finally:
        subprocess.run([exe, "stop", "--force"], cwd=home, env=env, capture_output=True, timeout=120)


DRIVER = textwrap.dedent("""
    import json, sys
    from app.sweep import run_sweep
    spec, runs, address = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    res = run_sweep(spec, runs, executor="ray", address=address, cpus_per_trial=1)
    print(json.dumps({"client": res.info["client"], "store_path": res.info["store_path"],
                      "status": res.trials["status"].tolist(), "run_id": res.trials["run_id"].tolist(),
                      "code": [r.get("code") for r in res.info["results"]],
                      "run_ids": [r["run_id"] for r in res.info["results"]]}))
""")


@pytest.mark.timeout(600)  # a head node, the client server and cold workers: ~30-60 s on the 2-core machine
def test_ray_client_sweep_ships_code_and_merges_the_cluster_shard(ray_head, tiny_dir, tmp_path):
    runs = tmp_path / "runs"
    spec = {"name": "client", "model": tiny_dir, "methods": ["rome"], "n_edits": 3, "eval_every": 2, "seeds": [0, 1],
            "run": {"general": "none", "cache_dir": str(tmp_path / "cache"), "device": "cpu"},
            "overrides": {"layer": 1, "mom2_n_tokens": 2000}}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": ROOT}  # Ray 2.60's `ray start` turns tokens on
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec), str(runs), ray_head], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["client"] is True
    assert out["status"] == ["finished", "finished"]
    # the code the trials ran: this checkout's packages as Ray shipped them, not an installed copy
    assert len(out["code"]) == 2
    for code in out["code"]:
        assert "runtime_resources" in code and not code.startswith(ROOT), code
    # the writer wrote a shard on the cluster, not the local store; the driver merged it at the end
    store = RunStore(runs)
    assert os.path.realpath(out["store_path"]) != os.path.realpath(store.path)
    assert sorted(store.list_runs()["run_id"]) == sorted(out["run_id"]) == sorted(out["run_ids"])
    for run_id in out["run_id"]:
        run = store.get_run(run_id)
        assert run["status"] == "finished" and run["n_edits_done"] == 3
        assert len(store.edits_frame(run_id)) == 3
        kinds = set(store.metrics_frame([run_id])["kind"])
        assert {"pre", "edit", "retention", "weights", "weights_unedited"} <= kinds
        assert len(store.list_artifacts(run_id)) > 0
