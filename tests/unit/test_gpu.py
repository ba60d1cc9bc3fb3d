"""The CUDA path (issue 16), on the tiny models: load in each dtype, one edit per editor family on the GPU, CPU vs
CUDA agreement and peak memory. Marked ``gpu``: skipped where CUDA is absent (the default model's shape is checked by
scripts/gpu_check.py on a lent device)."""
from __future__ import annotations

import copy

import pytest
import torch

from editors.base import apply_result
from editors.models import resolve_dtype, wrap_model
from editors.testing import tiny_model
from tests.unit.test_contract import REQUESTS
from tests.unit.test_precision import FAMILY_ROWS, _cos, _edit

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

#: CPU float32 vs CUDA float32 (TF32 off): cosine of every delta at least this
AGREE_COS = 0.99


def _on(lm, device: str, dtype: torch.dtype):
    m = copy.deepcopy(lm.model).to(device=device, dtype=dtype)
    return wrap_model(m, lm.tokenizer, name=f"tiny-{dtype}", device=torch.device(device))


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_load_each_dtype(base, dtype):
    lm = _on(base, "cuda", resolve_dtype(dtype, torch.device("cuda")))
    assert next(lm.model.parameters()).dtype == getattr(torch, dtype)
    assert lm.device.type == "cuda"
    assert resolve_dtype("auto", torch.device("cuda")) == (torch.bfloat16 if torch.cuda.is_bf16_supported()
                                                            else torch.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", list(FAMILY_ROWS))
def test_one_edit_per_family_on_cuda(base, method, dtype):
    lm = _on(base, "cuda", getattr(torch, dtype))
    torch.cuda.reset_peak_memory_stats()
    res = _edit(lm, method, FAMILY_ROWS[method], list(REQUESTS[:1]))
    assert res.is_finite()
    assert torch.cuda.max_memory_allocated() > 0
    undo = apply_result(lm, res)
    undo(lm.model)


@pytest.mark.parametrize("method", list(FAMILY_ROWS))
def test_cpu_and_cuda_agree(base, method):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = _on(base, "cpu", torch.float32)
    gpu = _on(base, "cuda", torch.float32)
    reqs = list(REQUESTS[:1])
    rc, rg = _edit(cpu, method, FAMILY_ROWS[method], reqs), _edit(gpu, method, FAMILY_ROWS[method], reqs)
    for n in rc.deltas:
        assert _cos(rc.deltas[n].cpu(), rg.deltas[n].cpu()) >= AGREE_COS, n
    for n in rc.factors:
        a, b = rc.factors[n].double().cpu(), rg.factors[n].double().cpu()
        rel = float((a - b).norm() / a.norm())
        assert rel < 1e-3, n
