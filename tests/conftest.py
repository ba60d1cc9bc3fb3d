"""Shared fixtures: tiny random models (unit tier) and the embedded default model (integration tier, loaded once).

The product loads models by name or path only; a test that needs a tiny model in another process (the CLI, the
worker, the web app) saves one with ``tiny_dir`` and names that directory like any model.
"""
from __future__ import annotations

import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: reference data beside the project (never copied into it)
SHARED_DATA = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_path(*parts: str) -> str:
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"reference data not found: {path}")
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    from editors.testing import tiny_model
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from editors.testing import tiny_model
    return tiny_model("gpt2")


@pytest.fixture()
def standins(monkeypatch):
    """The engine's requests and locality probes from memory (tests/engine_doubles.py), not from a data source."""
    import app.engine as engine
    from tests.engine_doubles import PROBES, make_requests
    requests = make_requests()
    monkeypatch.setattr(engine, "load_requests", lambda source, n: requests[:n])
    monkeypatch.setattr(engine, "builtin_probes", lambda: list(PROBES))
    return requests


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_llama) -> str:
    """``tiny_llama`` saved as a model directory (``load_model(tiny_dir)`` loads the same weights)."""
    import copy
    path = tmp_path_factory.mktemp("tiny-llama")
    # a copy: save_pretrained fills in config fields (dtype, architectures) that the session model's fingerprint
    # covers, and later tests that compute statistics on it would then refuse it as edited
    copy.deepcopy(tiny_llama.model).save_pretrained(path)
    tiny_llama.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def default_lm():
    """The embedded default model, loaded once per test session. Tests that edit it must undo their edits."""
    from editors.models import load_model
    return load_model("default", device="cpu")


@pytest.fixture()
def clean_default_lm(default_lm):
    """The default model, checked to be bit-identical to its loaded state after the test."""
    before = {n: p.detach().clone() for n, p in default_lm.model.named_parameters()
              if ".mlp." in n or ".self_attn." in n}
    yield default_lm
    changed = [n for n, p in default_lm.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    if changed:
        params = dict(default_lm.model.named_parameters())
        with torch.no_grad():
            for n in changed:
                params[n].copy_(before[n])
        pytest.fail(f"test left the shared default model edited: {changed[:3]}")
