"""Where things are inside a causal LM, found by introspection (never by the model's name).

A :class:`ModelSpec` names the decoder layers, each layer's MLP input / output projections, the attention output
projection, the final norm and the unembedding, and knows how a weight is laid out: ``nn.Linear`` stores
``[d_out, d_in]``; GPT-2's ``Conv1D`` stores ``[d_in, d_out]``. Editors compute every update in the canonical
``[d_out, d_in]`` orientation and convert with :meth:`ModelSpec.to_param_layout`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture could not be introspected; the message names what was not found."""


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: weight [d_in, d_out], attribute nf = d_out
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _io_dims(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear-like module, or None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    return None


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, nn.LayerNorm) or "norm" in name


@dataclass(frozen=True)
class ModelSpec:
    """Module paths of one loaded model (dotted names relative to the model)."""

    architecture: str
    n_layers: int
    hidden_size: int
    mlp_size: int
    layers_path: str  # e.g. "model.layers"
    mlp_in: tuple[str, ...]  # relative to a layer, e.g. ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str  # relative to a layer, e.g. "mlp.down_proj"
    mlp: str  # relative to a layer, e.g. "mlp"
    attn_out: str  # relative to a layer, e.g. "self_attn.o_proj"
    final_norm: str  # e.g. "model.norm"
    unembed: str  # e.g. "lm_head"
    conv1d: bool  # True when projections are GPT-2 Conv1D ([d_in, d_out])
    tied_embeddings: bool

    # ---- names -------------------------------------------------------------------------------------------
    def layer(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def mlp_out_module(self, i: int) -> str:
        return f"{self.layer(i)}.{self.mlp_out}"

    def mlp_out_weight(self, i: int) -> str:
        """Parameter name of layer ``i``'s MLP output projection (the matrix most editors change)."""
        return f"{self.mlp_out_module(i)}.weight"

    def mlp_module(self, i: int) -> str:
        return f"{self.layer(i)}.{self.mlp}"

    def attn_out_module(self, i: int) -> str:
        return f"{self.layer(i)}.{self.attn_out}"

    def layer_of(self, name: str) -> int | None:
        """Layer index encoded in a module/parameter name, or None."""
        prefix = self.layers_path + "."
        if not name.startswith(prefix):
            return None
        head = name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    # ---- layouts -----------------------------------------------------------------------------------------
    def to_canonical(self, weight: torch.Tensor) -> torch.Tensor:
        """Parameter layout -> ``[d_out, d_in]``."""
        return weight.T if self.conv1d else weight

    def to_param_layout(self, canonical: torch.Tensor) -> torch.Tensor:
        """``[d_out, d_in]`` -> parameter layout."""
        return canonical.T if self.conv1d else canonical

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            first = module[0]
            # a block list: identical block types that each hold linear-like children
            if all(type(m) is type(first) for m in module) and any(
                _io_dims(c) is not None for c in first.modules()
            ):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise UnsupportedModelError("no list of decoder blocks (nn.ModuleList of identical layers) was found")
    return best


def _hidden_size(model: nn.Module) -> int:
    emb = model.get_input_embeddings()
    if emb is None:
        raise UnsupportedModelError("no input embedding (get_input_embeddings() returned None)")
    return int(emb.weight.shape[1])


def spec_for(model: nn.Module) -> ModelSpec:
    """Introspect ``model`` (a Hugging Face causal LM or anything shaped like one)."""
    arch = type(model).__name__
    d = _hidden_size(model)
    layers_path, layers = _find_layers(model)
    block = layers[0]

    # MLP: the child module holding a d -> d_ff and a d_ff -> d projection
    mlp_name = mlp_out = None
    mlp_in: list[str] = []
    d_ff = 0
    for cname, child in block.named_children():
        lin = {n: _io_dims(m) for n, m in child.named_modules() if _io_dims(m) is not None}
        outs = [n for n, (i, o) in lin.items() if o == d and i > d]
        ins = [n for n, (i, o) in lin.items() if i == d and o > d]
        if outs and ins:
            mlp_name, mlp_out = cname, outs[0]
            d_ff = lin[outs[0]][0]
            mlp_in = [n for n in ins if lin[n][1] == d_ff]
            break
    if mlp_name is None:
        raise UnsupportedModelError(
            f"{arch}: no MLP found in {layers_path}.0 (a child with a hidden->ff and an ff->hidden projection; "
            f"hidden={d})")

    # attention output: in another child, a d -> d projection named like an output
    attn_out = None
    out_words = ("o_proj", "out_proj", "c_proj", "dense", "wo", "out")
    for cname, child in block.named_children():
        if cname == mlp_name:
            continue
        for n, m in child.named_modules():
            dims = _io_dims(m)
            if dims == (d, d) and n.split(".")[-1] in out_words:
                attn_out = f"{cname}.{n}"
        if attn_out:
            break
    if attn_out is None:
        raise UnsupportedModelError(f"{arch}: no attention output projection (d->d named o_proj/out_proj/c_proj/dense) "
                                    f"found in {layers_path}.0")

    # final norm: a norm module outside the blocks, in the same parent as the block list
    parent_path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    final_norm = None
    for n, m in parent.named_children():
        if _is_norm(m):
            final_norm = f"{parent_path}.{n}" if parent_path else n
    if final_norm is None:
        raise UnsupportedModelError(f"{arch}: no final norm found next to {layers_path}")

    out_emb = model.get_output_embeddings()
    if out_emb is None:
        raise UnsupportedModelError(f"{arch}: no unembedding (get_output_embeddings() returned None)")
    unembed = next((n for n, m in model.named_modules() if m is out_emb), None)
    if unembed is None:
        raise UnsupportedModelError(f"{arch}: the unembedding is not a named submodule")
    tied = out_emb.weight is model.get_input_embeddings().weight

    mlp_out_mod = block.get_submodule(f"{mlp_name}.{mlp_out}")
    return ModelSpec(
        architecture=arch,
        n_layers=len(layers),
        hidden_size=d,
        mlp_size=d_ff,
        layers_path=layers_path,
        mlp_in=tuple(f"{mlp_name}.{n}" for n in mlp_in),
        mlp_out=f"{mlp_name}.{mlp_out}",
        mlp=mlp_name,
        attn_out=attn_out,
        final_norm=final_norm,
        unembed=unembed,
        conv1d=_is_conv1d(mlp_out_mod),
        tied_embeddings=bool(tied),
    )
