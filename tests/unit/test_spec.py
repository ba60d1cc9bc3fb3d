"""ModelSpec introspection across architectures, and a clear error for what cannot be introspected."""
import pytest
import torch
from torch import nn

from editors.spec import UnsupportedModelError, spec_for
from editors.testing import tiny_model


@pytest.mark.parametrize("arch,mlp_out,conv1d,tied", [
    ("llama", "mlp.down_proj", False, True),
    ("qwen2", "mlp.down_proj", False, True),
    ("gpt2", "mlp.c_proj", True, True),
    ("gptneox", "mlp.dense_4h_to_h", False, False),
    ("gptj", "mlp.fc_out", False, False),
])
def test_spec_found_by_introspection(arch, mlp_out, conv1d, tied):
    lm = tiny_model(arch)
    s = lm.spec
    assert s.n_layers == 4 and s.hidden_size == 64 and s.mlp_size == 128
    assert s.mlp_out == mlp_out
    assert s.conv1d is conv1d
    assert s.tied_embeddings is tied
    params = dict(lm.model.named_parameters())
    w = params[s.mlp_out_weight(2)]
    # canonical orientation is [d_out, d_in] = [hidden, mlp]
    assert tuple(s.to_canonical(w).shape) == (64, 128)
    assert torch.equal(s.to_param_layout(s.to_canonical(w)), w)
    assert s.layer_of(s.mlp_out_weight(3)) == 3
    # every named module exists
    for name in (s.final_norm, s.unembed, s.attn_out_module(0), s.mlp_module(1), s.mlp_out_module(1)):
        lm.model.get_submodule(name)


class _NoMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def get_input_embeddings(self):
        return self.emb


def test_unsupported_architecture_names_what_is_missing():
    with pytest.raises(UnsupportedModelError, match="no MLP found"):
        spec_for(_NoMLP())


def test_tiny_gpt2_spec_is_conv1d_and_canonical_is_transpose(tiny_gpt2):
    p = dict(tiny_gpt2.model.named_parameters())[tiny_gpt2.spec.mlp_out_weight(0)]
    assert tuple(p.shape) == (128, 64)  # Conv1D stores [d_in, d_out]
