"""Test helpers, kept out of the package: a method that compresses nothing, a tiny model."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tritonpress.models import byte_tokenizer, random_llama
from tritonpress.recipe import Method


@dataclass(frozen=True)
class Identity(Method):
    """Compresses nothing: the loop then reproduces the model's forward (a test oracle)."""

    def __call__(self, layer_idx, layer, prefix, inputs, ctx):
        return {}, {}


def tiny_llama(hidden: int = 64, intermediate: int = 160, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, vocab: int | None = None, seed: int = 0, tie: bool = True,
               dtype: torch.dtype = torch.float32, max_positions: int = 2048):
    """(model, tokenizer): a random tiny Llama with the byte-level tokenizer.

    Tied embeddings by default, like SmolLM2. Weights are a function of `seed` only."""
    tokenizer = byte_tokenizer()
    vocab = len(tokenizer) if vocab is None else vocab
    if vocab < len(tokenizer):
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    model = random_llama(hidden, intermediate, heads, kv_heads, layers, vocab, dtype=dtype,
                         device="cpu", seed=seed, tie=tie, max_positions=max_positions)
    return model, tokenizer
