"""Command line: `tritonpress compress`, `tritonpress eval`, `tritonpress schemes`."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _add_common(p):
    from .recipe import DTYPES, Evaluation
    from .schemes import ACT_SIMS
    ev = Evaluation()
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m, gemma3-270m) or a local Hugging Face model "
                        "directory")
    p.add_argument("--eval-dataset", default=ev.dataset,
                   help="held-out text for perplexity/KL (built-in: canterbury, code; or files)")
    p.add_argument("--eval-windows", type=int, default=ev.windows)
    p.add_argument("--eval-seq-len", type=int, default=ev.seq_len)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype to load the model in (default auto: the model's own, from its "
                        "config.json; bfloat16 if it names none)")
    p.add_argument("--act-sim", default=ev.act_sim, choices=ACT_SIMS,
                   help="how W8A8 activation quantization is simulated for KL/perplexity: as "
                        "vLLM's kernels round (int8 scale absmax/127, default) or as "
                        "compressed-tensors' fake quantization (absmax/127.5)")
    p.add_argument("--cache-dir", default=None, help="where converted models and data are cached")
    p.add_argument("--no-progress", action="store_true")


def _size(text: str) -> int:
    """'500MB', '2GB', '1GiB' or a byte count -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10,
             "mib": 2**20, "gib": 2**30}
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    try:
        return int(float(num) * units[t[len(num):]])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 500MB or 2GB")


CALIBRATION = ("dataset", "num_samples", "seq_len", "seed", "experts", "chat_template")
EVALUATION = {"eval_dataset": "dataset", "eval_windows": "windows", "eval_seq_len": "seq_len",
              "act_sim": "act_sim"}
METHOD_OPTIONS = ("smoothquant", "damp", "block_size", "actorder", "clip", "clip_damp",
                  "clip_min", "refit", "sequential", "permute")


def compress_from_flags(model, scheme, out=None, *, method=None, group_size=None,
                        symmetric=None, ignore=None, evaluate_quality=True, **flags) -> dict:
    """compress() called with the flags' flat keywords, as `tritonpress compress` does (and
    scripts that sweep options): the method options (damp, actorder, ...) to the recipe
    (recipe.recipe_from_flags), dataset/num_samples/seq_len/seed to Calibration, eval_* and
    act_sim to Evaluation, the rest to Run. An unset flag keeps its object's default."""
    from .api import compress
    from .recipe import Calibration, Evaluation, Run, recipe_from_flags
    from .schemes import get_scheme
    scheme = get_scheme(scheme, group_size=group_size, symmetric=symmetric, ignore=ignore)
    recipe = recipe_from_flags(scheme, method, **{k: flags.pop(k) for k in METHOD_OPTIONS
                                                  if k in flags})
    calibration = Calibration(**{k: flags.pop(k) for k in CALIBRATION if k in flags})
    evaluation = Evaluation(**{v: flags.pop(k) for k, v in EVALUATION.items() if k in flags})
    return compress(model, scheme, out, recipe, calibration=calibration,
                    evaluation=evaluation if evaluate_quality else None, run=Run(**flags))


