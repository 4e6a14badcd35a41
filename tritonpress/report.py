"""The compress report: what compression cost in quality and what it produced."""
from __future__ import annotations

import contextvars
import json
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def dir_size(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def peak_cpu_bytes() -> int:
    # ru_maxrss is in KiB on Linux; it is the process peak, not this step's.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def timed(report: dict, key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        report.setdefault("seconds", {})[key] = round(time.perf_counter() - t0, 3)


# ----------------------------------------------------------------------------- profile

_PROFILE: contextvars.ContextVar = contextvars.ContextVar("tritonpress_profile", default=None)


@contextmanager
def profiling():
    """Collect the seconds of every `step` run inside, as {name: [seconds, calls]}; each step's
    seconds exclude the steps nested in it, so they add up to the time covered."""
    prof: dict = {}
    token = _PROFILE.set((prof, []))
    try:
        yield prof
    finally:
        _PROFILE.reset(token)


@contextmanager
def step(name: str, device=None):
    """Time a step of the run into the active profile (free when none is active). On a CUDA
    device the clock waits for the device at both ends, so queued kernels count where they ran."""
    active = _PROFILE.get()
    if active is None:
        yield
        return
    prof, stack = active
    sync = (torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda"
            else lambda: None)
    sync()
    stack.append(0.0)                  # seconds of the steps nested in this one
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sync()
        total = time.perf_counter() - t0
        nested = stack.pop()
        if stack:
            stack[-1] += total
        entry = prof.setdefault(name, [0.0, 0])
        entry[0] += total - nested
        entry[1] += 1


def profile_table(prof: dict, total: float | None = None) -> list[tuple[str, float, int]]:
    """(step, seconds, calls) rows, largest first, plus "other" (total minus the steps)."""
    rows = sorted(((k, v[0], v[1]) for k, v in prof.items()), key=lambda r: -r[1])
    if total is not None:
        rows.append(("other", max(0.0, total - sum(r[1] for r in rows)), 0))
    return rows


def _fmt(x, nd=4):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def format_report(r: dict) -> str:
    """A terminal table of the report's headline numbers."""
    method = r["method"]
    if "gptq" in method:          # gptq, awq+gptq: the activation order GPTQ swept in
        method += f", actorder {(r.get('options') or {}).get('actorder') or 'none'}"
    lines = [f"tritonpress: {r['model']} -> {r['scheme']} ({method})"]
    q = r.get("quality") or {}
    srcs = [k for k, v in q.items() if isinstance(v, dict)]
    if srcs:
        rows = [("held-out text", "ppl before", "ppl after", "change", "mean KL")]
        for src in srcs:
            b, a = q[src]["ppl_before"], q[src]["ppl"]
            rows.append((f"{src} ({q['windows']}x{q['seq_len']})", _fmt(b, 3), _fmt(a, 3),
                         f"{100 * (a / b - 1):+.2f}%", _fmt(q[src]["kl"], 5)))
        w = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            lines.append("  " + "  ".join(str(c).ljust(w[i]) for i, c in enumerate(row)))
        if q.get("act_sim"):
            lines.append(f"  activations: {q['act_sim']}")
    dtype = (r.get("dtype") or {}).get("dtype", "bfloat16")
    if r.get("dtype"):
        lines.append(f"  dtype: {dtype} ({r['dtype']['why']})")
    s = r.get("seconds", {})
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s.items()))
    if r.get("profile"):
        lines.append("  compress step: " + ", ".join(
            f"{k} {v['seconds']:.1f}s" for k, v in r["profile"].items()))
    mem = r.get("memory", {})
    if mem:
        lines.append("  peak memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in mem.items()))
    if r.get("size_bytes"):      # like with like: tensor files against parameter bytes
        lines.append(f"  weights on disk: {r['tensor_bytes'] / 2**20:.1f} MiB of safetensors "
                     f"(uncompressed {dtype} parameters {r['original_bytes'] / 2**20:.1f} MiB); "
                     f"the whole folder {r['size_bytes'] / 2**20:.1f} MiB")
    ex = r.get("experts")
    if ex and ex.get("layers"):        # Mixture-of-Experts: nothing left out silently
        rows = ex["layers"].values()
        total = sum(v["experts"] for v in rows)
        done = sum(v["compressed"] for v in rows)
        fell = sum(v["fell_back"] for v in rows)
        line = f"  experts: {done} of {total} in {len(ex['layers'])} MoE blocks compressed"
        if ex["calibration"]:
            line += (f" by the method, {fell} rounded to nearest (too few calibration tokens); "
                     f"statistics from {ex['calibration']} tokens; least-routed expert "
                     f"{100 * min(v['least_routed_share'] for v in rows):.2f}% of a block's "
                     "tokens")
        lines.append(line)
    kept = r.get("not_quantized")
    if kept:
        names = sorted(kept)
        lines.append(f"  not quantized ({dtype}): {len(names)} Linear(s), "
                     f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''} "
                     f"({', '.join(sorted(set(kept.values())))})")
    if r.get("out"):
        lines.append(f"  checkpoint: {r['out']}")
    for note in r.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def save_json(r: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(r, indent=2, default=str))


def peak_memory(device: torch.device) -> dict:
    mem = {"cpu_rss": peak_cpu_bytes()}
    if device.type == "cuda":
        mem["gpu"] = torch.cuda.max_memory_allocated(device)
    return mem
