"""Are two versions of tritonpress writing the same checkpoints? (refactors are checked so)

Compresses one model with every scheme and method, once with the tritonpress found in each of
two source trees (e.g. a `git worktree` of an older commit and this one), each in its own
process, and compares the checkpoint directories file by file, byte by byte. A tree older than
the recipe API (before the methods became objects) is driven through its old keywords.

  git worktree add /tmp/old 47942a6
  python bench/same_checkpoints.py /tmp/old . --model smollm2-135m --out-dir out/same
  python bench/same_checkpoints.py /tmp/old . --stream-b off     # the in-memory path too

Prints one row per scheme and method: identical, or the files that differ.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CASES = [("W8A8_FP8", "rtn", {}), ("W4A16", "gptq", {"group_size": 32}),
         ("W8A8_INT8", "gptq", {"smoothquant": 0.5}), ("W4A16_ASYM", "awq", {"group_size": 32}),
         ("W4A16", "awq+gptq", {"group_size": 32}), ("W8A8_FP8_24", "sparsegpt", {}),
         ("W8A8_FP8_24", "sparsegpt", {"actorder": None}), ("W8A8_FP8_24", "magnitude", {})]

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
c = json.loads(sys.argv[2])
extra = {"stream": c["stream"]} if c["stream"] else {}
try:
    import tritonpress as tp
    from tritonpress.recipe import recipe_from_flags
except ImportError:          # a tree from before the recipe API
    from tritonpress.compress.api import compress
    compress(c["model"], c["scheme"], c["out"], method=c["method"], dataset="canterbury",
             num_samples=c["n"], seq_len=c["seq"], evaluate_quality=False, progress=False,
             device="cpu", overwrite=True, **c["opts"], **extra)
    sys.exit(0)
opts = dict(c["opts"])
if "actorder" in opts and opts["actorder"] is None:    # None is "unset" to the flags
    opts["actorder"] = "none"
scheme = tp.get_scheme(c["scheme"], group_size=opts.pop("group_size", None))
tp.compress(c["model"], scheme, c["out"], recipe_from_flags(scheme, c["method"], **opts),
            calibration=tp.Calibration("canterbury", c["n"], c["seq"]), evaluation=None,
            run=tp.Run(device="cpu", overwrite=True, progress=False, **extra))
"""


def differing(a: Path, b: Path) -> list[str]:
    fa = {p.name for p in a.iterdir() if p.is_file()}
    fb = {p.name for p in b.iterdir() if p.is_file()}
    out = sorted(fa ^ fb)
    out += [n for n in sorted(fa & fb) if (a / n).read_bytes() != (b / n).read_bytes()]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tree_a")
    p.add_argument("tree_b")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--stream-b", default=None, help="stream option for tree b (auto/on/off)")
    p.add_argument("--out-dir", default="out/same_checkpoints")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    rows = []
    for scheme, method, opts in CASES:
        label = method + "".join(f" {k}={v}" for k, v in opts.items())
        dirs = []
        for tag, tree, stream in (("a", a.tree_a, None), ("b", a.tree_b, a.stream_b)):
            d = out / f"{scheme}-{label.replace(' ', '-')}-{tag}"
            c = dict(model=a.model, scheme=scheme, method=method, opts=opts, n=a.samples,
                     seq=a.seq_len, out=str(d), stream=stream)
            r = subprocess.run([sys.executable, "-c", CHILD, str(Path(tree).resolve()),
                                json.dumps(c)], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{scheme} {label} ({tree}): {r.stderr.strip().splitlines()[-1]}")
            dirs.append(d)
        diff = differing(*dirs)
        rows.append((scheme, label, "identical" if not diff else "differ: " + ", ".join(diff)))
        print(f"| {scheme} | {label} | {rows[-1][2]} |", flush=True)
    return 0 if all(r[2] == "identical" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
