"""Plotting helpers shared by the bench scripts (matplotlib, Agg backend: no display needed).

Every function returns the path it wrote, or None when matplotlib is not installed: the
benchmarks still print their tables and write JSON on a machine without it.
"""
from __future__ import annotations

import math
import textwrap

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # the numbers matter more than the pictures
    plt = None

# one colour and marker per scheme, the same in every plot
STYLE = {
    "bf16": ("#444444", "o"),
    "W4A16": ("#1f77b4", "s"),
    "W8A8-INT8": ("#ff7f0e", "^"),
    "W8A8-FP8": ("#2ca02c", "D"),
    "2:4-FP8": ("#d62728", "v"),
    "FP8 _scaled_mm": ("#9467bd", "x"),
}


def available() -> bool:
    return plt is not None


def _style(name: str, i: int):
    if name in STYLE:
        return STYLE[name]
    return (f"C{i % 10}", "o")


def speedup_plot(path, ms: list[int], tokens_per_s: dict[str, list], speedup: dict[str, list],
                 crossovers: list[dict], title: str, note: str = ""):
    """Two panels over batch rows M (log2 axis): tokens/s per scheme, and speedup over bf16
    with a line at 1x. Each crossover {label, m} (m may be fractional: interpolated) is a
    dashed vertical line with its label, on both panels."""
    if plt is None:
        return None
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(14, 5.6))
    for i, (name, ys) in enumerate(tokens_per_s.items()):
        color, marker = _style(name, i)
        pts = [(m, y) for m, y in zip(ms, ys) if y]
        if pts:
            ax_t.plot(*zip(*pts), marker=marker, color=color, label=name, lw=1.6, ms=5)
        pts = [(m, y) for m, y in zip(ms, speedup.get(name, [])) if y]
        if pts:
            ax_s.plot(*zip(*pts), marker=marker, color=color, label=name, lw=1.6, ms=5)
    ax_s.axhline(1.0, color="#888888", lw=1, ls=":")
    spread = [y for ys in speedup.values() for y in ys if y]
    if spread and max(spread) / min(spread) > 30:   # CPU references: orders of magnitude apart
        ax_s.set_yscale("log")
    for ax in (ax_t, ax_s):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms)
        ax.set_xticklabels([str(m) for m in ms], rotation=45 if len(ms) > 8 else 0)
        ax.set_xlabel("batch rows M (tokens per forward)")
        ax.grid(True, which="major", alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("tokens / s")
    ax_t.set_title("throughput")
    ax_s.set_ylabel("speedup over bf16 (x)")
    ax_s.set_title("speedup over bf16")
    top = max([y for ys in speedup.values() for y in ys if y] + [1.0])
    for j, c in enumerate(crossovers):
        if c.get("m") is None:
            continue
        color = _style(c.get("scheme", ""), j)[0]
        for ax in (ax_t, ax_s):
            ax.axvline(c["m"], color=color, ls="--", lw=1.2, alpha=0.8)
        ax_s.annotate(f"{c['label']}\nM≈{_fmt_m(c['m'])}", xy=(c["m"], top * (0.97 - 0.13 * j)),
                      xytext=(5, 0), textcoords="offset points", fontsize=8, color=color,
                      va="top", bbox=dict(boxstyle="round,pad=0.2", fc="white", ec=color,
                                          alpha=0.85))
    ax_t.legend(fontsize=9, loc="upper left")
    ax_s.legend(fontsize=9, loc="best")
    fig.suptitle(title, fontsize=11)
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, color="#555555")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bar_plot(path, categories: list[str], series: dict[str, list], ylabel: str, title: str,
             note: str = "", log: bool = False):
    """Grouped bars: one group per category, one bar per series (None = not measured)."""
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * len(categories) + 2), 4.8))
    width = 0.8 / max(1, len(series))
    for i, (name, ys) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        vals = [y if y is not None else 0.0 for y in ys]
        bars = ax.bar(xs, vals, width, label=name, color=f"C{i}")
        for b, y in zip(bars, ys):
            ax.annotate("n/a" if y is None else _fmt_num(y), (b.get_x() + b.get_width() / 2,
                        b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=10)
    ax.legend(fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, color="#555555")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_m(m: float) -> str:
    return str(int(round(m))) if m >= 10 or float(m).is_integer() else f"{m:.1f}"


def _fmt_num(y: float) -> str:
    if y == 0 or not math.isfinite(y):
        return str(y)
    return f"{y:.3g}"
