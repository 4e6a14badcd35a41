"""Opt-in (TRITONPRESS_LLMC_TESTS=1, needs .venv-llmc from `make llmc-env`): llm-compressor
0.14's checkpoint of each newer compressed-tensors scheme against ours, on the same tiny Llama:
the same tensor names, dtypes and shapes, and the same quantization_config field for field."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tritonpress as tp

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLMC = ROOT / ".venv-llmc" / "bin" / "python"
pytestmark = pytest.mark.skipif(not (os.environ.get("TRITONPRESS_LLMC_TESTS") and LLMC.exists()),
                                reason="opt-in: TRITONPRESS_LLMC_TESTS=1 with make llmc-env")

# llm-compressor's preset through its QuantizationModifier (the layout does not depend on the
# algorithm; its GPTQModifier writes the same tensors)
ONESHOT = """
import sys, torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM
base, scheme, out = sys.argv[1:4]
ids = torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(0))
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
oneshot(model=model, dataset=ds, num_calibration_samples=4, max_seq_length=32,
        recipe=QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme=scheme),
        shuffle_calibration_samples=False)
model.save_pretrained(out, save_compressed=True)
"""


def _tensors(path):
    from safetensors import safe_open
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: (h.get_slice(k).get_dtype(), tuple(h.get_slice(k).get_shape()))
                        for k in h.keys()})
    return out


@pytest.mark.parametrize("scheme", ["FP8_BLOCK", "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4",
                                    "W4A8", "W4AFP8"])
def test_checkpoint_layout_matches_llm_compressor(tmp_path, scheme):
    # intermediate 320: FP8_BLOCK's down_proj has a partial column block (scale [2, 3])
    inter = 320 if scheme == "FP8_BLOCK" else 384
    model, tok = tiny_llama(hidden=256, intermediate=inter, layers=1, dtype=torch.bfloat16)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    script = tmp_path / "oneshot.py"
    script.write_text(ONESHOT)
    subprocess.run([str(LLMC), str(script), str(base), scheme, str(tmp_path / "llmc")],
                   check=True, capture_output=True)
    if scheme == "FP8_BLOCK":   # ours refuses in-features that vLLM's activation groups cannot
        # cover (down_proj's 320): that Linear left out on our side only
        sch = tp.get_scheme(scheme, ignore=["lm_head", "down_proj"])
    else:
        sch = scheme
    tp.compress(str(base), sch, tmp_path / "ours", calibration=tp.Calibration("canterbury", 4, 32),
                evaluation=None, run=tp.Run(device="cpu", progress=False))
    ours, theirs = _tensors(tmp_path / "ours"), _tensors(tmp_path / "llmc")
    if scheme == "FP8_BLOCK":
        theirs = {k: v for k, v in theirs.items() if "down_proj" not in k}
        ours = {k: v for k, v in ours.items() if "down_proj" not in k}
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k] == theirs[k], k
    qc = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]
          for d in ("ours", "llmc")]
    assert set(qc[0]) == set(qc[1])
    for k in qc[0]:
        if k not in ("config_groups", "ignore"):
            assert qc[0][k] == qc[1][k], k
    g = [q["config_groups"]["group_0"] for q in qc]
    assert g[0]["format"] == g[1]["format"] and g[0]["targets"] == g[1]["targets"]
    for key in ("weights", "input_activations"):
        a, b = g[0][key], g[1][key]
        if b is None:
            assert a is None
            continue
        a, b = dict(a, actorder=None), dict(b, actorder=None)   # GPTQ's "static" on our side
        assert a == b, key
