"""Hidden-state capture on a tiny model and projection-free shift numbers with known answers."""
import numpy as np
import pytest
import torch

from analysis.hidden import (
    capture_states,
    linear_cka,
    mean_cosine_shift,
    mmd_rbf,
    project,
    project_groups,
    shift_frame,
    shift_metrics,
    single_vs_cumulative_frame,
)
from editors.hooks import Trace

PROMPTS = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of", "Toko Yasuda plays the"]
SUBJECTS = ["Danielle Darrieux", "Paris", "Toko Yasuda"]


def reference_states(lm, prompt, layer):
    """Full-sequence states of one unpadded prompt at a layer's output."""
    name = lm.spec.layer(layer)
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad(), Trace(lm.model, [name], retain_output=True) as tr:
        lm.model(input_ids=ids)
    return tr.outputs[name][0].numpy(), ids[0].tolist()


def test_capture_states_positions(tiny_llama):
    lm = tiny_llama
    last = capture_states(lm, PROMPTS, 2, "last")
    assert last.shape == (3, lm.spec.hidden_size) and last.dtype == np.float32
    subj = capture_states(lm, PROMPTS, 2, "subject_last", SUBJECTS)
    rel = capture_states(lm, PROMPTS, 2, "relation", SUBJECTS)
    for i, p in enumerate(PROMPTS):
        H, ids = reference_states(lm, p, 2)
        assert np.allclose(last[i], H[-1], atol=1e-5)  # padding of the batch changes nothing
        # last subject token: the prefix up to the end of the subject, tokenised alone, ends there
        end = len(lm.tokenizer(p[:p.find(SUBJECTS[i]) + len(SUBJECTS[i])])["input_ids"]) - 1
        assert np.allclose(subj[i], H[end], atol=1e-5)
        assert not np.allclose(rel[i], subj[i])
    # negative layers count from the end
    assert np.allclose(capture_states(lm, PROMPTS, -1), capture_states(lm, PROMPTS, lm.spec.n_layers - 1))
    with pytest.raises(ValueError, match="subject"):
        capture_states(lm, PROMPTS, 1, "subject_last")
    with pytest.raises(ValueError, match="not found"):
        capture_states(lm, PROMPTS[:1], 1, "relation", ["Nobody"])


def test_capture_states_gpt2(tiny_gpt2):
    X = capture_states(tiny_gpt2, PROMPTS, 0, "relation", SUBJECTS, batch_size=2)
    assert X.shape == (3, tiny_gpt2.spec.hidden_size) and np.isfinite(X).all()


def test_linear_cka_identity_rotation_and_scale():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 20))
    assert linear_cka(X, X) == pytest.approx(1.0)
    Q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    assert linear_cka(X, 3.5 * X @ Q) == pytest.approx(1.0)
    assert linear_cka(X, X + 7.0) == pytest.approx(1.0)  # centring
    wide = rng.normal(size=(10, 40))  # n < d: the Gram form
    assert linear_cka(wide, -2 * wide) == pytest.approx(1.0)
    assert linear_cka(X, rng.normal(size=(50, 20))) < 0.6


def test_mmd_and_cosine_shift():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 6))
    assert mmd_rbf(X, X) == pytest.approx(0.0, abs=1e-12)
    same = mmd_rbf(X, rng.normal(size=(80, 6)))
    shifted = mmd_rbf(X, rng.normal(size=(80, 6)) + 1.5)
    assert shifted > 0.05 and shifted > 5 * same
    assert mmd_rbf(X, X + 1.5, squared=False) == pytest.approx(np.sqrt(mmd_rbf(X, X + 1.5)))
    assert mean_cosine_shift(X, 2 * X) == pytest.approx(0.0, abs=1e-12)
    assert mean_cosine_shift(X, -X) == pytest.approx(2.0)
    m = shift_metrics(X, X)
    assert m == pytest.approx({"mean_cosine_shift": 0.0, "linear_cka": 1.0, "mmd_rbf": 0.0}, abs=1e-9)
    df = shift_frame(X, X + 1, n_edits=10, layer=3)
    assert list(df.columns) == ["n_edits", "layer", "position", "metric", "value"] and len(df) == 3


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_projections_are_joint(method):
    rng = np.random.default_rng(2)
    before = rng.normal(size=(25, 30))
    after = before + 4.0
    df = project(before, after, method=method, seed=0)
    assert list(df.columns) == ["x", "y", "which", "idx"]
    assert len(df) == 50 and list(df["which"].unique()) == ["before", "after"]
    assert sorted(df[df["which"] == "after"]["idx"]) == list(range(25))
    if method == "pca":  # the shift is the main direction of the joint data: the groups separate on x
        b, a = df[df["which"] == "before"]["x"], df[df["which"] == "after"]["x"]
        assert (b.max() < a.min()) or (a.max() < b.min())
    again = project(before, after, method=method, seed=0)
    assert np.allclose(df[["x", "y"]], again[["x", "y"]])


def test_single_vs_cumulative_frame():
    rng = np.random.default_rng(3)
    df = single_vs_cumulative_frame(rng.normal(size=(6, 5)), rng.normal(size=(6, 5)),
                                    unedited=rng.normal(size=(6, 5)), method="pca")
    assert list(df["which"].unique()) == ["unedited", "single update", "cumulative update"]
    with pytest.raises(ValueError, match="projection"):
        project_groups({"a": rng.normal(size=(5, 3))}, method="mds")
