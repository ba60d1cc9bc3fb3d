"""THE editor contract, as one table (peft ``TEST_CASES``, scikit-learn ``parametrize_with_checks``).

Every row is ``(method, arch, overrides)``: a registry name, a tiny random architecture from
:func:`editors.testing.tiny_model` (4 layers, hidden 64, mlp 128) and config overrides that keep one edit to a few
seconds. Each row is checked for:

* registry round trip (``get_editor_class(name).name == name``), a documented config (help on every field),
  ``make_config`` rejecting an unknown key with a message listing every valid field;
* delta shapes equal to their parameters' shapes, factors ``[d_out, d_out]`` in the canonical orientation;
* ``edit()`` leaving every parameter bit-identical (and requires_grad flags / training mode as they were);
* ``apply_result`` changing only the named parameters, and its ``Undo`` restoring them bit-identically;
* the same seed giving identical deltas and factors; every number finite;
* the method's own invariant from :data:`INVARIANTS` (ft-c stays in its box, ROME is rank one, ...).

The table derives from the registry: every method a module under ``editors/`` registers gets one row per
architecture, with the small-size overrides it registered (``@register(..., tiny={...})``; none = its defaults).
A new method adds its own invariant to :data:`INVARIANTS` (a row without one is skipped, and says so) and, where its
code paths differ by config, rows to :data:`EXTRA_ROWS`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

from editors.base import ConfigError, Editor, EditorConfig, EditResult, apply_result, make_config
from editors.models import LoadedModel
from editors.registry import (
    FAMILIES,
    available_methods,
    collapse_study_methods,
    get_editor_class,
    method_info,
    methods_in_order,
)
from editors.requests import EditRequest, make_request
from editors.testing import tiny_model

ARCHS = ("llama", "gpt2")

#: every method the project ships, in table order (tests may register throw-away editors of their own: not rows)
SHIPPED = [m for m in methods_in_order() if method_info(m).module.startswith("editors.")]


def _tiny(method: str) -> dict:
    """The method's registered small-size overrides for the 4-layer tiny models."""
    return dict(method_info(method).tiny)


