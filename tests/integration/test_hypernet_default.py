"""AGRADE on the embedded default model (SmolLM2-135M): a short hypernetwork training run (a few minutes on 2 CPU
cores) on CounterFact train from ../shared/data makes batch edits of HELD-IN records succeed far more often than the
untrained hypernetwork does (ES = teacher-forced reliability, EVALUATION.md ``tf_token_acc``). The checkpoint goes to
a temporary cache; every batch edit is undone (``clean_default_lm`` checks that bit for bit). The longer run with
held-out and CounterFact edit-split figures is ``benchmarks/bench_hypernet.py``.
"""
from __future__ import annotations

import os

import pytest

from app.train import train_hypernet, validate_edits
from editors.base import make_config
from editors.data import load_requests
from editors.registry import get_editor_class

pytestmark = pytest.mark.slow

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "counterfact",
                     "counterfact-train.json")
STEPS = 24  # meta steps of 4 records; the first 8 records (seen in steps 1-2) are the held-in set
OVERRIDES = {"n_edits": 4, "meta_lr": 1e-3}


# 24 meta steps on the default model: 464 s on the shared 2-core machine (load ~8, 2026-12-01)
@pytest.mark.timeout(1200)
def test_short_agrade_training_beats_the_untrained_hypernetwork(clean_default_lm, tmp_path):
    if not os.path.exists(TRAIN):
        pytest.skip(f"CounterFact train split not found at {TRAIN} (../shared/data)")
    lm, data, cache = clean_default_lm, "counterfact:" + TRAIN, str(tmp_path / "cache")
    cls = get_editor_class("agrade")
    held = load_requests(data, 8, skip_invalid=True)
    untrained = cls(lm, make_config(cls.config_cls, {**OVERRIDES, "allow_untrained": True}, method="agrade"),
                    cache_dir=cache)
    before = validate_edits(lm, untrained, held)

    out = train_hypernet(lm, "agrade", OVERRIDES, data, steps=STEPS, eval_every=STEPS, n_val=0, cache_dir=cache,
                         progress=False)
    assert out["step"] == STEPS and len(out["history"]) == STEPS
    # the checkpoint is found automatically by an editor with the same model and config
    trained = cls(lm, make_config(cls.config_cls, OVERRIDES, method="agrade"), cache_dir=cache)
    after = validate_edits(lm, trained, held)
    assert after["ES"] >= before["ES"] + 0.4, f"untrained {before}, after {STEPS} steps {after}"
