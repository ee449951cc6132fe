"""Matplotlib plots of the study sections (PNG, Agg backend, no display needed).

Every plot labels its axes with units, shows seeds' spread as error bars (± one std), and keeps
its legend outside the data or in an empty corner.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_section", "plot_hardware"]

_STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8.5,
          "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100}
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22"]


def _pct(ms_list):
    return [100 * m[0] for m in ms_list], [100 * (m[1] if m[2] > 1 else 0) for m in ms_list]


def _log_ticks(axis, lo: float, hi: float, suffix: str = "") -> None:
    """Readable ticks on a log axis: 1-2-5 steps between ``lo`` and ``hi``, plain numbers."""
    lo, hi = max(lo, 1e-12), max(hi, lo)
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5)]
    inside = [t for t in ticks if lo / 1.05 <= t <= hi * 1.05]
    if len(inside) < 3:  # a narrow range: every 1..9 step
        ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in range(1, 10)]
    # ticks a little beyond the data too: the axis margins show them, the rest are not drawn
    inside = [t for t in ticks if lo / 3 <= t <= hi * 3]
    axis.set_major_locator(matplotlib.ticker.FixedLocator(inside))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}{suffix}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _place_labels(ax, items, bars=(), leaders: bool = False) -> None:
    """Annotate points ``(x, y, text, color)`` choosing, per label, the first offset whose box
    overlaps no label placed before (and no other point's marker, nor an error bar ``(x, y_lo, y_hi)``
    of ``bars``); when none is free, the offset with the fewest clashes (labels first, then markers).
    ``leaders``: farther offsets are tried too, and a label placed away from its point gets a thin
    line to it."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    marks = [ax.transData.transform((x, y)) for x, y, _, _ in items]
    segs = [(ax.transData.transform((x, lo)), ax.transData.transform((x, hi))) for x, lo, hi in bars if hi > lo]
    offsets = [(6, 5), (6, -13), (-6, 5), (-6, -13), (6, 15), (6, -23), (-6, 15), (-6, -23), (0, 26), (0, -33)]
    if leaders:
        offsets += [(10, 30), (-10, 30), (10, -38), (-10, -38), (0, 42), (0, -49), (16, 42), (-16, -49)]
    frame = ax.get_window_extent(renderer)
    for x, y, text, color in items:
        best = None
        for dx, dy in offsets:
            kw = {"textcoords": "offset points", "xytext": (dx, dy), "fontsize": 7.5, "color": color,
                  "ha": "left" if dx > 0 else "right" if dx < 0 else "center"}
            t = ax.annotate(text, (x, y), **kw)
            bb = t.get_window_extent(renderer).expanded(1.04, 1.15).padded(2)
            t.remove()
            cost = (100 * sum(bb.overlaps(p) for p in placed) + 10 * sum(bb.contains(mx, my) for mx, my in marks)
                    + sum(bb.x0 <= a[0] <= bb.x1 and min(a[1], b[1]) <= bb.y1 and max(a[1], b[1]) >= bb.y0
                          for a, b in segs)
                    + 50 * (bb.x0 < frame.x0 or bb.x1 > frame.x1 or bb.y0 < frame.y0 or bb.y1 > frame.y1))
            if best is None or cost < best[0]:
                best = (cost, bb, kw, dy)
            if cost == 0:
                break
        _, bb, kw, dy = best
        placed.append(bb)
        far = leaders and abs(dy) > 13  # away from its point: a leader line to it
        ax.annotate(text, (x, y), **kw, arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6, "alpha": 0.7,
                                                        "shrinkA": 1, "shrinkB": 4} if far else None)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep(plot: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True, layout="constrained")
    for ax, metric, title in zip(axes, ("clean", "robust"),
                                 ("clean accuracy", f"robust accuracy (worst case, L∞ eps {plot['eps']:g})")):
        dense = plot[f"dense_{metric}"]
        ax.axhspan(100 * (dense[0] - plot["threshold"]), 100 * dense[0], color="0.85", alpha=0.6,
                   label=f"dense − {100 * plot['threshold']:g} pts")
        crit_at: dict[float, int] = {}
        for i, (name, s) in enumerate(plot["series"].items()):
            y, err = _pct(s[metric])
            ax.errorbar(s["x"], y, yerr=err, marker="o", ms=4, capsize=3, color=_COLORS[i], label=name)
            c = s.get(f"critical_{metric}")
            if c:
                # regimes sharing a critical ratio (within 4%): side by side, 4% apart on the log axis, each with a
                # marker at the top, so no line hides another
                near = next((x0 for x0 in crit_at if abs(math.log(c / x0)) < math.log(1.04)), c)
                k = crit_at.get(near, 0)
                crit_at[near] = k + 1
                xc = near * 1.04 ** k
                ax.axvline(xc, color=_COLORS[i], ls=(0, (2, 2)), lw=1.3)
                ax.plot([xc], [1.0], marker="v", ms=6, color=_COLORS[i], transform=ax.get_xaxis_transform(),
                        clip_on=False)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel(plot["xlabel"])
        xs = [x for s in plot["series"].values() for x in s["x"]]
        _log_ticks(ax.xaxis, min(xs), max(xs), "×")
        # every point named (recipe labels are the same across regimes: label the first regime's points)
        first = next(iter(plot["series"].values()))
        y, _ = _pct(first[metric])
        _place_labels(ax, [(x, v, _short(t), "0.25") for x, v, t in zip(first["x"], y, first["labels"])
                           if t != "dense"])
    axes[0].set_ylabel("accuracy (% of test set)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels),
               title="dashed vertical line and ▼: critical ratio of the regime of that colour (side by side when "
                     "regimes share one)", title_fontsize=8)
    return _save(fig, path)


