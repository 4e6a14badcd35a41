"""Each claim users choose a scheme by, with the measured evidence for or against it.

    python bench/summarize.py OUT_DIR        # after bash bench/gpu_check.sh OUT_DIR

Reads OUT_DIR/qps/qps.json and OUT_DIR/compress/compress_speed.json (and env.json when
gpu_check wrote it), prints the verdicts and writes OUT_DIR/SUMMARY.md: markdown tables and
verdicts ready for the README, naming the card, date and versions. A verdict is computed
from the numbers: supported, partly (where), not supported, or not measured.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

LOW_M = [1, 2, 4, 8, 16]            # decode of a few sequences: "low QPS"
HIGH_M = [1024, 2048, 4096]         # prefill chunks, big decode batches: "high QPS", offline
MID_HIGH_M = [256, 512, 1024, 2048, 4096]
W8A8 = ("W8A8-INT8", "W8A8-FP8")


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _ms_table(q: dict) -> dict:
    """(scheme, M) -> ms"""
    return {(r["scheme"], r["m"]): r["ms"] for r in q["results"] if r.get("ms")}


def _verdict(ok_ms: list[int], measured: list[int]) -> str:
    if not measured:
        return "not measured"
    if len(ok_ms) == len(measured):
        return "supported"
    if ok_ms:
        return f"partly (M = {', '.join(map(str, ok_ms))} of {', '.join(map(str, measured))})"
    return "not supported"


def qps_claims(q: dict) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) rows from the QPS benchmark."""
    t = _ms_table(q)
    fastest = {int(m): s for m, s in q["fastest"].items()}
    cap = q["info"].get("capability")
    rows = []

    def sp(s, m):
        return t[("bf16", m)] / t[(s, m)] if (s, m) in t and ("bf16", m) in t else None

    low = [m for m in LOW_M if m in fastest]
    ok = [m for m in low if fastest[m] == "W4A16"]
    ev = ", ".join(f"M={m}: W4A16 {sp('W4A16', m):.2f}x bf16, fastest {fastest[m]}"
                   for m in low if sp("W4A16", m))
    rows.append(("W4A16 is the fastest scheme at low QPS (M <= 16 tokens per forward)",
                 _verdict(ok, low), ev))

    high = [m for m in HIGH_M if m in fastest]
    ok = [m for m in high if all((s, m) in t and t[(s, m)] < t.get(("W4A16", m), float("inf"))
                                 and t[(s, m)] < t.get(("bf16", m), float("inf"))
                                 for s in W8A8 if (s, m) in t)
          and any((s, m) in t for s in W8A8)]
    ev = ", ".join(f"M={m}: " + ", ".join(f"{s} {sp(s, m):.2f}x" for s in ("W4A16",) + W8A8
                                          if sp(s, m)) for m in high)
    rows.append(("W8A8 beats W4A16 and bf16 at high QPS / offline (M >= 1024)",
                 _verdict(ok, high), ev))

    for c in q["crossovers"]:
        if c["loser"] == "W4A16" and c["winner"] in W8A8:
            if c["status"] == "crosses":
                verdict = f"M = {c['m']} (interpolated ≈ {c['m_interp']})"
                ev = (f"{c['winner']} is faster than W4A16 at every measured M >= {c['m']} and "
                      f"slower at M = {c['between'][0]}; the log speed ratio crosses zero at "
                      f"M ≈ {c['m_interp']}")
            elif c["status"] == "ahead at every measured M":
                verdict, ev = f"M = {c['m']} (faster everywhere)", c["status"]
            else:
                verdict, ev = "none", c["status"]
            rows.append((f"Crossover: batch size from which {c['winner']} is faster than W4A16",
                         verdict, ev))

    mh = [m for m in MID_HIGH_M if ("W8A8-FP8", m) in t and ("W8A8-INT8", m) in t]
    ok = [m for m in mh if t[("W8A8-FP8", m)] <= t[("W8A8-INT8", m)]]
    ev = ", ".join(f"M={m}: FP8/INT8 time {t[('W8A8-FP8', m)] / t[('W8A8-INT8', m)]:.2f}"
                   for m in mh)
    hopper = cap is not None and tuple(cap) >= (9, 0)
    rows.append(("FP8 on Hopper: W8A8-FP8 at least as fast as W8A8-INT8 (M >= 256)",
                 _verdict(ok, mh) if hopper else
                 f"not tested (card is {'CPU' if cap is None else 'sm%d%d' % tuple(cap)}, "
                 "not Hopper)", ev))

    mh = [m for m in MID_HIGH_M if ("2:4-FP8", m) in t and ("W8A8-FP8", m) in t]
    ok = [m for m in mh if t[("2:4-FP8", m)] < t[("W8A8-FP8", m)]]
    kern = sorted({k for r in q["results"] if r["scheme"] == "2:4-FP8"
                   for k in r.get("kernels", [])})
    ev = ", ".join(f"M={m}: 2:4/dense time {t[('2:4-FP8', m)] / t[('W8A8-FP8', m)]:.2f}"
                   for m in mh) + f" (kernels: {', '.join(kern) or '-'})"
    rows.append(("2:4 + FP8 is faster still than dense FP8 (M >= 256)", _verdict(ok, mh), ev))
    return rows


