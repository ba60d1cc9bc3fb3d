"""One hook context manager that always cleans up (after rome's ``nethook.Trace``).

``Trace(model, names, retain_input=..., retain_output=..., edit_output=fn)`` registers forward hooks on the named
modules for the duration of a ``with`` block and removes them on exit, also on exceptions. ``edit_output`` may
return a replacement output (used to add the value delta during target optimisation).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Sequence

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to stop the forward pass early (nothing above the traced layer is computed)."""


class Trace:
    def __init__(self, model: nn.Module, names: Iterable[str], *, retain_input: bool = False,
                 retain_output: bool = False, edit_output: Callable | None = None, stop_after: str | None = None,
                 detach: bool = True):
        self.model = model
        self.names = list(names)
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.edit_output = edit_output
        self.stop_after = stop_after
        self.detach = detach
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def fn(module, args, output):
            if self.retain_input:
                x = args[0] if args else None
                if x is not None:
                    self.inputs[name] = x.detach() if self.detach else x
            if self.edit_output is not None:
                new = self.edit_output(name, output)
                if new is not None:
                    output = new
            if self.retain_output:
                o = output[0] if isinstance(output, tuple) else output
                self.outputs[name] = o.detach() if self.detach else o
            if self.stop_after == name:
                raise StopForward()
            return output
        return fn

    def __enter__(self) -> "Trace":
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return exc_type is StopForward


@contextmanager
def no_grad_eval(model: nn.Module):
    """Eval mode and no grad for the block; restores the training flag."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


@contextmanager
def output_grad_leaves(model: nn.Module, names: Sequence[str]):
    """Trace ``names`` (inputs retained) with a zero leaf that requires grad added to each module's output (the
    first element of a tuple output), grad enabled and the model in eval mode (its training flag restored after).

    Yields ``(trace, leaves)``: ``torch.autograd.grad(loss, [leaves[n] for n in names])`` are the gradients of the
    loss with respect to the modules' outputs, and no weight is touched.
    """
    leaves: dict[str, torch.Tensor] = {}

    def add_leaf(name, output):
        o = output[0] if isinstance(output, tuple) else output
        leaf = torch.zeros_like(o, requires_grad=True)
        leaves[name] = leaf
        return (o + leaf, *output[1:]) if isinstance(output, tuple) else o + leaf

    was = model.training
    model.eval()
    try:
        with torch.enable_grad(), Trace(model, names, retain_input=True, edit_output=add_leaf) as tr:
            yield tr, leaves
    finally:
        model.train(was)


@contextmanager
def frozen_prefix(model: nn.Module, layers_path: str, n_frozen: int, run: Callable[[], object]):
    """Skip blocks ``0 .. n_frozen-1`` in repeated forward passes on the SAME inputs.

    ``run()`` makes one forward pass (grad off, the model's current hooks active); the output block ``n_frozen-1``
    returned in it is kept, and inside the ``with`` block every one of blocks ``0 .. n_frozen-1`` returns that kept
    output instead of computing (the blocks below ``n_frozen`` see nothing that changes between the passes, so a
    forward pass inside gives what the full one gives, and costs only the blocks from ``n_frozen`` on). The caller
    guarantees that every forward inside uses the inputs ``run`` used and that nothing below block ``n_frozen``
    changes; the blocks' ``forward`` is restored on exit, also on exceptions. ``n_frozen <= 0``: nothing is skipped.
    """
    blocks = model.get_submodule(layers_path)
    if n_frozen <= 0:
        yield
        return
    if n_frozen > len(blocks):
        raise ValueError(f"frozen_prefix: {n_frozen} blocks asked, the model has {len(blocks)}")
    kept: list = []  # block n_frozen-1's whole output (tuple or tensor), computed under no_grad
    last = f"{layers_path}.{n_frozen - 1}"
    with torch.no_grad(), Trace(model, [last], edit_output=lambda name, output: kept.append(output),
                                stop_after=last):
        run()
    if not kept:
        raise RuntimeError(f"frozen_prefix: block {n_frozen - 1} of {layers_path} was not called by run()")
    out = kept[0]
    saved = [(b, b.__dict__.get("forward")) for b in blocks[:n_frozen]]
    try:
        for b, _ in saved:
            b.forward = lambda *args, **kwargs: out
        yield
    finally:
        for b, own in saved:
            if own is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = own
