"""editors/hooks.py: output_grad_leaves, the gradients of a loss with respect to traced modules' outputs."""
from __future__ import annotations

import torch
from torch import nn

from editors.hooks import output_grad_leaves


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
