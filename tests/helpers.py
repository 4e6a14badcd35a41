"""Test helpers, kept out of the package: a method that compresses nothing."""
from __future__ import annotations

from dataclasses import dataclass

from tritonpress.recipe import Method


@dataclass(frozen=True)
class Identity(Method):
    """Compresses nothing: the loop then reproduces the model's forward (a test oracle)."""

    def __call__(self, layer_idx, layer, prefix, inputs, ctx):
        return {}, {}
