"""Covariance statistics C = E[k kᵀ] (editors/stats.py) on tiny random models."""
from __future__ import annotations

import os

import pytest
import torch

from editors import stats
from editors.hooks import Trace
from editors.testing import tiny_model


@pytest.fixture()
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


def test_layer_covariance_symmetric_psd_and_cached(cache_dir, monkeypatch):
    lm = tiny_model("gpt2")
    Cs = stats.layer_covariances(lm, [1, 2], n_tokens=2000, seq_len=128, cache_dir=cache_dir)
    assert set(Cs) == {1, 2}
    for C in Cs.values():
        assert C.shape == (lm.spec.mlp_size, lm.spec.mlp_size) and C.dtype == torch.float32
        torch.testing.assert_close(C, C.T)
        assert torch.linalg.eigvalsh(C.double()).min() > -1e-6 * C.abs().max()
    files = sorted(f for _, _, fs in os.walk(cache_dir) for f in fs if f.endswith(".safetensors"))
    assert len(files) == 2

    def boom(*a, **k):
        raise AssertionError("statistics were recomputed instead of read from the cache")

    monkeypatch.setattr(stats, "corpus_windows", boom)
    C1 = stats.layer_covariance(lm, 1, n_tokens=2000, seq_len=128, cache_dir=cache_dir, dtype=torch.float64)
    assert C1.dtype == torch.float64
    torch.testing.assert_close(C1.float(), Cs[1])


def test_layer_covariance_matches_a_direct_computation(cache_dir):
    lm = tiny_model("llama")
    C = stats.layer_covariance(lm, 1, n_tokens=256, seq_len=128, cache_dir=cache_dir, dtype=torch.float64)
    windows = stats.corpus_windows(lm.tokenizer, stats.builtin_corpus_text(), 256, 128)
    name = lm.spec.mlp_out_module(1)
    with Trace(lm.model, [name], retain_input=True) as tr, torch.no_grad():
        lm.model(input_ids=windows)
    K = tr.inputs[name].reshape(-1, lm.spec.mlp_size).double()
    torch.testing.assert_close(C, K.T @ K / K.shape[0], rtol=1e-5, atol=1e-7)
    # the token count of the cached C (layer 2 is computed on the way), so that C * count is the raw sum
    counts = stats.covariance_token_counts(lm, [1, 2], n_tokens=256, seq_len=128, cache_dir=cache_dir)
    assert counts == {1: K.shape[0], 2: K.shape[0]} and K.shape[0] == windows.numel() == 256
    assert stats.corpus_id("builtin").startswith("pydoc-")


def test_layer_covariance_refuses_an_edited_model(cache_dir):
    lm = tiny_model("llama", seed=5)
    W = lm.model.get_parameter(lm.spec.mlp_out_weight(0))
    with torch.no_grad():
        W.add_(1.0)
    try:
        with pytest.raises(RuntimeError, match="unedited"):
            stats.layer_covariance(lm, 0, n_tokens=256, seq_len=128, cache_dir=cache_dir)
    finally:
        with torch.no_grad():
            W.sub_(1.0)


def test_layer_covariance_user_corpus(tmp_path, cache_dir):
    lm = tiny_model("llama")
    path = tmp_path / "my corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    C = stats.layer_covariance(lm, 1, corpus=str(path), n_tokens=256, seq_len=64, cache_dir=cache_dir)
    assert C.shape == (lm.spec.mlp_size, lm.spec.mlp_size)
    with pytest.raises(FileNotFoundError):
        stats.layer_covariance(lm, 1, corpus=str(tmp_path / "missing.txt"), cache_dir=cache_dir)


def test_builtin_corpus_is_large_prose():
    text = stats.builtin_corpus_text()
    assert len(text) > 300_000 and "the" in text
