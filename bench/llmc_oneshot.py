"""Run llm-compressor's `oneshot` on the same model and calibration windows as tritonpress.

Runs inside llm-compressor's own environment (`make llmc-env` makes .venv-llmc), called by
bench/bench_vs_llmcompressor.py:

  .venv-llmc/bin/python bench/llmc_oneshot.py --model DIR --calib calib.pt \
      --recipe gptq-w4a16 --group-size 64 --out OUT

Recipes: the named ones below, and for llm-compressor's preset schemes (FP8_BLOCK, NVFP4A16,
NVFP4, MXFP4A16, MXFP4, W4A8, W4AFP8, ...) "gptq-SCHEME" (GPTQModifier) or "rtn-SCHEME"
(QuantizationModifier, no solve); --group-size then changes an int preset's group (W4A8,
W4AFP8), never an fp4 format's own (16 for NVFP4, 32 for MXFP4).

Prints one JSON line: {"seconds": oneshot wall time, "save_seconds": save_pretrained's,
"out": OUT}.
"""
import argparse
import json
import time

import torch


def recipe_for(name: str, group_size: int):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    w4 = {"group_0": {"targets": ["Linear"],
                      "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                  "strategy": "group", "group_size": group_size}}}
    if name == "gptq-w4a16":
        return GPTQModifier(targets="Linear", ignore=["lm_head"], config_groups=w4)
    if name == "gptq-w8a8":
        return GPTQModifier(targets="Linear", ignore=["lm_head"], scheme="W8A8")
    if name == "smoothquant-gptq-w8a8":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets="Linear", ignore=["lm_head"], scheme="W8A8")]
    if name == "fp8":
        return QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme="FP8_DYNAMIC")
    if name == "sparsegpt-fp8":
        # SparseGPT's targets are the decoder layers it walks ("Linear" matched no layer and
        # pruned nothing: dense weights, measured 2026-12-02); lm_head stays dense
        from llmcompressor.modifiers.pruning import SparseGPTModifier
        return [SparseGPTModifier(sparsity=0.5, mask_structure="2:4",
                                  targets=[r"re:model\.layers\.\d+$"], ignore=["lm_head"]),
                QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme="FP8_DYNAMIC")]
    kind, _, preset = name.partition("-")
    if kind in ("gptq", "rtn") and preset.isupper():
        from compressed_tensors.quantization import preset_name_to_scheme
        scheme = preset_name_to_scheme(preset, ["Linear"])
        if group_size and scheme.weights.type == "int" and scheme.weights.strategy == "group":
            scheme.weights.group_size = group_size
        groups = {"group_0": scheme}
        cls = GPTQModifier if kind == "gptq" else QuantizationModifier
        return cls(targets="Linear", ignore=["lm_head"], config_groups=groups)
    if name == "awq-w4a16-asym":
        from llmcompressor.modifiers.awq import AWQModifier
        return AWQModifier(targets="Linear", ignore=["lm_head"], scheme="W4A16_ASYM")
    raise SystemExit(f"unknown recipe {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="torch file: int64 tensor [samples, seq_len]")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(torch.get_num_threads())
    ids = torch.load(args.calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(),
                            "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe_for(args.recipe, args.group_size),
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.out:                # compresses the weights (FP8: the cast itself) and writes them
        model.save_pretrained(args.out, save_compressed=True)
        tok.save_pretrained(args.out)
    print(json.dumps({"seconds": seconds, "save_seconds": time.perf_counter() - t0,
                      "out": args.out}))


if __name__ == "__main__":
    main()