# Extra rows beyond the (method x arch) grid: variants whose code paths differ.
EXTRA_ROWS: list[tuple[str, str, dict]] = [
    ("ft", "llama", {"layers": (1, 2), "module": "mlp_in", "objective": "prompt_last", "num_steps": 2,
                     "batch_size": 2}),
    ("ft", "gpt2", {"layers": (2,), "module": "attn_out", "num_steps": 2, "norm_constraint": 1e-3}),
    ("lora", "gpt2", {"layers": (1, 2), "module": "attn_out", "num_steps": 2, "rank": 2, "dropout": 0.0}),
    ("flearning", "gpt2", {"layers": (1,), "num_steps": 2, "batch_size": 2, "mode": "lora", "forget_lambda": 0.5}),
    ("geoedit", "llama", {"layers": (1, 2), "num_steps": 2, "ae_steps": 20, "ae_kl_every": 10, "mode": "lora",
                          "fusion": "fixed", "orthogonal": False}),
    # GeoEdit with row neurons: the rows of the MLP input projections (neuron_axis 'auto' on module 'mlp_in')
    ("geoedit", "gpt2", {"layers": (1,), "num_steps": 2, "ae_steps": 20, "ae_kl_every": 10, "module": "mlp_in"}),
    # the wrappers on their default base (ROME), MOSE's fixed-layer ablation, AdaEdit's comparison strategies
    ("rect", "llama", {"base": "rome", "base_overrides": {"layer": 1, "v_num_grad_steps": 2}}),
    ("prune", "gpt2", {"base": "rome", "base_overrides": {"layer": 1, "v_num_grad_steps": 2}, "restraint": "linear"}),
    ("mose", "gpt2", {"layer_selection": "fixed", "layers": (2,), "mom2_n_tokens": 2000, "v_num_grad_steps": 2}),
    ("adaedit", "llama", {"layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2,
                          "sparsify": "topk_magnitude"}),
    ("adaedit", "gpt2", {"layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2, "sparsify": "random_drop"}),
    # UltraEdit's LN ablation, and StableEdit's whitening with a (tiny) warm-up applied to the weights
    ("ultraedit", "llama", {"layers": (1, 2), "chunk_size": 1, "normalization": "off"}),
    ("ultraedit", "gpt2", {"layers": (2,), "chunk_size": 1, "normalization": "stable", "warmup_edits": 2,
                           "warmup_turn": 1, "warmup_data": "builtin"}),
    # issue 14's options: AdaEdit's residual on the stream, MOSE's residual target and shared selection target
    ("adaedit", "gpt2", {"layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2, "residual_site": "residual"}),
    ("mose", "llama", {"candidate_layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2,
                       "selection_target": "shared", "target_site": "residual"}),
    ("agrade", "gpt2", {"allow_untrained": True, "rank": 8, "layers": (1, 2, 3), "projection_reference": "projected"}),
]

# How many of REQUESTS a method edits in one call: 2 (to exercise batching) except the methods listed here, whose rows
# edit one request (ROME's invariant is a rank-one update; the wrappers' rows post-process one edit).
ONE_REQUEST = ("rome", "rect", "prune")


def _n_requests(method: str) -> int:
    return 1 if method in ONE_REQUEST else 2


REQUESTS: tuple[EditRequest, ...] = (
    make_request(source="test_contract", record=0, case_id="eiffel",
                 prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
                 target_new="Rome", target_true="Paris",
                 rephrase_prompts=["Where is the Eiffel Tower? It is in"],
                 locality_prompts=["The capital of France is"], locality_answers=["Paris"]),
    make_request(source="test_contract", record=1, case_id="darrieux",
                 prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                 target_new="English", target_true="French"),
)

ROWS = [(m, a, _tiny(m)) for m in SHIPPED for a in ARCHS] + EXTRA_ROWS


def _row_id(row: tuple[str, str, dict]) -> str:
    method, arch, ov = row
    extra = ",".join(f"{k}={v}" for k, v in ov.items() if k not in _tiny(method))
    return f"{method}-{arch}" + (f"[{extra}]" if extra else "")


ROW_PARAMS = [pytest.param(r, id=_row_id(r)) for r in ROWS]


# ---------------------------------------------------------------------------------------------------------------
# own invariants: method -> callable(lm, result); raise AssertionError on violation
# ---------------------------------------------------------------------------------------------------------------
def _ft_trains_only_configured_weights(lm: LoadedModel, result: EditResult) -> None:
    cfg = result.config
    spec = lm.spec
    expected = set()
    for layer in cfg["layers"]:
        if cfg["module"] == "mlp_out":
            expected.add(spec.mlp_out_weight(layer))
        elif cfg["module"] == "mlp_in":
            expected.update(f"{spec.layer(layer)}.{m}.weight" for m in spec.mlp_in)
        else:
            expected.add(f"{spec.attn_out_module(layer)}.weight")
    assert set(result.deltas) == expected and not result.factors
    if cfg["objective"] == "target_new":
        # the FT-M loss before training is the evaluation's teacher-forced NLL per target token, request-averaged
        from analysis.evaluation import teacher_forced
        reqs = REQUESTS[:result.info["n_requests"]]
        outs = teacher_forced(lm, [r.prompt for r in reqs], [r.target_new for r in reqs])
        nll = sum(-o.logprob / len(o.target_ids) for o in outs) / len(outs)
        assert abs(result.info["loss_initial"] - nll) < 1e-4 * max(1.0, nll)
    box = cfg.get("norm_constraint")
    if box:
        assert all(_max_abs_within(d, box) for d in result.deltas.values())


def _max_abs_within(d: torch.Tensor, bound: float) -> bool:
    """max |d| <= bound, compared in d's own precision (float32(1e-3) > 1e-3 as a double)."""
    return bool(d.abs().max() <= torch.tensor(bound, dtype=d.dtype))


def _ftc_stays_in_box(lm: LoadedModel, result: EditResult) -> None:
    eps = result.config["epsilon"]
    for name, d in result.deltas.items():
        assert _max_abs_within(d, eps), f"{name}: max |dW| {d.abs().max().item():.3g} > epsilon {eps:.3g}"
    assert max(d.abs().max().item() for d in result.deltas.values()) > 0


def _rank_one(lm: LoadedModel, result: EditResult) -> None:
    """ROME: one rank-one update u v^T of one matrix."""
    assert len(result.deltas) == 1 and not result.factors
    (d,) = result.deltas.values()
    # the update is computed in float32: singular values below ~1e-5 of the largest are rounding, not rank
    assert torch.linalg.matrix_rank(lm.spec.to_canonical(d).double(), rtol=1e-5).item() == 1


def _orthogonal_factors(lm: LoadedModel, result: EditResult) -> None:
    """MOSE (closed form): R is orthogonal, so W <- R W keeps every column norm."""
    assert result.factors
    for name, R in result.factors.items():
        eye = torch.eye(R.shape[0], dtype=torch.float64)
        assert torch.allclose(R.double().T @ R.double(), eye, atol=1e-4), name


def _multilayer_low_rank(lm: LoadedModel, result: EditResult) -> None:
    """MEMIT family (editors/multilayer.py): one additive update of each configured layer's MLP output projection,
    each of rank <= the batch size (every closed form is R [d, n] times an [n, d_ff] matrix)."""
    expected = {lm.spec.mlp_out_weight(layer) for layer in result.config["layers"]}
    assert set(result.deltas) == expected and not result.factors
    n = result.info["n_requests"]
    for name, d in result.deltas.items():
        rank = torch.linalg.matrix_rank(lm.spec.to_canonical(d).double(), rtol=1e-5).item()
        assert 1 <= rank <= n, f"{name}: rank {rank} for a batch of {n}"


def _alphaedit_preserves_old_keys(lm: LoadedModel, result: EditResult) -> None:
    """AlphaEdit: the update lives in the null space of the preserved keys (share of K0 response ~ 0)."""
    _multilayer_low_rank(lm, result)
    assert max(result.artifacts["preserved_share"]) < 1e-3
    for layer, U in result.artifacts["null_basis"].items():  # rows of ΔW lie in span(U_null)
        D = lm.spec.to_canonical(result.deltas[lm.spec.mlp_out_weight(int(layer))]).double()
        U = U.double()
        assert (D - D @ U @ U.T).norm() <= 1e-3 * D.norm()


def _adaedit_srfusion_sparse(lm: LoadedModel, result: EditResult) -> None:
    """AdaEdit (SRFusion, Eq. 2-4): each layer's ΔW has rank <= r, its rows / columns supported on at most r·k
    entries of the sparsified singular vectors."""
    from editors.adaedit import resolve_k
    cfg = result.config
    assert result.deltas and not result.factors
    for name, d in result.deltas.items():
        if cfg["sparsify"] == "topk_magnitude":  # the comparison strategies keep keep_fraction of the entries
            assert int((d != 0).sum()) == round(cfg["keep_fraction"] * d.numel()), name
            continue
        if cfg["sparsify"] == "random_drop":
            assert abs(float((d != 0).double().mean()) - cfg["keep_fraction"]) < 0.05, name
            continue
        if cfg["sparsify"] != "sr":
            continue
        D = lm.spec.to_canonical(d).double()
        r = cfg["r"]
        assert torch.linalg.matrix_rank(D, rtol=1e-5).item() <= r, name
        assert int((D.abs().sum(1) != 0).sum()) <= r * resolve_k(cfg["k"], D.shape[0]), name
        assert int((D.abs().sum(0) != 0).sum()) <= r * resolve_k(cfg["k"], D.shape[1]), name


def _rect_keeps_fraction(lm: LoadedModel, result: EditResult) -> None:
    """RECT: each ΔW keeps at most round(keep_fraction · numel) entries (exactly that many unless the base's own
    update had zeros)."""
    frac = result.config["keep_fraction"]
    assert result.deltas and not result.factors
    for name, d in result.deltas.items():
        nz = int((d != 0).sum())
        assert 0 < nz <= round(frac * d.numel()), f"{name}: {nz} non-zeros, keep_fraction {frac}"


def _prune_within_bound(lm: LoadedModel, result: EditResult) -> None:
    """PRUNE: the accumulated edit (here: this first edit) has no singular value above the restrained bound."""
    from editors.prune import restrained_bound
    cfg = result.config
    for name, d in result.deltas.items():
        info = result.info["params"][name]
        bound = max(restrained_bound(info["sigma_1_before"], info["sigma_max_W0"], cfg["restraint"],
                                     cfg["log_base"]), 0.0)
        assert torch.linalg.matrix_norm(d.double(), ord=2).item() <= bound * (1 + 1e-5) + 1e-6, name


def _configured_weights(lm: LoadedModel, cfg: dict) -> set[str]:
    spec = lm.spec
    if cfg["module"] == "mlp_out":
        return {spec.mlp_out_weight(layer) for layer in cfg["layers"]}
    if cfg["module"] == "mlp_in":
        return {f"{spec.layer(layer)}.{m}.weight" for layer in cfg["layers"] for m in spec.mlp_in}
    return {f"{spec.attn_out_module(layer)}.weight" for layer in cfg["layers"]}


def _lora_is_merged_product(lm: LoadedModel, result: EditResult) -> None:
    """LoRA: each delta is exactly B @ A · alpha/r (param layout) of the trained adapter, of rank <= r."""
    assert set(result.deltas) == _configured_weights(lm, result.config) and not result.factors
    art = result.artifacts
    for name, d in result.deltas.items():
        A, B = torch.as_tensor(art["lora_A"][name]), torch.as_tensor(art["lora_B"][name])
        scale = art["lora_scale"][name]
        assert scale == result.config["alpha"] / result.config["rank"]
        assert torch.equal(d, lm.spec.to_param_layout((B @ A) * scale).contiguous()), name
        assert torch.linalg.matrix_rank(d.double(), rtol=1e-5).item() <= result.config["rank"]


def _flearning_forgets_then_learns(lm: LoadedModel, result: EditResult) -> None:
    """F-Learning: only the configured weights change; both fine-tunings stepped and the old-fact task vector is
    recorded and non-zero (that delta = −λ·τ_old + FT(θ0 − λ·τ_old) is checked in tests/unit/test_geoedit.py)."""
    assert set(result.deltas) == _configured_weights(lm, result.config) and not result.factors
    assert set(result.artifacts["tau_old"]) == set(result.deltas)
    assert all(v > 0 for v in result.info["tau_old_norm"].values())
    assert result.info["old"]["opt_steps"] > 0 and result.info["new"]["opt_steps"] > 0


def _geoedit_masks_orthogonal(lm: LoadedModel, result: EditResult) -> None:
    """GeoEdit: per-neuron artifacts cover every neuron (canonical rows or columns, ``neuron_axis``); α, β in [0, 1];
    with the orthogonal rule on, every neuron of the orthogonal class is exactly zero in the delta (Eq. 11, case 2)."""
    cfg, art = result.config, result.artifacts
    assert set(result.deltas) == _configured_weights(lm, cfg) and not result.factors
    n = result.info["n_neurons"]
    for key in ("raw_angle", "latent_angle", "neuron_class", "tau_old_norm", "tau_new_norm", "alpha", "beta",
                "param_index", "neuron"):
        assert art[key].shape == (n,), key
    assert ((art["alpha"] >= 0) & (art["alpha"] <= 1)).all() and ((art["beta"] >= 0) & (art["beta"] <= 1)).all()
    canon = [lm.spec.to_canonical(result.deltas[p]) for p in art["param_names"]]
    rows = torch.cat([c if art["neuron_axis"] == "out" else c.T for c in canon])  # one neuron per row
    assert rows.shape[0] == n
    ortho = torch.as_tensor(art["neuron_class"] == 1)
    if cfg["orthogonal"]:
        assert (rows[ortho] == 0).all()
    assert (rows[~ortho].abs().sum(1) > 0).any()


def _hypernet_low_rank(lm: LoadedModel, result: EditResult) -> None:
    """MALMEN / AGRADE: one additive update per configured MLP output projection, each Δ = Kᵀ(KKᵀ + e^λ I)⁻¹D of
    rank <= the number of answer tokens; AGRADE also exposes HᵀG before / after Eq. 4 and M's features."""
    expected = {lm.spec.mlp_out_weight(layer) for layer in result.config["layers"]}
    assert set(result.deltas) == expected and not result.factors
    n_tok = result.info["n_tokens"]
    for name, d in result.deltas.items():
        assert torch.linalg.matrix_rank(lm.spec.to_canonical(d).double(), rtol=1e-5).item() <= n_tok, name
    if result.method == "agrade":
        d_in = lm.spec.mlp_size
        for key in ("H", "G_before", "G_after", "M_eigvals", "M_diag"):
            assert set(result.artifacts[key]) == {str(x) for x in result.config["layers"]}, key
        for layer, H in result.artifacts["H"].items():  # HᵀG = H.T @ G: [d_in, d_out]
            assert tuple((H.T @ result.artifacts["G_after"][layer]).shape) == (d_in, lm.spec.hidden_size)


def _ultraedit_ridge_bound(lm: LoadedModel, result: EditResult) -> None:
    """ΔW = Vᵀ(HHᵀ + λI)⁻¹H: its rows lie in the span of the turn's N answer-position keys (rank ≤ N up to float32
    rounding, without a warm-up) and ‖ΔW‖_F ≤ ‖V‖_F / (2√λ)."""
    lam = float(result.config["ridge"])
    for layer in result.config["layers"]:
        d = lm.spec.to_canonical(result.deltas[lm.spec.mlp_out_weight(layer)]).double()
        li = result.info["layer"][str(layer)]
        if "warmup_edits" not in result.info:
            rank = int(torch.linalg.matrix_rank(d, rtol=1e-5))
            assert rank <= li["n_tokens"], f"layer {layer}: rank {rank} above the token count"
            assert float(d.norm()) <= li["V_norm"] / (2 * lam ** 0.5) * (1 + 1e-5), f"layer {layer}: norm bound"
        assert float(d.norm()) > 0, f"layer {layer}: no update"


def _grace_codebook_only(lm: LoadedModel, result: EditResult) -> None:
    """GRACE changes no weight: the result is a codebook patch that adds one entry per request to a fresh codebook
    (the two requests are far apart at ε₀)."""
    assert not result.deltas and not result.factors
    assert result.adaptor is not None and result.adaptor.summary()["added"] == result.info["n_added"] >= 1


INVARIANTS: dict[str, Callable[[LoadedModel, EditResult], None]] = {
    "grace": _grace_codebook_only,
    "ultraedit": _ultraedit_ridge_bound,
    "lora": _lora_is_merged_product,
    "flearning": _flearning_forgets_then_learns,
    "geoedit": _geoedit_masks_orthogonal,
    "geoedit-mw": _geoedit_masks_orthogonal,
    "ft": _ft_trains_only_configured_weights,
    "ft-c": _ftc_stays_in_box,
    "rome": _rank_one,
    "mose": _orthogonal_factors,
    "memit": _multilayer_low_rank,
    "pmet": _multilayer_low_rank,
    "emmet": _multilayer_low_rank,
    "alphaedit": _alphaedit_preserves_old_keys,
    "adaedit": _adaedit_srfusion_sparse,
    "rect": _rect_keeps_fraction,
    "prune": _prune_within_bound,
    "malmen": _hypernet_low_rank,
    "agrade": _hypernet_low_rank,
}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _require(method: str) -> type[Editor]:
    assert method in available_methods(), f"{method} is in the contract table but not registered"
    return get_editor_class(method)


def _snapshot(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _changed(lm: LoadedModel, snap: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, p in lm.model.named_parameters() if not torch.equal(p, snap[n])]


@dataclasses.dataclass
class _Run:
    lm: LoadedModel
    snapshot: dict[str, torch.Tensor]
    result: EditResult
    repeat: EditResult
    changed_by_edit: list[str]
    flags_changed: list[str]
    training_changed: bool
    config: EditorConfig
    editor: Editor


@pytest.fixture(scope="module")
def runs() -> dict:
    """Results per row, computed once per module (several checks read the same edit)."""
    return {}


def _run(runs: dict, row: tuple[str, str, dict]) -> _Run:
    key = _row_id(row)
    if key in runs:
        return runs[key]
    method, arch, overrides = row
    cls = _require(method)
    lm = tiny_model(arch)
    snap = _snapshot(lm)
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    training = lm.model.training
    requests = list(REQUESTS[:_n_requests(method)])

    cfg = make_config(cls.config_cls, overrides, method=method)
    editor = cls(lm, cfg, seed=123)
    editor.prepare()
    result = editor.edit(requests)
    editor.close()  # an adaptor (GRACE's hook) is detached; test_apply_then_undo_is_exact re-attaches it
    changed = _changed(lm, snap)
    flags_changed = [n for n, p in lm.model.named_parameters() if p.requires_grad != flags[n]]
    training_changed = lm.model.training != training

    again = cls(lm, make_config(cls.config_cls, overrides, method=method), seed=123)
    again.prepare()
    repeat = again.edit(requests)
    again.close()
    runs[key] = _Run(lm, snap, result, repeat, changed, flags_changed, training_changed, cfg, editor)
    return runs[key]


# ---------------------------------------------------------------------------------------------------------------
# the table covers the registry
# ---------------------------------------------------------------------------------------------------------------
def test_table_covers_every_registered_method():
    in_table = {(m, a) for m, a, _ in ROWS}
    shipped = {m for m in available_methods() if get_editor_class(m).__module__.startswith("editors.")}
    assert shipped == set(SHIPPED) and len(SHIPPED) == len(set(SHIPPED))
    for method in shipped:
        for arch in ARCHS:
            assert (method, arch) in in_table, f"no contract row for ({method}, {arch})"
    assert {m for m, _, _ in EXTRA_ROWS} <= shipped, "an extra row names a method nobody registers"
    assert set(INVARIANTS) <= shipped, "an invariant names a method nobody registers"


def test_registry_metadata():
    """Every shipped method names its family and is listed once in table order; the collapse-study defaults are
    shipped methods in that order."""
    for method in SHIPPED:
        info = method_info(method)
        assert info.family in FAMILIES, f"{method}: family {info.family!r} is not one of {FAMILIES}"
        assert info.editor_cls is get_editor_class(method) and info.name == method
    study = collapse_study_methods()
    assert study and set(study) <= set(SHIPPED)
    assert study == [m for m in SHIPPED if method_info(m).collapse_study]


# ---------------------------------------------------------------------------------------------------------------
# registry and config
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", ROW_PARAMS)
def test_registry_round_trip_and_documented_config(row):
    method, _, overrides = row
    cls = _require(method)
    assert cls.name == method
    assert get_editor_class(method.upper()) is cls
    assert issubclass(cls, Editor) and cls.summary
    cfg_cls = cls.config_cls
    assert issubclass(cfg_cls, EditorConfig) and dataclasses.is_dataclass(cfg_cls)
    assert isinstance(cfg_cls.version, int)
    undocumented = [f["name"] for f in cfg_cls.field_help() if not f["help"].strip()]
    assert not undocumented, f"{method}: config fields without help: {undocumented}"
    make_config(cfg_cls, method=method)  # the defaults validate
    make_config(cfg_cls, overrides, method=method)  # so do the row's overrides


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_make_config_rejects_unknown_key_listing_valid_fields(row):
    method, _, _ = row
    cls = _require(method)
    with pytest.raises(ConfigError) as err:
        make_config(cls.config_cls, {"no_such_field_xyz": 1}, method=method)
    msg = str(err.value)
    assert "no_such_field_xyz" in msg
    for f in dataclasses.fields(cls.config_cls):
        assert f.name in msg, f"{method}: valid field {f.name!r} not listed in {msg!r}"


# ---------------------------------------------------------------------------------------------------------------
# the edit
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", ROW_PARAMS)
def test_edit_leaves_model_unchanged(row, runs):
    run = _run(runs, row)
    assert not run.changed_by_edit, f"edit() changed {run.changed_by_edit[:3]}"
    assert not run.flags_changed, f"edit() changed requires_grad of {run.flags_changed[:3]}"
    assert not run.training_changed, "edit() changed the model's training mode"


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_result_shapes_and_record(row, runs):
    run = _run(runs, row)
    res, lm = run.result, run.lm
    params = dict(lm.model.named_parameters())
    assert res.method == row[0]
    assert res.param_names or res.adaptor is not None, "the result changes nothing"
    for name, d in res.deltas.items():
        assert name in params, f"unknown parameter {name}"
        assert tuple(d.shape) == tuple(params[name].shape), f"{name}: delta {tuple(d.shape)}"
    for name, R in res.factors.items():
        assert name in params, f"unknown parameter {name}"
        d_out = lm.spec.to_canonical(params[name]).shape[0]
        assert tuple(R.shape) == (d_out, d_out), f"{name}: factor {tuple(R.shape)}, expected [{d_out}, {d_out}]"
    assert res.is_finite()
    assert res.adaptor is not None or any(d.abs().max().item() > 0 for d in res.deltas.values()) or any(
        not torch.equal(R, torch.eye(R.shape[0], dtype=R.dtype)) for R in res.factors.values())
    assert res.config == run.config.to_dict() and res.config_version == type(run.config).version
    assert res.seconds >= 0


def _outputs(lm: LoadedModel) -> torch.Tensor:
    ids = lm.tokenizer([r.prompt for r in REQUESTS], return_tensors="pt", padding=True)
    with torch.no_grad():
        return lm.model(**ids).logits


def _apply_then_undo_adaptor(run: _Run) -> None:
    """An adaptor result (not a weight delta): applying it changes the model's outputs and no parameter; the undo
    gives bit-identical outputs again."""
    lm, res = run.lm, run.result
    run.editor.prepare()  # re-attach the adaptor the run closed
    try:
        before = _outputs(lm)
        undo = apply_result(lm, res)
        try:
            assert not _changed(lm, run.snapshot), "an adaptor result changed parameters"
            assert not torch.equal(_outputs(lm), before), "applying the adaptor patch changed no output"
        finally:
            undo(lm.model)
        assert torch.equal(_outputs(lm), before), "undo did not restore the outputs bit for bit"
    finally:
        run.editor.close()


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_apply_then_undo_is_exact(row, runs):
    run = _run(runs, row)
    lm, res = run.lm, run.result
    if res.adaptor is not None:
        return _apply_then_undo_adaptor(run)
    undo = apply_result(lm, res)
    try:
        changed = set(_changed(lm, run.snapshot))
        assert changed, "applying the result changed no parameter"
        extra = sorted(changed - set(res.param_names))
        assert not extra, f"apply touched parameters the result does not name: {extra}"
    finally:
        undo(lm.model)
    assert not _changed(lm, run.snapshot), "undo did not restore the model bit for bit"


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_same_seed_same_result(row, runs):
    run = _run(runs, row)
    a, b = run.result, run.repeat
    assert a.param_names == b.param_names
    for name in a.deltas:
        assert torch.equal(a.deltas[name], b.deltas[name]), f"{name}: deltas differ between runs with one seed"
    for name in a.factors:
        assert torch.equal(a.factors[name], b.factors[name]), f"{name}: factors differ between runs with one seed"
    assert (a.adaptor is None) == (b.adaptor is None)
    if a.adaptor is not None:
        ta, tb = a.adaptor.tensors(), b.adaptor.tensors()
        assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb)), "adaptor patches differ"


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_own_invariant(row, runs):
    method = row[0]
    _require(method)
    check = INVARIANTS.get(method)
    if check is None:
        pytest.skip(f"{method}: no own invariant registered in INVARIANTS")
    run = _run(runs, row)
    check(run.lm, run.result)
