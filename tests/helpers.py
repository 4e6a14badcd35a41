"""Test helpers (kept out of the package): a method that compresses nothing, and compress()
called with the flat keywords the CLI flags name (one test can then sweep many options)."""
from __future__ import annotations

from dataclasses import dataclass

from tritonpress.recipe import Calibration, Evaluation, Method, Run, recipe_from_flags
from tritonpress.schemes import get_scheme

CALIBRATION = ("dataset", "num_samples", "seq_len", "seed")
EVALUATION = {"eval_dataset": "dataset", "eval_windows": "windows", "eval_seq_len": "seq_len",
              "act_sim": "act_sim"}
METHOD_OPTIONS = ("smoothquant", "damp", "block_size", "actorder", "clip", "refit",
                  "sequential", "permute")


@dataclass(frozen=True)
class Identity(Method):
    """Compresses nothing: the loop then reproduces the model's forward (a test oracle)."""

    def __call__(self, layer_idx, layer, prefix, inputs, ctx):
        return {}, {}


def compress_kw(model, scheme, out=None, *, method=None, group_size=None, symmetric=None,
                ignore=None, evaluate_quality=True, **kw):
    """tritonpress.compress with flat keywords: method options to recipe_from_flags, the
    calibration's, the evaluation's (eval_*), the rest to Run."""
    import tritonpress
    scheme = get_scheme(scheme, group_size=group_size, symmetric=symmetric, ignore=ignore)
    recipe = recipe_from_flags(scheme, method, **{k: kw.pop(k) for k in METHOD_OPTIONS
                                                  if k in kw})
    calibration = Calibration(**{k: kw.pop(k) for k in CALIBRATION if k in kw})
    evaluation = Evaluation(**{v: kw.pop(k) for k, v in EVALUATION.items() if k in kw})
    return tritonpress.compress(model, scheme, out, recipe, calibration=calibration,
                                evaluation=evaluation if evaluate_quality else None,
                                run=Run(**kw))
