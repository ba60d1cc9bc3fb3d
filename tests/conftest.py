"""Shared fixtures: tiny random models (unit tier) and the embedded default model (integration tier, loaded once)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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
