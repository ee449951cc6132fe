"""The kernel sweep in the hardware section: a table (one row per format and layer size, one
speedup column per batch) and a plot (speedup vs layer size, one panel per batch, one line per
format), both read from the ``kernel_sweep`` record of results.jsonl alone (robcomp.evaluation.kernel_sweep).
"""
from __future__ import annotations

import math
from pathlib import Path

__all__ = ["sweep_record", "sweep_table", "sweep_finding", "plot_sweep", "speedup_cell"]


def sweep_record(records: list[dict]) -> dict | None:
    """The last kernel sweep of ``records`` (None when the run measured none)."""
    from robcomp.evaluation.kernel_sweep import KERNEL_SWEEP_RECORD

    found = [r for r in records if r.get("type") == KERNEL_SWEEP_RECORD]
    return found[-1] if found else None


def speedup_cell(row: dict | None) -> str:
    """``"2.31x (native)"``, ``"skipped"`` or ``"-"``: what a table cell shows for one measurement."""
    if row is None:
        return "-"
    if row.get("status") != "ok":
        return row.get("status", "-")
    v = row["speedup"]
    return f"{v:.2f}x ({row['path']})" if v >= 0.1 else f"{v:.2g}x ({row['path']})"


def _caption(rec: dict) -> str:
    env = rec.get("env") or {}
    return (f"Kernel sweep: one compressed layer (K = N = size, bias) vs dense fp32 F.linear of the same size, "
            f"forward, {rec['dtype']} activations, {rec['threads']} torch thread(s), on {rec['device']}; torch "
            f"{env.get('torch')}, robcomp {env.get('robcomp')}, {env.get('date')}. Cells: dense time / compressed "
            f"time (> 1: the format is faster) and the path the layer ran (its dispatched default); "
            f"{rec['timing']}; {rec['time_s']:.1f} s in all.")


def sweep_table(rec: dict) -> tuple[str, list[str], list[list[str]]]:
    """``(caption, head, rows)``: one row per (format, size) plus the dense time per size."""
    index = {(r["format"], r["K"], r["M"]): r for r in rec["rows"]}
    batches = rec["batches"]
    head = ["format", "layer K x N"] + [f"speedup @ batch {m}" for m in batches]
    rows = []
    for size in rec["sizes"]:
        dense = {r["M"]: r["dense_ms"] for r in rec["rows"] if r["K"] == size}
        rows.append(["dense fp32 (ms)", f"{size} x {size}"]
                    + [f"{dense[m]:.4g} ms" if dense.get(m) is not None else "-" for m in batches])
    for fmt in rec["formats"]:
        for size in rec["sizes"]:
            rows.append([fmt, f"{size} x {size}"] + [speedup_cell(index.get((fmt, size, m))) for m in batches])
    return _caption(rec), head, rows


def sweep_finding(rec: dict) -> str:
    """Where compression pays here: per batch, the formats faster than dense at the largest size."""
    ok = [r for r in rec["rows"] if r.get("status") == "ok"]
    if not ok:
        return "Kernel sweep: no format could be measured."
    big = max(rec["sizes"])
    parts = []
    for m in rec["batches"]:
        at = sorted((r for r in ok if r["K"] == big and r["M"] == m), key=lambda r: -r["speedup"])
        faster = [f"{r['format']} {r['speedup']:.2f}x" for r in at if r["speedup"] > 1]
        parts.append(f"batch {m}: {len(faster)} of {len(at)} formats faster than dense"
                     + (f" ({', '.join(faster)})" if faster else ""))
    small = min(rec["sizes"])
    n_small = sum(1 for r in ok if r["K"] == small and r["M"] == min(rec["batches"]) and r["speedup"] > 1)
    return (f"Kernel sweep ({rec['threads']} thread(s), {rec['dtype']}) at {big} x {big}: " + "; ".join(parts)
            + f". At {small} x {small}, batch {min(rec['batches'])}: {n_small} formats faster than dense "
            "(per-call overhead dominates small layers).")


def plot_sweep(rec: dict, path: str | Path) -> Path | None:
    """Speedup vs dense (log) over layer size, one panel per batch, one line per format."""
    import robcomp.report.plots as P

    plt = P.plt
    ok = [r for r in rec["rows"] if r.get("status") == "ok" and math.isfinite(r["speedup"]) and r["speedup"] > 0]
    if not ok:
        return None
    batches = rec["batches"]
    with plt.rc_context(P._STYLE):
        fig, axes = plt.subplots(1, len(batches), figsize=(3.7 * len(batches) + 1.8, 4.2), sharey=True,
                                 layout="constrained", squeeze=False)
        lo = min(r["speedup"] for r in ok)
        hi = max(r["speedup"] for r in ok)
        for ax, m in zip(axes[0], batches):
            ax.axhline(1.0, color="0.3", lw=1, ls="--", label="dense (1x)")
            for i, fmt in enumerate(rec["formats"]):
                pts = sorted((r["K"], r["speedup"]) for r in ok if r["format"] == fmt and r["M"] == m)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=P._COLORS[i % 10], label=fmt)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(rec["sizes"], [str(s) for s in rec["sizes"]])
            ax.minorticks_off()
            ax.set_xlabel("layer size K = N")
            ax.set_title(f"batch {m}")
        axes[0][0].set_ylabel("speedup vs dense fp32 F.linear (x)")
        P._log_ticks(axes[0][0].yaxis, min(lo, 1.0), max(hi, 1.0), "x")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center")
        fig.suptitle(f"kernel sweep on {rec['device']}, {rec['threads']} thread(s), {rec['dtype']}")
        return P._save(fig, Path(path))