def _compact(plot: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharey=True, layout="constrained")
    for ax, metric, title in zip(axes, ("clean", "robust"),
                                 ("clean accuracy", f"robust accuracy (L∞ eps {plot['eps']:g})")):
        for i, (key, name) in enumerate((("pruned", f"pruned {plot['large']}"), ("compact", "compact dense"))):
            pts = plot[key]
            if not pts:
                continue
            y, err = _pct([p[metric] for p in pts])
            ax.errorbar([p["params"] for p in pts], y, yerr=err, marker="os"[i], ms=5, capsize=3, color=_COLORS[i],
                        label=name)
        ax.set_xscale("log")
        xs = [p["params"] for k in ("pruned", "compact") for p in plot[k]]
        if xs:
            _log_ticks(ax.xaxis, min(xs), max(xs))
        ax.set_xlabel("non-zero parameters (count, log scale)")
        ax.set_title(title)
    axes[0].set_ylabel("accuracy (% of test set)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2)
    return _save(fig, path)


def _capacity(plot: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for i, (name, c) in enumerate(plot["curves"].items()):
        for metric, ls, mk in (("clean", "-", "o"), ("robust", "--", "s")):
            y, err = _pct(c[metric])
            ax.errorbar(c["widths"], y, yerr=err, ls=ls, marker=mk, ms=4, capsize=3, color=_COLORS[i],
                        label=f"{name}: {metric}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("width (hidden units per layer, log scale)")
    ax.set_ylabel("accuracy (% of test set)")
    ax.set_title(f"clean (solid) and robust (dashed, L∞ eps {plot['eps']:g}) accuracy vs width")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def _equal_bytes(plot: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    fams = list(dict.fromkeys(p["family"] for p in plot["points"]))
    labels = []
    for i, fam in enumerate(fams):
        pts = [p for p in plot["points"] if p["family"] == fam]
        y, err = _pct([p["robust"] for p in pts])
        ax.errorbar([p["bytes"] / 1e3 for p in pts], y, yerr=err, ls="none", marker="osD^v"[i % 5], ms=6, capsize=3,
                    color=_COLORS[i], label=fam)
        labels += [(p["bytes"] / 1e3, yy, _short(p["label"]), _COLORS[i]) for p, yy in zip(pts, y)]
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.08)
    xs = [p["bytes"] / 1e3 for p in plot["points"]]
    _log_ticks(ax.xaxis, min(xs), max(xs))
    ax.set_xlabel("model size (kB stored, log scale)")
    ax.set_ylabel(f"robust accuracy (% of test set, L∞ eps {plot['eps']:g})")
    ax.set_title("robust accuracy vs model bytes, by compression family")
    ax.legend(loc="lower right")
    _place_labels(ax, labels)
    return _save(fig, path)


def _short(label: str) -> str:
    return (label.replace("_weight_only", "").replace("group_size=", "g").replace("sparsity=", "s=")
            .replace("ratio=", "r=").replace("channel_prune", "chprune").replace("magnitude_prune", "magprune"))


def _efficiency(plot: dict, path: Path) -> Path:
    """Left: speedup vs dense per recipe and batch size (grouped by base, hatched per base when there
    are several). Right: robust accuracy vs latency, one colour, marker and Pareto front per base."""
    pts, bs = plot["points"], plot["batch_sizes"]
    bases = plot.get("bases") or list(dict.fromkeys(p.get("base") for p in pts))
    multi = len(bases) > 1
    fronts = plot.get("fronts") or {bases[0] if bases else None: plot["front"]}

    def pid(p):
        return p.get("id", p["label"])
    # rows of the bar chart: per base a bold heading row, then its recipes
    order, ticks, heads = [], [], []
    for base in bases:
        if multi:
            heads.append(len(ticks))
            ticks.append(f"{base} base")
            order.append(None)
        for p in pts:
            if p.get("base") == base or not multi:
                ticks.append(_short(p["label"]))
                order.append(p)
    height = max(4.8, 0.3 * len(order) + 1.6) if multi else 4.8
    fig, axes = plt.subplots(1, 2, figsize=(14 if multi else 12, height), layout="constrained",
                             width_ratios=[1, 1.3 if multi else 1.1])
    ax = axes[0]
    h = 0.8 / max(len(bs), 1)
    hatches = ["", "///", "...", "xx", "\\\\", "++"]
    rows = [(i, p) for i, p in enumerate(order) if p is not None]
    for j, b in enumerate(bs):
        vals = [p["speedup"][b][0] for _, p in rows]
        errs = [p["speedup"][b][1] if p["speedup"][b][2] > 1 else 0 for _, p in rows]
        hatch = [hatches[bases.index(p.get("base")) % len(hatches)] if multi else "" for _, p in rows]
        ax.barh([i + j * h for i, _ in rows], vals, height=h, xerr=errs if any(errs) else None,
                color=_COLORS[j], capsize=2, label=f"batch {b}", hatch=hatch if multi else None,
                edgecolor="white" if multi else None, linewidth=0)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks([i + h * (len(bs) - 1) / 2 for i in range(len(order))], ticks)
    for k in heads:
        ax.get_yticklabels()[k].set_fontweight("bold")
        if k:
            ax.axhline(k - 0.5 + h * (len(bs) - 1) / 2, color="0.5", lw=0.8)
    ax.set_ylim(len(order) - 0.5 + h * (len(bs) - 1) / 2 + 0.2, -0.6)
    ax.set_xscale("log")
    sp = [p["speedup"][b][0] for _, p in rows for b in bs if p["speedup"][b][2]]
    if sp:
        _log_ticks(ax.xaxis, min(sp + [1.0]), max(sp + [1.0]), "×")
    ax.set_xlabel("speedup vs dense " + ("of the same base " if multi else "")
                  + "(dense latency / latency, log scale)")
    ax.set_title("latency speedup (same run, same device)", pad=38 if multi else 24)
    handles, labels = ax.get_legend_handles_labels()
    if multi:
        handles = [matplotlib.patches.Patch(facecolor=_COLORS[j], label=f"batch {b}") for j, b in enumerate(bs)]
        handles += [matplotlib.patches.Patch(facecolor="0.55", edgecolor="white", linewidth=0,
                                             hatch=hatches[i % len(hatches)], label=f"{base} base")
                    for i, base in enumerate(bases)]
        labels = [hd.get_label() for hd in handles]
    ax.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncol=max(len(bs), len(bases)) if multi else len(bs), frameon=False)
    ax = axes[1]
    b = bs[-1] if bs else None
    items = []
    for i, base in enumerate(bases):
        mine = [p for p in pts if p.get("base") == base or not multi]
        front = set(fronts.get(base, ()))
        color = _COLORS[(2 + i) % len(_COLORS)] if multi else _COLORS[0]
        marker = "osD^v"[i % 5] if multi else "o"
        for p in mine:
            on = pid(p) in front
            ax.errorbar(p["latency"], 100 * p["robust"],
                        yerr=100 * (p["robust_ms"][1] if p["robust_ms"][2] > 1 else 0),
                        marker=marker if on else "x", ms=6, color=color if on or multi else "0.45",
                        alpha=1 if on or not multi else 0.55, capsize=2, ls="none")
        fp = sorted((p for p in mine if pid(p) in front), key=lambda p: p["latency"])
        ax.step([p["latency"] for p in fp], [100 * p["robust"] for p in fp], where="post", color=color,
                marker=marker if multi else None, ms=6, label=f"{base} base: Pareto front" if multi else "Pareto front")
        items += [(p["latency"], 100 * p["robust"], _short(p["label"]), color if multi else "k") for p in mine]
    if multi:
        ax.plot([], [], "x", color="0.45", label="off the front (its base's colour)")
    ax.set_xscale("log")
    ax.margins(x=0.15)
    lats = [p["latency"] for p in pts if p["latency"] == p["latency"]]
    if lats:
        _log_ticks(ax.xaxis, min(lats), max(lats))
    ax.set_xlabel(f"latency at batch {b} (ms, median, log scale)")
    ax.set_ylabel(f"robust accuracy (% of test set, L∞ eps {plot['eps']:g})")
    if multi:
        ax.set_title("robust accuracy vs latency, per base (error bars: ± std over seeds)", pad=38)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    else:
        ax.set_title("robust accuracy vs latency (error bars: ± std over seeds)")
        ax.legend(loc="lower right")
    _place_labels(ax, items, [(p["latency"], 100 * (p["robust"] - p["robust_ms"][1]),
                               100 * (p["robust"] + p["robust_ms"][1])) for p in pts if p["robust_ms"][2] > 1],
                  leaders=True)
    return _save(fig, path)


_PLOTTERS = {"sweep": _sweep, "compact": _compact, "capacity": _capacity, "equal_bytes": _equal_bytes,
             "efficiency": _efficiency}


def plot_section(plot: dict, path: str | Path) -> Path | None:
    """Draw ``plot`` (a section's plot data) into ``path``; None when there is nothing to draw."""
    if not plot:
        return None
    empty = {"sweep": lambda p: not p["series"], "compact": lambda p: not (p["pruned"] or p["compact"]),
             "capacity": lambda p: not p["curves"], "equal_bytes": lambda p: not p["points"],
             "efficiency": lambda p: not p["points"] or not p["batch_sizes"]}[plot["kind"]]
    if empty(plot):
        return None
    with plt.rc_context(_STYLE):
        return _PLOTTERS[plot["kind"]](plot, Path(path))


def plot_hardware(rows: list[dict], path: str | Path) -> Path | None:
    """Bar chart of achieved bandwidth as % of peak (or GB/s where the peak is unknown)."""
    rows = [r for r in rows if r.get("gbps") is not None and math.isfinite(r["gbps"])]
    if not rows:
        return None
    total = len(rows)
    rows = rows[:40]
    # whole names, wrapped (never cut: "… @ ba" hides the batch size); layout="constrained" makes room
    names = [textwrap.fill(r["name"], 58) for r in rows]
    lines = sum(n.count("\n") + 1 for n in names)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(11, 0.17 * lines + 0.1 * len(rows) + 1.6), layout="constrained")
        use_pct = all(r.get("bw_pct") is not None for r in rows)
        vals = [r["bw_pct"] if use_pct else r["gbps"] for r in rows]
        ax.barh(range(len(rows)), vals, color=_COLORS[0])
        ax.set_yticks(range(len(rows)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("achieved memory bandwidth (% of device peak)" if use_pct else
                      "achieved memory bandwidth (GB/s; device peak unknown)")
        ax.set_title("benchmarks: achieved bandwidth" + (f" (first 40 of {total})" if total > 40 else ""))
        return _save(fig, Path(path))
