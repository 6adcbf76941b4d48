"""Small Qwen2-architecture causal LMs with the character tokenizer, saved as
Hugging Face directories. Used for the demo models (then trained) and, with
random weights, as test fixtures. Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from asyncopd.tasks.tokenizer import build_char_tokenizer

__all__ = ["tiny_config", "save_tiny_model"]


def tiny_config(*, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, num_kv_heads: int = 1,
                intermediate_size: int | None = None, max_positions: int = 256) -> Qwen2Config:
    if hidden_size % num_heads or hidden_size // num_heads < 32:
        raise ValueError(f"hidden_size={hidden_size} / num_heads={num_heads} gives a head size below 32, which "
                         "vLLM's CPU attention does not support. Fix: fewer heads or a larger hidden size.")
    tokenizer = build_char_tokenizer()
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )


def save_tiny_model(path: str | Path, *, seed: int = 0, model: Qwen2ForCausalLM | None = None,
                    **config_kwargs) -> Path:
    """Save ``model`` (or a fresh random one) plus the char tokenizer to ``path``."""
    path = Path(path)
    if model is None:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_config(**config_kwargs))
    tokenizer = build_char_tokenizer()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
