"""Markdown summary of a CPU results file written by bench/test_cpu.py.

    python -m bench.cpu_report bench/results/cpu-<date>-<machine>.json

Prints the target table (4096x4096, 1 thread, forward), then per shape / threads /
direction the dispatched path of every format as a ratio against dense fp32 ``F.linear`` (> 1 is
faster) and against the best peer, with the path each ran.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

FORMATS = ["int8_weight_only", "int4_weight_only_g128", "int8_dynamic", "fp8_dynamic", "sparse24",
           "sparse24_int4_g128"]
#: the CPU speed targets: format -> {M: minimum ratio vs dense fp32}, at 4096x4096
TARGETS = {"int8_weight_only": {1: 2.0, 16: 2.0, 256: 0.95}, "int4_weight_only_g128": {1: 2.5, 16: 2.0, 256: 0.95},
           "int8_dynamic": {1: 1.5, 16: 1.5, 256: 1.0}, "sparse24": {1: 1.3, 16: 1.2, 256: 0.95},
           "sparse24_int4_g128": {1: 2.5, 16: 1.5, 256: 0.95}}


def _index(rows):
    out = {}
    for r in rows:
        if r.get("direction") == "overhead":
            continue
        out[(r["K"], r["N"], r["threads"], r["direction"], r["M"], r["impl"])] = r
    return out


def targets(rows) -> str:
    idx = _index(rows)
    lines = ["| format | M | target | measured (path) | met |", "|---|---|---|---|---|"]
    for fmt, per_m in TARGETS.items():
        for m, target in per_m.items():
            r = idx.get((4096, 4096, 1, "forward", m, f"{fmt}:dispatched"))
            if r is None:
                lines.append(f"| {fmt} | {m} | >= {target}x | not measured | no |")
                continue
            ratio = r["speedup_vs_dense_fp32"]
            met = "yes" if ratio >= target else f"no ({ratio / target:.2f} of target)"
            lines.append(f"| {fmt} | {m} | >= {target}x | {ratio:.2f}x ({r['path']}) | {met} |")
    for m in TARGETS["int8_dynamic"]:  # the peer target: >= 1.0x of quantize_dynamic
        r = idx.get((4096, 4096, 1, "forward", m, "int8_dynamic:dispatched"))
        if r is not None and "speedup_vs_quantize_dynamic" in r:
            ratio = r["speedup_vs_quantize_dynamic"]
            met = "yes" if ratio >= 1.0 else f"no ({ratio:.2f} of target)"
            lines.append(f"| int8_dynamic vs quantize_dynamic | {m} | >= 1.0x | {ratio:.2f}x ({r['path']}) | {met} |")
    return "\n".join(lines)


def sweep(rows) -> str:
    idx = _index(rows)
    groups = defaultdict(set)
    for (k, n, t, d, m, _impl) in idx:
        groups[(k, n, t, d)].add(m)
    parts = []
    for (k, n, t, d) in sorted(groups, key=lambda g: (g[0] * g[1], g[2], g[3])):
        ms = sorted(groups[(k, n, t, d)])
        head = "| impl | " + " | ".join(f"M={m}" for m in ms) + " |"
        lines = [f"**K x N = {k} x {n}, {t} thread{'s' if t > 1 else ''}, {d}** "
                 "(ratio vs dense fp32; dispatched rows: path, and vs best peer)", "",
                 head, "|" + "---|" * (len(ms) + 1)]
        base = " | ".join(f"{idx[(k, n, t, d, m, 'dense_fp32')]['ms']:.2f} ms"
                          if (k, n, t, d, m, "dense_fp32") in idx else "-" for m in ms)
        lines.append(f"| dense fp32 (time) | {base} |")
        for peer in ("dense_bf16", "quantize_dynamic_int8", "torchao_int8_weight_only",
                     "torchao_int4_weight_only_g128", "bnb_int8", "bnb_nf4"):
            cells = [idx.get((k, n, t, d, m, peer)) for m in ms]
            if any(cells):
                lines.append(f"| {peer} | " + " | ".join(f"{c['speedup_vs_dense_fp32']:.2f}x" if c else "-"
                                                      for c in cells) + " |")
        for fmt in FORMATS:
            cells = []
            for m in ms:
                r = idx.get((k, n, t, d, m, f"{fmt}:dispatched"))
                if r is None:
                    cells.append("-")
                    continue
                vs_peer = f", {r['speedup_vs_best_peer']:.2f}x vs {r['best_peer']}" if "best_peer" in r else ""
                cells.append(f"{r['speedup_vs_dense_fp32']:.2f}x ({r['path']}{vs_peer})")
            lines.append(f"| {fmt} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def vs_reference(rows, threads: int = 1) -> str:
    """Dispatched path vs the same format's reference path (what the CPU ran before these kernels)."""
    idx = _index(rows)
    shapes = sorted({(k, n) for (k, n, t, _d, _m, _i) in idx if t == threads}, key=lambda s: s[0] * s[1])
    parts = []
    for k, n in shapes:
        for d in ("forward", "forward+grad"):
            ms = sorted({m for (kk, nn, t, dd, m, _i) in idx if (kk, nn, t, dd) == (k, n, threads, d)})
            if not ms:
                continue
            lines = [f"**{k} x {n}, {threads} thread, {d}: dispatched vs the format's reference path**", "",
                     "| format | " + " | ".join(f"M={m}" for m in ms) + " |", "|" + "---|" * (len(ms) + 1)]
            for fmt in FORMATS:
                cells = []
                for m in ms:
                    a = idx.get((k, n, threads, d, m, f"{fmt}:dispatched"))
                    b = idx.get((k, n, threads, d, m, f"{fmt}:reference"))
                    cells.append(f"{b['ms'] / a['ms']:.1f}x" if a and b else "-")
                lines.append(f"| {fmt} | " + " | ".join(cells) + " |")
            parts.append("\n".join(lines))
    return "\n\n".join(parts)


def overhead(rows) -> str:
    rs = [r for r in rows if r.get("direction") == "overhead"]
    if not rs:
        return ""
    return "| call (256x256, M=1) | us per call |\n|---|---|\n" + "\n".join(
        f"| {r['impl']} | {r['us_per_call']:.1f} |" for r in rs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    args = ap.parse_args(argv)
    data = json.loads(open(args.path).read())
    env = data["environment"]
    print(f"{env['cpu_model']}, {env['logical_cpus']} logical CPUs, flags {' '.join(env['flags'])}; "
          f"torch {env['torch']}, numba {env['numba']}; {env['date']}\n")
    for peer, why in sorted((env.get("peers_absent") or {}).items()):
        print(f"- peer {peer} not measured: {why}")
    print()
    print(targets(data["results"]) + "\n")
    print(sweep(data["results"]) + "\n")
    print(vs_reference(data["results"]) + "\n")
    print(overhead(data["results"]))


if __name__ == "__main__":
    main()
