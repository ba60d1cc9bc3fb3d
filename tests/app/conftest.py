"""Fixtures of the app tests: run stores with synthetic runs (rows written directly, no model) and an AppTest
factory pointed at them with the worker autostart off (tests run the worker themselves when they need one)."""
from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN = os.path.join(ROOT, "app", "main.py")

#: the request the tests edit with (typed, so it does not depend on the built-in fact set)
FACT = {"case_id": "t0", "prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
        "target_new": "Rome", "target_true": "Paris", "rephrase_prompts": ["Where is the Eiffel Tower? It is in"],
        "locality_prompts": ["The capital of Japan is"], "locality_answers": ["Tokyo"]}

#: ft on a 4-layer tiny model: layer 1, a few steps (the default layer 20 does not exist there)
TINY_FT = {"layers": "1", "num_steps": "3"}


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
    """A store with two finished synthetic runs: ROME (hidden states, GeoEdit-style artifacts, a collapse marker)
    and FT (no hidden states). Returns (runs_dir, rome_run_id, ft_run_id)."""
    from app.store import RunStore
    from tests.fixtures import synthetic_run
    path = str(tmp_path_factory.mktemp("runs-synthetic"))
    store = RunStore(path)
    rome = synthetic_run(store, method="rome", n_edits=30, eval_every=10, geoedit=True, collapse_at=20, seed=0)
    ft = synthetic_run(store, method="ft", n_edits=30, eval_every=10, hidden=False, seed=1, label="baseline")
    return path, rome, ft


@pytest.fixture()
def app_env(monkeypatch, tiny_dir):
    """Set the app's environment: ``app_env(runs_dir)``; the worker never autostarts; the tiny model's directory
    (``tiny_dir``) is a model choice."""
    def set_env(runs_dir: str) -> None:
        monkeypatch.setenv("EDITBENCH_RUNS", runs_dir)
        monkeypatch.setenv("EDITBENCH_NO_WORKER", "1")
        monkeypatch.setenv("EDITBENCH_MODELS", tiny_dir)
    return set_env


@pytest.fixture()
def make_app(app_env):
    """``make_app(runs_dir, page=None, query=None)`` -> an AppTest that has run once (on ``page`` if given)."""
    from streamlit.testing.v1 import AppTest

    def make(runs_dir: str, page: str | None = None, query: dict | None = None, timeout: float = 60):
        app_env(runs_dir)
        at = AppTest.from_file(MAIN, default_timeout=timeout)
        for k, v in (query or {}).items():
            at.query_params[k] = v
        at.run()
        if page is not None:
            at.switch_page(f"../pages/{page}")
            for k, v in (query or {}).items():
                at.query_params[k] = v
            at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at
    return make


def plotly_specs(at) -> list[dict]:
    """The figures' JSON of every plotly chart on the page."""
    import json
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def trace_names(at) -> list[set]:
    return [{t.get("name") for t in spec["data"]} for spec in plotly_specs(at)]
