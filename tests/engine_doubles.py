"""Test doubles of the run engine: ``unit-shift``, a trivial registered editor (a seeded rank-1 update of one MLP
output matrix per call, with switches for failure modes), and in-memory edit requests and locality probes (the
``standins`` fixture of tests/conftest.py puts them in place of the data sources)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from editors.base import Editor, EditorConfig
from editors.fields import help_meta
from editors.registry import register
from editors.requests import make_request


@dataclass
class ShiftConfig(EditorConfig):
    version: ClassVar[int] = 1
    layer: int = field(default=1, metadata=help_meta("layer whose MLP output matrix is shifted"))
    scale: float = field(default=0.05, metadata=help_meta("size of the rank-1 update"))
    nan_at: int = field(default=0, metadata=help_meta("call number (1-based) whose update is NaN; 0 = never"))
    overflow_at: int = field(default=0, metadata=help_meta("from this call on, updates are 3e38 (weights overflow)"))
    nan_logits_at: int = field(default=0, metadata=help_meta("after this call, the unembedding outputs NaN"))
    fail_at: int = field(default=0, metadata=help_meta("call number that raises RuntimeError"))
    sleep: float = field(default=0.0, metadata=help_meta("seconds each call sleeps"))


@register
class ShiftEditor(Editor):
    name = "unit-shift"
    config_cls = ShiftConfig
    summary = "test editor: seeded rank-1 shifts"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls = 0
        self.applied = 0

    def edit(self, requests):
        self.calls += 1
        cfg = self.config
        if cfg.sleep:
            time.sleep(cfg.sleep)
        if self.calls == cfg.fail_at:
            raise RuntimeError("unit-shift was told to fail")
        name = self.spec.mlp_out_weight(cfg.layer)
        W = self.spec.to_canonical(dict(self.model.named_parameters())[name])
        g = torch.Generator().manual_seed(1000 * self.seed + self.calls)
        u = torch.randn(W.shape[0], 1, generator=g)
        v = torch.randn(1, W.shape[1], generator=g)
        delta = cfg.scale * u @ v
        if self.calls == cfg.nan_at:
            delta[0, 0] = float("nan")
        if cfg.overflow_at and self.calls >= cfg.overflow_at:
            delta = torch.full_like(delta, 3e38)
        return self._result(deltas={name: self.spec.to_param_layout(delta).contiguous()},
                            info={"call": self.calls, "norm": float(delta.norm()), "per_layer": {str(cfg.layer): 1.0}},
                            artifacts={"u": u.squeeze(1)})

    state_in_store = False  # the counters are for resume snapshots only (no editor_state artifacts)

    def state_dict(self):  # the call counter seeds the shifts: a resumed run continues it
        return {"calls": torch.tensor(self.calls), "applied": torch.tensor(self.applied)}

    def load_state_dict(self, state):
        self.calls, self.applied = int(state["calls"]), int(state["applied"])

    def after_apply(self, requests, result):
        self.applied += 1
        if self.applied == self.config.nan_logits_at:  # simulates a model whose forward pass blows up
            self.nan_hook = self.model.get_output_embeddings().register_forward_hook(
                lambda module, args, output: torch.full_like(output, float("nan")))


def make_requests(n: int = 8):
    return [make_request(source="unit", record=i, case_id=f"c{i}", prompt=f"The capital of Zorland{i} is",
                         subject=f"Zorland{i}", target_new="Paris", target_true="Rome",
                         rephrase_prompts=[f"Zorland{i} has its capital in"],
                         locality_prompts=["The colour of the sky is"], locality_answers=["blue"])
            for i in range(n)]


PROBES = [("Water freezes at zero", "degrees"), ("The opposite of hot is", "cold"), ("One plus one is", "two")]