def compress_claims(c: dict) -> list[tuple[str, str, str]]:
    ours = {r["scheme"]: r for r in c["results"] if r["tool"] == "tritonpress" and "error" not in r}
    theirs = {r["scheme"]: r for r in c["results"]
              if r["tool"] == "llm-compressor" and "error" not in r}
    rows = []
    for s, r in ours.items():
        if s not in theirs:
            rows.append((f"{s} ({r['method']}) compresses faster than llm-compressor",
                         "not measured", f"ours {r['seconds']:.2f} s; llm-compressor not run"))
            continue
        t = theirs[s]
        ev = (f"ours {r['seconds']:.2f} s vs {t['seconds']:.2f} s "
              f"({t['seconds'] / r['seconds']:.2f}x)")
        g, gt = r.get("peak_gpu_bytes"), t.get("peak_gpu_bytes")
        if g and gt:
            ev += f"; peak GPU {g / 2**30:.2f} vs {gt / 2**30:.2f} GiB"
        rows.append((f"{s} ({r['method']}) compresses faster than llm-compressor",
                     "supported" if r["seconds"] < t["seconds"] else "not supported", ev))
    return rows


def md_qps_table(q: dict) -> str:
    t = _ms_table(q)
    schemes = q["schemes"]
    lines = ["| M | " + " | ".join(f"{s} ms (x bf16)" for s in schemes) + " | fastest |",
             "|---" * (len(schemes) + 2) + "|"]
    for m in q["ms"]:
        cells = []
        for s in schemes:
            if (s, m) not in t:
                cells.append("-")
            elif s == "bf16":
                cells.append(f"{t[(s, m)]:.4f}")
            else:
                cells.append(f"{t[(s, m)]:.4f} ({t[('bf16', m)] / t[(s, m)]:.2f}x)"
                             if ("bf16", m) in t else f"{t[(s, m)]:.4f}")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {q['fastest'].get(str(m), '-')} |")
    return "\n".join(lines)


def md_compress_table(c: dict) -> str:
    lines = ["| scheme | tool | method | seconds | peak GPU GiB | peak RSS GiB | speedup vs llmc |",
             "|---|---|---|---|---|---|---|"]
    for r in c["results"]:
        if r.get("error"):
            lines.append(f"| {r['scheme']} | {r['tool']} | {r['method']} | failed: "
                         f"{r['error'][:60]} | | | |")
            continue
        g = r.get("peak_gpu_bytes")
        lines.append(f"| {r['scheme']} | {r['tool']} | {r['method']} | {r['seconds']:.2f} | "
                     f"{g / 2**30:.2f} | " if g else
                     f"| {r['scheme']} | {r['tool']} | {r['method']} | {r['seconds']:.2f} | - | ")
        rss = r.get("peak_rss_bytes")
        lines[-1] += f"{rss / 2**30:.2f} | " if rss else "- | "
        lines[-1] += (f"{r['speedup_vs_llmc']:.2f}x |" if r.get("speedup_vs_llmc") else "- |")
    return "\n".join(lines)


def summarize(out_dir: str) -> str:
    out = Path(out_dir)
    q = _load(out / "qps" / "qps.json")
    c = _load(out / "compress" / "compress_speed.json")
    env = _load(out / "env.json") or {}
    parts = ["# Measured evidence for the scheme claims", ""]
    info = (q or c or {}).get("info", {})
    card = env.get("gpu") or info.get("device", "?")
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v) or \
        f"torch {info.get('torch')}, triton {info.get('triton')}"
    parts.append(f"Card: **{card}**; date {info.get('date', '?')}; {versions}.")
    if info.get("device") == "cpu" or info.get("mode") == "cpu-reference":
        parts.append("\n**CPU reduced mode: torch references on tiny shapes. These numbers are "
                     "not evidence for any claim.**")
    if q:
        shapes = ", ".join(f"{s['name']} {s['n']}x{s['k']}" for s in q["info"]["shapes"])
        what = "one Llama-3-8B decoder layer's" if q["info"]["layer"] == "llama-3-8b" else \
            "a tiny layer's"
        parts += ["", f"## QPS: {what} linears ({shapes}), per forward of M tokens",
                  "", "![qps](qps/qps.png)", "", md_qps_table(q), "",
                  "| claim | verdict | evidence |", "|---|---|---|"]
        parts += [f"| {a} | {b} | {e} |" for a, b, e in qps_claims(q)]
        skipped = q["info"].get("skipped_m")
        if skipped:
            parts.append(f"\nNot measured (time budget): M = {skipped}.")
    else:
        parts += ["", "QPS benchmark: no results (qps/qps.json missing)."]
    if c:
        i = c["info"]
        parts += ["", f"## Compression speed: 2-layer {i['shape']} Llama, {i['samples']} x "
                  f"{i['seq_len']} calibration tokens, llm-compressor {i.get('llmc') or 'not run'}",
                  "", "![compress](compress/compress_speed.png)", "", md_compress_table(c),
                  "", "| claim | verdict | evidence |", "|---|---|---|"]
        parts += [f"| {a} | {b} | {e} |" for a, b, e in compress_claims(c)]
    else:
        parts += ["", "Compression speed: no results (compress/compress_speed.json missing)."]
    text = "\n".join(parts) + "\n"
    (out / "SUMMARY.md").write_text(text)
    return text


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python bench/summarize.py OUT_DIR")
    print(summarize(args[0]))


if __name__ == "__main__":
    main()