def terminate_as_interrupt() -> None:
    """SIGTERM (a job scheduler's stop, `kill`, a timeout) ends the run as Ctrl-C does, through
    the same cleanup: the temporary checkpoint directory is removed, nothing half-written
    stays (Python's default for SIGTERM is to die on the spot)."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tritonpress", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    from .recipe import METHODS, Calibration

    cal = Calibration()                    # the defaults, written once (recipe.py, methods/)
    c = sub.add_parser("compress", help="compress a model into a compressed-tensors checkpoint")
    _add_common(c)
    c.add_argument("--scheme", default="W8A8_FP8",
                   help="W4A16, W4A16_ASYM, W8A8_INT8 (W8A8), W8A8_FP8 (FP8_DYNAMIC), W8A8_FP8_24")
    c.add_argument("--method", default=None,
                   help=f"{', '.join(METHODS)} (default: by scheme: GPTQ for int schemes, "
                        "RTN for W8A8_FP8, SparseGPT for W8A8_FP8_24)")
    c.add_argument("--out", required=True, help="output checkpoint directory")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument("--dataset", default=cal.dataset,
                   help="calibration text: canterbury, code, a+b mixes, .txt/.jsonl files, "
                        "or a `datasets` name")
    c.add_argument("--num-samples", type=int, default=cal.num_samples)
    c.add_argument("--seq-len", type=int, default=cal.seq_len)
    c.add_argument("--seed", type=int, default=cal.seed)
    c.add_argument("--experts", default=cal.experts, choices=["all", "routed"],
                   help="Mixture-of-Experts: each expert's statistics from every token (all, "
                        "the layer's output still routed) or from the tokens routed to it")
    c.add_argument("--chat-template", action="store_true",
                   help="instruct models: each calibration window one user turn rendered by "
                        "the model's chat template (default: plain text, BOS first when the "
                        "tokenizer adds one)")
    c.add_argument("--group-size", type=int, default=None)
    c.add_argument("--asym", action="store_true", help="asymmetric int weights")
    c.add_argument("--ignore", nargs="*", default=None,
                   help="module names (or re:regex) to leave unquantized (default: lm_head)")
    # each method's own options: unset means the method's default (methods/*.py)
    c.add_argument("--damp", type=float, default=None,
                   help="GPTQ's and SparseGPT's dampening, a fraction of the Hessian's mean "
                        "diagonal (default 0.01; GPTQ on the fp4 grids 0.1)")
    c.add_argument("--block-size", type=int, default=None, help="GPTQ/SparseGPT column block")
    c.add_argument("--actorder", default=None, choices=["static", "none"],
                   help="activation order of GPTQ and SparseGPT: static (default; GPTQ as "
                        "llm-compressor: columns swept by decreasing Hessian diagonal, groups "
                        "kept on the original columns, no g_idx; SparseGPT: its 2:4 groups "
                        "by decreasing Hessian diagonal) or none")
    c.add_argument("--clip", default=None, choices=["on", "off"],
                   help="clipping search of 4-bit group scales, AWQ's and GPTQ's (default on)")
    c.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant before the quantizer with strength ALPHA (e.g. 0.5)")
    c.add_argument("--refit", type=float, default=None, metavar="RIDGE",
                   help="SparseGPT: refit the kept weights for the chosen 2:4 mask under "
                        "H + RIDGE * mean(diag H) * I before the fp8 sweep (e.g. 0.1; "
                        "default off)")
    c.add_argument("--sequential", default=None, choices=["on", "off"],
                   help="SparseGPT: each group's Hessian (q/k/v, o, gate/up, down) from the "
                        "layer with the groups before it already compressed (default off)")
    c.add_argument("--permute", default=None, choices=["on", "off"],
                   help="SparseGPT: reorder the inputs of down_proj and o_proj (with the "
                        "rows of gate/up and v: the same function) so no 2:4 group holds 4 "
                        "important channels (default on)")
    c.add_argument("--sparse-format", default="dense", choices=["dense", "sparse-24-bitmask"])
    c.add_argument("--no-eval", action="store_true", help="skip perplexity/KL")
    c.add_argument("--resume-dir", default=None,
                   help="save per-layer state there; rerun with it to resume after a crash")
    c.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                   help="one decoder layer in memory at a time, from the model's safetensors "
                        "shards to the checkpoint's (default auto: whenever the model "
                        "directory allows it; off: load the whole model)")
    c.add_argument("--max-shard-size", default=None, type=_size,
                   help="checkpoint shard size, e.g. 500MB or 2GB (default 1GB)")
    c.add_argument("--spill-dir", default=None,
                   help="keep cached calibration activations in files there, not in memory")
    c.add_argument("--json", default=None, help="write the report here (default: OUT.report.json)")

    e = sub.add_parser("eval", help="perplexity and KL of a checkpoint against its base model")
    _add_common(e)
    e.add_argument("--checkpoint", required=True, help="compressed-tensors checkpoint directory")
    e.add_argument("--json", default=None)

    sub.add_parser("schemes", help="list the schemes")
    args = ap.parse_args(argv)
    terminate_as_interrupt()

    try:
        if args.cmd == "schemes":
            from .schemes import ALIASES, PRESETS
            for name, s in PRESETS.items():
                aliases = [a for a, t in ALIASES.items() if t == name]
                print(f"{name:12s} weights {s.weights.type}{s.weights.num_bits} "
                      f"{s.weights.strategy}{'' if s.weights.group_size is None else s.weights.group_size}"
                      f"{' sym' if s.weights.symmetric else ' asym'}"
                      f"{'' if s.input_activations is None else ', activations ' + s.input_activations.type + '8 per token'}"
                      f"{', 2:4 sparse' if s.sparsity_24 else ''}"
                      f"{'  aliases: ' + ', '.join(aliases) if aliases else ''}")
            return 0
        if args.cmd == "compress":
            from .loop.distributed import init_from_env
            init_from_env()          # torchrun: Hessians all-reduced over the ranks
            onoff = {"on": True, "off": False, None: None}
            compress_from_flags(
                args.model, args.scheme, args.out, method=args.method,
                group_size=args.group_size, symmetric=False if args.asym else None,
                ignore=args.ignore, smoothquant=args.smoothquant, damp=args.damp,
                block_size=args.block_size, actorder=args.actorder, clip=onoff[args.clip],
                refit=args.refit, sequential=onoff[args.sequential],
                permute=onoff[args.permute], dataset=args.dataset,
                num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
                experts=args.experts, chat_template=args.chat_template,
                evaluate_quality=not args.no_eval, eval_dataset=args.eval_dataset,
                eval_windows=args.eval_windows, eval_seq_len=args.eval_seq_len,
                act_sim=args.act_sim, device=args.device, dtype=args.dtype,
                cache_dir=args.cache_dir, progress=not args.no_progress,
                overwrite=args.overwrite, resume_dir=args.resume_dir, spill_dir=args.spill_dir,
                stream=args.stream, max_shard_bytes=args.max_shard_size,
                sparse_format=args.sparse_format, report_path=args.json, print_report=True)
            return 0
        if args.cmd == "eval":
            from .api import evaluate
            from .recipe import Evaluation, Run
            r = evaluate(args.checkpoint, args.model,
                         evaluation=Evaluation(args.eval_dataset, args.eval_windows,
                                               args.eval_seq_len, args.act_sim),
                         run=Run(device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
                                 progress=not args.no_progress))
            print(json.dumps(r, indent=2))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(r, f, indent=2)
            return 0
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        # a user's error in one line; TRITONPRESS_DEBUG=1 shows where it was raised
        if os.environ.get("TRITONPRESS_DEBUG"):
            raise
        print(f"tritonpress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tritonpress: interrupted; no checkpoint was written", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
