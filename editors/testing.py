"""Tiny random models built from configs, for unit tests and quick experiments (no download, seconds on a CPU).

They share the embedded default model's tokenizer (loaded from the GGUF file) so prompts tokenise exactly as on
the real model.
"""
from __future__ import annotations

import functools

import torch

from .models import LoadedModel, default_snapshot_dir, wrap_model


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_snapshot_dir())


def tiny_model(arch: str = "llama", *, seed: int = 0, n_layers: int = 4, hidden: int = 64, mlp: int = 128,
               tie: bool = True) -> LoadedModel:
    """A randomly initialised causal LM of family ``arch`` ("llama", "gpt2", "gptneox", "gptj", "qwen2")."""
    import transformers as tf
    tok = default_tokenizer()
    vocab = len(tok)
    torch.manual_seed(seed)
    ids = {"bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
           "eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id}
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=tie, **ids)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=tie, **ids)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_inner=mlp, n_layer=n_layers, n_head=4, n_positions=256,
                            tie_word_embeddings=tie, **ids)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "gptneox":
        cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=n_layers,
                               num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False, **ids)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif arch == "gptj":
        cfg = tf.GPTJConfig(vocab_size=vocab, n_embd=hidden, n_inner=mlp, n_layer=n_layers, n_head=4, n_positions=256,
                            rotary_dim=8, tie_word_embeddings=False, **ids)
        model = tf.GPTJForCausalLM(cfg)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; valid: llama, qwen2, gpt2, gptneox, gptj")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return wrap_model(model, tok, name=f"tiny-{arch}", display_name=f"tiny random {arch}",
                      device=torch.device("cpu"))
