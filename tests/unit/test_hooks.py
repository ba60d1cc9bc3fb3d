"""editors/hooks.py: output_grad_leaves, the gradients of a loss with respect to traced modules' outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from editors.hooks import Trace, frozen_prefix, output_grad_leaves


class _Pair(nn.Module):
    """A module with a tuple output (as some decoder layers return): ``(W x, sum x)``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.lin(x), x.sum()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = _Pair()
        self.head = nn.Linear(2, 1, bias=False)

    def forward(self, x):
        y, _ = self.pair(x)
        return self.head(torch.tanh(y)).sum()


def test_leaves_give_output_gradients_and_touch_nothing():
    torch.manual_seed(0)
    net = _Net().train()
    x = torch.randn(4, 3)
    with torch.no_grad():  # the leaves enable grad themselves
        with output_grad_leaves(net, ["pair", "pair.lin"]) as (tr, leaves):
            assert not net.training  # eval mode inside
            loss = net(x)
            g_pair, g_lin = torch.autograd.grad(loss, [leaves["pair"], leaves["pair.lin"]])
    assert net.training  # the training flag is restored
    # d loss / d y for y = W x: head.weight * (1 - tanh(y)^2), by hand
    y = x @ net.pair.lin.weight.detach().T
    manual = net.head.weight.detach() * (1 - torch.tanh(y) ** 2)
    assert torch.allclose(g_pair, manual, atol=1e-6) and torch.allclose(g_lin, manual, atol=1e-6)
    assert not torch.allclose(g_pair, net.head.weight.detach().expand(4, 2))  # wrong variant: without tanh'
    assert torch.equal(tr.inputs["pair"], x)  # inputs retained
    assert all(p.grad is None for p in net.parameters())  # no weight gradient accumulated


# ---- frozen_prefix -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("n_frozen", [1, 2, 3])
def test_frozen_prefix_gives_the_full_forward_and_its_gradient(arch, n_frozen, request):
    """Inside, the model's output and the gradient w.r.t. a leaf at block ``n_frozen``'s MLP output equal the full
    forward's; fails if the kept output were another block's (n_frozen or n_frozen-2), or were recomputed with
    different inputs."""
    lm = request.getfixturevalue(arch)
    model, spec = lm.model, lm.spec
    ids = torch.tensor([[5, 17, 3, 42, 8, 11]])
    site = spec.mlp_out_module(n_frozen)

    def loss_and_grad():
        v = torch.zeros(spec.hidden_size, requires_grad=True)

        def add(name, out):
            o = out[0] if isinstance(out, tuple) else out
            o = o.clone()
            o[0, 2] = o[0, 2] + v
            return (o, *out[1:]) if isinstance(out, tuple) else o
        with torch.enable_grad(), Trace(model, [site], edit_output=add):
            h = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            loss = (h ** 2).sum() + h[0, -1].sum()
            (g,) = torch.autograd.grad(loss, [v])
        return h.detach(), g

    model.eval()
    h_full, g_full = loss_and_grad()
    calls = []
    blk = model.get_submodule(spec.layers_path)
    probe = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blk)]
    try:
        with frozen_prefix(model, spec.layers_path, n_frozen,
                           lambda: model.base_model(input_ids=ids, use_cache=False)):
            calls.clear()
            h, g = loss_and_grad()
            h2, _ = loss_and_grad()  # the kept output is reused, not consumed
    finally:
        for p in probe:
            p.remove()
    assert torch.allclose(h, h_full, atol=1e-6, rtol=1e-5) and torch.allclose(g, g_full, atol=1e-6, rtol=1e-5)
    assert torch.equal(h, h2)
    # the frozen blocks' hooks still fire (their forward is replaced, not their call), the output is the kept one
    assert calls.count(0) == 2
    assert all("forward" not in b.__dict__ for b in blk)  # restored


def test_frozen_prefix_skips_the_compute_restores_on_error_and_checks_its_argument(tiny_llama):
    model, spec = tiny_llama.model, tiny_llama.spec
    ids = torch.tensor([[5, 17, 3]])
    blocks = model.get_submodule(spec.layers_path)
    seen = []
    handles = [blocks[i].mlp.register_forward_hook(lambda m, a, o, i=i: seen.append(i)) for i in range(len(blocks))]
    try:
        with pytest.raises(KeyError):
            with frozen_prefix(model, spec.layers_path, 2, lambda: model(input_ids=ids)):
                seen.clear()
                with torch.no_grad():
                    model(input_ids=ids)
                assert seen == [2, 3]  # the MLPs of blocks 0 and 1 are not computed inside
                raise KeyError("boom")
    finally:
        for h in handles:
            h.remove()
    assert all("forward" not in b.__dict__ for b in blocks)
    with pytest.raises(ValueError, match="5 blocks asked"):
        with frozen_prefix(model, spec.layers_path, 5, lambda: model(input_ids=ids)):
            pass
    with pytest.raises(RuntimeError, match="not called"):
        with frozen_prefix(model, spec.layers_path, 1, lambda: None):
            pass
    with frozen_prefix(model, spec.layers_path, 0, lambda: 1 / 0):  # nothing frozen: run() is not called
        pass
