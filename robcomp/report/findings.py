"""The analyses behind the study report: one :class:`Section` per experiment, with a one-line
finding computed from the records (never a canned sentence), the data its plot needs, and tables.

Conventions (stated in the report):

* "robust accuracy" is the worst case over every attack at the study's ``headline_eps``
  (``robust_accuracy_by_eps``); "clean accuracy" is top-1 on the test split;
* every number is a mean over seeds, ``±`` one standard deviation (sample, n-1) across seeds;
* a drop is measured per seed against the dense parent of the same seed, then averaged;
* the critical compression ratio of a metric is the smallest tested ratio at which its mean drop
  from dense exceeds ``critical_drop`` (an absolute fraction of the test set);
* a finding that compares two means says whether the difference is significant at this number of
  seeds (``robcomp.report.stats``: paired t-tests over seeds, alpha 0.05).
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from robcomp.report.stats import compare_paired, compare_to_threshold

__all__ = ["Section", "Table", "analyse", "robust_at", "mean_std", "fmt_pct", "REGIME_NAMES"]

REGIME_NAMES = {"dense": "dense", "post": "post-training", "finetune": "fine-tuned (naive)",
                "adv_finetune": "adversarially fine-tuned"}


@dataclass
class Table:
    caption: str
    head: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    id: str
    title: str
    question: str
    finding: str
    kind: str
    plot: dict | None = None  # {"kind": ..., data}: drawn by robcomp.report.plots
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def mean_std(values) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def fmt_pct(ms, digits: int = 1) -> str:
    m, s, n = ms
    if n == 0:
        return "-"
    return f"{100 * m:.{digits}f} ± {100 * s:.{digits}f}" if n > 1 else f"{100 * m:.{digits}f}"


def _fmt_num(ms, unit: str = "", digits: int = 2) -> str:
    m, s, n = ms
    if n == 0:
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}{unit}" if n > 1 else f"{m:.{digits}f}{unit}"


def _by_seed(records, value) -> dict:
    """seed -> mean of ``value(record)`` over the records of that seed (None values dropped)."""
    acc = defaultdict(list)
    for r in records:
        v = value(r)
        if v is not None:
            acc[r.get("seed", 0)].append(v)
    return {s: statistics.fmean(v) for s, v in acc.items()}


def _fmt_speedup(ms) -> str:
    """Two decimals, but a large slowdown keeps two significant digits (0.0012, never "0.00")."""
    m, s, n = ms
    if n == 0:
        return "-"
    digits = 2 if m >= 0.1 else max(2, 1 - math.floor(math.log10(m))) if m > 0 else 2
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def _eps_of(key: str) -> float | None:
    try:
        return float(key.rsplit("eps=", 1)[1])
    except (IndexError, ValueError):
        return None


def robust_at(record: dict, eps: float) -> float | None:
    """Worst-case robust accuracy over the attacks at ``eps`` (None when no attack has it)."""
    for key, v in record.get("robust_accuracy_by_eps", {}).items():
        e = _eps_of(key)
        if e is not None and abs(e - eps) < 1e-9:
            return v
    return None


def _x(record: dict, axis: str) -> float:
    return record["compression_ratio"] if axis == "auto" else record[axis]


_AXIS_LABEL = {"auto": "compression ratio (dense / compressed; bytes or non-zero weights, ×)",
               "bytes_ratio": "compression ratio (dense bytes / stored bytes, ×)",
               "nonzero_ratio": "compression ratio (dense / non-zero weights, ×)"}


def _ratio_text(x: float | None) -> str:
    return "none" if x is None else f"{x:.3g}x"


# --------------------------------------------------------------------------------- sweep
def _sweep(ex: dict, recs: list[dict], spec: dict) -> Section:
    eps, thr = spec["headline_eps"], spec["critical_drop"]
    axis = ex.get("x", "auto")
    dense = {(r["model_name"], r["width"], r["base"], r["seed"]): r for r in recs if r["role"] == "dense"}
    series: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        if r["role"] != "compressed":
            continue
        d = dense.get((r["model_name"], r["width"], r["base"], r["seed"]))
        if d is None:
            continue
        series[r["regime"]][r["recipe"]].append((r, d))
    dense_clean = mean_std(d["clean_accuracy"] for d in dense.values())
    dense_rob = mean_std(robust_at(d, eps) for d in dense.values())
    plot_series, rows, crit = {}, [], {}
    for regime in [g for g in ex["regimes"] if g in series]:
        pts = []
        for label, pairs in series[regime].items():
            x = mean_std(_x(r, axis) for r, _ in pairs)[0]
            clean = mean_std(r["clean_accuracy"] for r, _ in pairs)
            rob = mean_std(robust_at(r, eps) for r, _ in pairs)
            dclean = mean_std(d["clean_accuracy"] - r["clean_accuracy"] for r, d in pairs)
            drob = mean_std(robust_at(d, eps) - robust_at(r, eps) for r, d in pairs
                            if robust_at(d, eps) is not None and robust_at(r, eps) is not None)
            drops_clean = [d["clean_accuracy"] - r["clean_accuracy"] for r, d in pairs]
            drops_rob = [robust_at(d, eps) - robust_at(r, eps) for r, d in pairs
                         if robust_at(d, eps) is not None and robust_at(r, eps) is not None]
            pts.append({"label": label, "x": x, "clean": clean, "robust": rob, "dclean": dclean, "drobust": drob,
                        "test_clean": compare_to_threshold(drops_clean, thr),
                        "test_robust": compare_to_threshold(drops_rob, thr),
                        "robust_by_seed": _by_seed((r for r, _ in pairs), lambda r: robust_at(r, eps))})
        pts.sort(key=lambda p: p["x"])
        c_clean = next((p for p in pts if p["dclean"][0] > thr), None)
        c_rob = next((p for p in pts if p["drobust"][0] > thr), None)
        crit[regime] = (c_clean, c_rob, pts)
        plot_series[REGIME_NAMES.get(regime, regime)] = {
            "x": [1.0] + [p["x"] for p in pts], "labels": ["dense"] + [p["label"] for p in pts],
            "clean": [dense_clean] + [p["clean"] for p in pts], "robust": [dense_rob] + [p["robust"] for p in pts],
            "critical_clean": c_clean and c_clean["x"], "critical_robust": c_rob and c_rob["x"]}
        for p in pts:
            rows.append([REGIME_NAMES.get(regime, regime), p["label"], f"{p['x']:.3g}", fmt_pct(p["clean"]),
                         fmt_pct(p["robust"]), fmt_pct(p["dclean"]), fmt_pct(p["drobust"])])
    n_seeds = max((len(v) for s in series.values() for v in s.values()), default=0)
    parts, robust_first, undecided, compared = [], 0, 0, 0
    for regime, (c_clean, c_rob, pts) in crit.items():
        name = REGIME_NAMES.get(regime, regime)
        xc, xr = c_clean and c_clean["x"], c_rob and c_rob["x"]
        top = pts[-1]["x"] if pts else None
        # a critical ratio whose drop is not significantly past the threshold does not order the two
        tests = [(what, c[key]) for what, c, key in (("robust", c_rob, "test_robust"), ("clean", c_clean, "test_clean"))
                 if c is not None]
        unsure = [(what, t) for what, t in tests if not t.significant]
        if xr is not None and (xc is None or xr < xc):
            rel = "robustness first"
            if unsure:
                undecided += 1
            else:
                robust_first += 1
        elif xr is None and xc is None:
            rel = f"neither breaks up to {_ratio_text(top)}"
        elif xr is not None and xc is not None and xr == xc:
            rel = "both at once"
        else:
            rel = "accuracy first"
        if unsure and all(t.p is None for _, t in unsure):
            rel += ", untested"
        elif unsure:
            rel += "; " + ", ".join(f"the {what} drop ({100 * (t.mean_diff + thr):.1f} points) is not significantly "
                                    f"past {100 * thr:g} at {t.n} seeds ({t.test}, p = {t.p:.2g})"
                                    for what, t in unsure)
        compared += 1
        parts.append(f"{name}: robust {_ratio_text(xr)}, clean {_ratio_text(xc)} ({rel})")
    if compared:
        if robust_first:
            head = f"Robust accuracy (eps {eps:g}) breaks before clean accuracy in {robust_first} of {compared} regimes"
        elif not undecided:
            head = f"Robust accuracy (eps {eps:g}) never breaks before clean accuracy ({compared} regimes)"
        else:
            head = f"Robust accuracy (eps {eps:g}) breaks before clean accuracy in no regime significantly"
        if undecided:
            head += (f" ({undecided} of {compared} regimes robustness first by the means alone, "
                     + ("untestable with one seed)" if n_seeds < 2 else f"not significant at {n_seeds} seeds)"))
        finding = (f"{head} — critical ratios (first mean drop > {100 * thr:g} points from dense; counted only when "
                   "each drop is significantly past the threshold, one-sided t-test over seeds; "
                   f"{fmt_pct(dense_clean)}% clean / {fmt_pct(dense_rob)}% robust): " + "; ".join(parts)
                   + f" ({n_seeds} seed{'s' * (n_seeds != 1)}).")
        if "adv_finetune" in crit and "finetune" in crit and crit["adv_finetune"][2] and crit["finetune"][2]:
            a, f = crit["adv_finetune"][2][-1], crit["finetune"][2][-1]
            test = compare_paired(a["robust_by_seed"], f["robust_by_seed"])
            finding += (f" At the highest ratio ({a['label']}) adversarial fine-tuning keeps {fmt_pct(a['robust'])}% "
                        f"robust vs {fmt_pct(f['robust'])}% with naive fine-tuning ({test.text()}).")
    else:
        finding = "No compressed point finished: nothing to compare yet."
    table = Table("Mean ± std over seeds; Δ = drop from the dense parent of the same seed (points).",
                  ["regime", "recipe", "ratio ×", "clean %", f"robust % (eps {eps:g})", "Δ clean", "Δ robust"], rows)
    return Section(ex["name"], ex.get("title", ex["name"]), ex.get("question", ""), finding, "sweep",
                   plot={"kind": "sweep", "series": plot_series, "xlabel": _AXIS_LABEL[axis], "eps": eps,
                         "threshold": thr, "dense_clean": dense_clean, "dense_robust": dense_rob},
                   tables=[table])


# ------------------------------------------------------------------------------- compact
def _compact(ex: dict, recs: list[dict], spec: dict) -> Section:
    eps = spec["headline_eps"]

    def agg(group):
        return {"params": mean_std(r["effective_nonzero"] for r in group)[0],
                "clean": mean_std(r["clean_accuracy"] for r in group),
                "robust": mean_std(robust_at(r, eps) for r in group), "n": len(group),
                "robust_by_seed": _by_seed(group, lambda r: robust_at(r, eps))}
    pruned, compact = defaultdict(list), defaultdict(list)
    large = None
    for r in recs:
        if r["role"] == "compressed":
            pruned[(r["recipe"], r["regime"])].append(r)
            large = large or f"{r['model_name']}-{r['width']}"
        elif r["role"] == "compact":
            compact[f"{r['model_name']}-{r['width']}"].append(r)
    P = {k: agg(v) for k, v in pruned.items()}
    C = {k: agg(v) for k, v in compact.items()}
    pairs, rows = [], []
    for (label, regime), p in sorted(P.items(), key=lambda kv: -kv[1]["params"]):
        if not C:
            break
        name, c = min(C.items(), key=lambda kv: abs(math.log(kv[1]["params"] / p["params"])))
        close = abs(p["params"] / c["params"] - 1) <= 0.25
        d_rob = p["robust"][0] - c["robust"][0]
        d_clean = p["clean"][0] - c["clean"][0]
        test = compare_paired(p["robust_by_seed"], c["robust_by_seed"])
        if close:
            pairs.append((label, name, d_rob, d_clean, p, c, test))
        rows.append([f"{large} {label}", REGIME_NAMES.get(regime, regime), f"{p['params']:.0f}", fmt_pct(p["clean"]),
                     fmt_pct(p["robust"]), name, f"{c['params']:.0f}", fmt_pct(c["clean"]), fmt_pct(c["robust"]),
                     f"{100 * d_rob:+.1f}" + ("" if close else " (sizes differ > 25%)"), test.text()])
    if pairs:
        wins = sum(1 for p in pairs if p[2] > 0)
        sig_wins = sum(1 for p in pairs if p[2] > 0 and p[6].significant)
        sig_losses = sum(1 for p in pairs if p[2] < 0 and p[6].significant)
        mean_d = statistics.fmean(p[2] for p in pairs)
        best = max(pairs, key=lambda p: abs(p[2]))
        seeds = min(min(p[4]["n"], p[5]["n"]) for p in pairs)
        finding = (f"The pruned {large} is more robust than the compact dense model of the same parameter count in "
                   f"{wins} of {len(pairs)} pairs (mean Δ robust {100 * mean_d:+.1f} points, clean "
                   f"{100 * statistics.fmean(p[3] for p in pairs):+.1f}); largest gap: {best[0]} "
                   f"{fmt_pct(best[4]['robust'])}% vs {best[1]} {fmt_pct(best[5]['robust'])}% robust "
                   f"({seeds} seed{'s' * (seeds != 1)})"
                   + (": differences cannot be tested for significance with one seed." if seeds < 2 else
                      f". Significant (paired t-test over seeds, p < 0.05): {sig_wins} more robust, {sig_losses} less "
                      "robust" + (", no difference in the others at this number of seeds." if sig_wins + sig_losses
                                  < len(pairs) else ".")))
    else:
        finding = "No size-matched pair (within 25% parameters) of pruned and compact models: nothing to compare."
    plot = {"kind": "compact", "eps": eps,
            "pruned": sorted(({"label": k[0], "params": v["params"], "clean": v["clean"], "robust": v["robust"]}
                              for k, v in P.items()), key=lambda d: d["params"]),
            "compact": sorted(({"label": k, "params": v["params"], "clean": v["clean"], "robust": v["robust"]}
                               for k, v in C.items()), key=lambda d: d["params"]), "large": large}
    head = ["pruned model", "regime", "non-zero params", "clean %", "robust %", "compact model", "params",
            "clean %", "robust %", "Δ robust (pts)", "significance (over seeds)"]
    note = ("Compact models are trained from scratch the way the large parent was (same epochs, same PGD "
            "adversarial training); the pruned models are the parent pruned then fine-tuned per their regime.")
    return Section(ex["name"], ex.get("title", ex["name"]), ex.get("question", ""), finding, "compact", plot,
                   [Table("Each pruned model paired with the compact dense model nearest in parameter count.",
                          head, rows)], [note])


# ------------------------------------------------------------------------------ capacity
def _capacity(ex: dict, recs: list[dict], spec: dict) -> Section:
    eps, thr = spec["headline_eps"], spec["critical_drop"]
    by = defaultdict(lambda: defaultdict(list))
    for r in recs:
        if r["role"] == "dense":
            by[(r["model_name"], r["base"])][r["width"]].append(r)
    curves, rows, parts = {}, [], []
    for (model, base), widths in by.items():
        ws = sorted(widths)
        clean = [mean_std(r["clean_accuracy"] for r in widths[w]) for w in ws]
        rob = [mean_std(robust_at(r, eps) for r in widths[w]) for w in ws]
        params = [mean_std(r["parameters"] for r in widths[w])[0] for w in ws]
        curves[f"{model} ({base})"] = {"widths": ws, "clean": clean, "robust": rob, "base": base}

        def saturation(vals):
            best = max(v[0] for v in vals)
            return next(w for w, v in zip(ws, vals) if v[0] >= best - thr)
        sc, sr = saturation(clean), saturation(rob)
        curves[f"{model} ({base})"].update(sat_clean=sc, sat_robust=sr)
        verdict = ("robustness needs more capacity" if sr > sc else
                   "accuracy needs more capacity" if sc > sr else "both saturate together")
        parts.append(f"{base} training: clean saturates at width {sc}, robust at width {sr} ({verdict}; robust "
                     f"{fmt_pct(rob[0])}% → {fmt_pct(rob[-1])}% from width {ws[0]} to {ws[-1]})")
        for w, c, rr, pr in zip(ws, clean, rob, params):
            rows.append([model, base, str(w), f"{pr:.0f}", fmt_pct(c), fmt_pct(rr)])
    n = max((len(v) for w in by.values() for v in w.values()), default=0)
    finding = (f"Saturation width = smallest width within {100 * thr:g} points of the best mean. "
               + "; ".join(parts) + f" ({n} seed{'s' * (n != 1)}).") if parts else "No dense model finished."
    return Section(ex["name"], ex.get("title", ex["name"]), ex.get("question", ""), finding, "capacity",
                   {"kind": "capacity", "curves": curves, "eps": eps},
                   [Table("Dense models trained from scratch at each width.",
                          ["model", "training", "width", "params", "clean %", f"robust % (eps {eps:g})"], rows)])


# --------------------------------------------------------------------------- equal bytes
def _equal_bytes(ex: dict, recs: list[dict], spec: dict) -> Section:
    eps = spec["headline_eps"]
    groups = defaultdict(list)
    for r in recs:
        if r["role"] in ("compressed", "dense"):
            groups[(r["recipe"], r["regime"], r["family"])].append(r)
    pts = []
    for (label, regime, fam), g in groups.items():
        pts.append({"label": label, "regime": regime, "family": fam,
                    "bytes": mean_std(r["model_bytes"] for r in g)[0],
                    "clean": mean_std(r["clean_accuracy"] for r in g), "robust": mean_std(robust_at(r, eps) for r in g),
                    "robust_by_seed": _by_seed(g, lambda r: robust_at(r, eps))})
    pts.sort(key=lambda p: p["bytes"])
    prune = [p for p in pts if p["family"] == "pruning"]
    quant = [p for p in pts if p["family"] == "quantisation"]
    pairs = []
    for q in quant:
        if not prune:
            break
        p = min(prune, key=lambda p: abs(math.log(p["bytes"] / q["bytes"])))
        if max(p["bytes"], q["bytes"]) / min(p["bytes"], q["bytes"]) <= 1.3:
            pairs.append((p, q))
    rows = [[p["family"], p["label"], REGIME_NAMES.get(p["regime"], p["regime"]), f"{p['bytes']:.0f}",
             fmt_pct(p["clean"]), fmt_pct(p["robust"])] for p in pts]
    if pairs:
        tests = [compare_paired(p["robust_by_seed"], q["robust_by_seed"]) for p, q in pairs]
        # only differences that are significant over seeds count as wins
        wins = sum(1 for (p, q), t in zip(pairs, tests) if t.significant and t.mean_diff > 0)
        losses = sum(1 for (p, q), t in zip(pairs, tests) if t.significant and t.mean_diff < 0)
        desc = "; ".join(f"{q['label']} {q['bytes'] / 1e3:.0f} kB {fmt_pct(q['robust'])}% vs {p['label']} "
                         f"{p['bytes'] / 1e3:.0f} kB {fmt_pct(p['robust'])}% ({t.text()})"
                         for (p, q), t in zip(pairs, tests))
        if wins == losses == 0:
            head = (f"At equal bytes (within 30%), no difference in robust accuracy (eps {eps:g}) between pruning "
                    f"and quantisation at this number of seeds in any of {len(pairs)} pairs")
        else:
            winner = "pruning" if wins > losses else "quantisation" if losses > wins else "neither"
            head = (f"At equal bytes (within 30%), {winner} keeps more robust accuracy (eps {eps:g}): significantly "
                    f"better pruning in {wins}, quantisation in {losses} of {len(pairs)} pairs")
        finding = f"{head} — {desc}."
    else:
        finding = "No pruning and quantisation points within 30% of each other's bytes: nothing to compare."
    return Section(ex["name"], ex.get("title", ex["name"]), ex.get("question", ""), finding, "equal_bytes",
                   {"kind": "equal_bytes", "points": pts, "eps": eps,
                    "pairs": [(p["label"], q["label"]) for p, q in pairs]},
                   [Table("Mean ± std over seeds; bytes = every stored parameter and buffer.",
                          ["family", "recipe", "regime", "bytes", "clean %", f"robust % (eps {eps:g})"], rows)])


# ---------------------------------------------------------------------------- efficiency
def pareto_front(points: list[dict], x: str = "latency", y: str = "robust") -> list[dict]:
    """Points no other point beats on both (lower ``x``, higher ``y``)."""
    front = []
    for p in points:
        if not any((q[x] <= p[x] and q[y] >= p[y]) and (q[x] < p[x] or q[y] > p[y]) for q in points):
            front.append(p)
    return sorted(front, key=lambda p: p[x])


def _front_spread(front: list[dict]) -> str:
    """How far apart the front's members are in robust accuracy, and whether that is more than seed noise."""
    if len(front) < 2:
        return ""
    hi, lo = max(front, key=lambda p: p["robust"]), min(front, key=lambda p: p["robust"])
    test = compare_paired(hi["robust_by_seed"], lo["robust_by_seed"])
    return (f" (robust accuracy on the front spans {100 * (hi['robust'] - lo['robust']):.1f} points, "
            f"{hi['label']} vs {lo['label']}: {test.text()})")


def _efficiency(ex: dict, recs: list[dict], spec: dict, skipped: list[dict]) -> Section:
    """Points are grouped by (model, width, base, recipe, regime): seeds are averaged within a base,
    never across bases; speedups are against the dense model of the same base and seed, and the
    Pareto front is computed per base (a base is how the dense parent was trained)."""
    eps = spec["headline_eps"]
    batch_sizes = sorted({int(b) for r in recs for b in r.get("latency", {})})
    dense = {(r["model_name"], r["width"], r["base"], r["seed"]): r for r in recs if r["role"] == "dense"}
    groups = defaultdict(list)
    for r in recs:
        groups[(r["model_name"], r["width"], r.get("base"), r["recipe"], r["regime"])].append(r)
    seen = list(dict.fromkeys(k[2] for k in groups))
    bases = [b for b in ex.get("bases", ()) if b in seen] + [b for b in seen if b not in ex.get("bases", ())]
    multi = len(bases) > 1
    pts, rows, layer_rows = [], [], []
    for (model, width, base, label, regime), g in groups.items():
        label = label if len(ex["models"]) == 1 else f"{model} {label}"
        p = {"label": label, "id": f"{label} [{base}]" if multi else label, "base": base, "regime": regime,
             "model": model, "bytes": mean_std(r["model_bytes"] for r in g)[0],
             "ratio": mean_std(r["bytes_ratio"] for r in g)[0],
             "nonzero_ratio": mean_std(r.get("nonzero_ratio") for r in g)[0],
             "robust_by_seed": _by_seed(g, lambda r: robust_at(r, eps)),
             "clean": mean_std(r["clean_accuracy"] for r in g), "robust_ms": mean_std(robust_at(r, eps) for r in g),
             "speedup": {}, "latency_ms": {}, "throughput": {}}
        for b in batch_sizes:
            lat = [r["latency"][str(b)]["median_ms"] for r in g if str(b) in r.get("latency", {})]
            sp = [dense[(r["model_name"], r["width"], r["base"], r["seed"])]["latency"][str(b)]["median_ms"]
                  / r["latency"][str(b)]["median_ms"] for r in g
                  if (r["model_name"], r["width"], r["base"], r["seed"]) in dense and str(b) in r.get("latency", {})]
            p["latency_ms"][b] = mean_std(lat)
            p["speedup"][b] = mean_std(sp)
            p["throughput"][b] = mean_std(r["latency"][str(b)]["throughput_per_s"] for r in g
                                          if str(b) in r.get("latency", {}))
        p["robust"] = p["robust_ms"][0]
        p["latency"] = p["latency_ms"][batch_sizes[-1]][0] if batch_sizes else float("nan")
        pts.append(p)
    # the base whose dense model is the most robust first (e.g. adversarial training before standard)
    dense_rob = {b: mean_std(robust_at(d, eps) for d in dense.values() if d["base"] == b) for b in bases}
    bases.sort(key=lambda b: -dense_rob[b][0] if dense_rob[b][2] else math.inf)
    fronts = {b: (pareto_front([p for p in pts if p["base"] == b]) if batch_sizes else []) for b in bases}
    front_ids = {p["id"] for f in fronts.values() for p in f}
    pts.sort(key=lambda p: (bases.index(p["base"]), -p["ratio"]))
    for p in pts:
        row = ([p["base"]] if multi else []) + [p["label"], REGIME_NAMES.get(p["regime"], p["regime"]),
                                                f"{p['bytes']:.0f}", f"{p['ratio']:.2f}",
                                                f"{p['nonzero_ratio']:.2f}", fmt_pct(p["clean"]),
                                                fmt_pct(p["robust_ms"])]
        for b in batch_sizes:
            row += [_fmt_num(p["latency_ms"][b], digits=3), _fmt_speedup(p["speedup"][b]),
                    _fmt_num(p["throughput"][b], digits=0)]
        row.append("yes" if p["id"] in front_ids else "")
        rows.append(row)
    for (model, width, base, label, regime), g in sorted(groups.items(), key=lambda kv: bases.index(kv[0][2])):
        first = min(g, key=lambda r: r["seed"])
        name = label if len(ex["models"]) == 1 else f"{model} {label}"
        for b, lt in (first.get("layer_timing") or {}).items():
            if int(b) != batch_sizes[-1]:
                continue
            for lname, info in lt["layers"].items():
                layer_rows.append(([base] if multi else []) + [
                    name, b, lname, info["module"], f"{info['ms']:.4f}",
                    "-" if info["share"] is None else f"{100 * info['share']:.0f}"])
    head = (["base"] if multi else []) + ["recipe", "regime", "bytes", "bytes ×", "nonzero ×", "clean %",
                                          f"robust % (eps {eps:g})"]
    for b in batch_sizes:
        head += [f"ms @{b}", f"speedup @{b}", f"samples/s @{b}"]
    head.append("Pareto" + (" (per base)" if multi else ""))
    comp = [p for p in pts if p["regime"] != "dense"]
    if comp and batch_sizes:
        b = batch_sizes[-1]
        device = (recs[0].get("env") or {}).get("device_name", "?")
        if not multi:
            fastest = max(comp, key=lambda p: p["speedup"][b][0])
            smallest = max(comp, key=lambda p: p["ratio"])
            slower = [p["label"] for p in comp if p["speedup"][b][0] < 1]
            finding = (f"On {device}, the fastest recipe at batch {b} is {fastest['label']} "
                       f"({_fmt_speedup(fastest['speedup'][b])}x dense), the smallest {smallest['label']} "
                       f"({smallest['ratio']:.2f}x fewer bytes); {len(slower)} of {len(comp)} recipes run slower "
                       f"than dense here; Pareto front of robust accuracy vs latency at batch {b}: "
                       f"{', '.join(p['label'] for p in fronts[bases[0]])}{_front_spread(fronts[bases[0]])}.")
        else:
            parts = []
            for base in bases:
                mine = [p for p in comp if p["base"] == base]
                if not mine:
                    continue
                fastest = max(mine, key=lambda p: p["speedup"][b][0])
                slower = [p for p in mine if p["speedup"][b][0] < 1]
                regimes = ", ".join(dict.fromkeys(REGIME_NAMES.get(p["regime"], p["regime"]) for p in mine))
                parts.append(f"{base} base ({regimes}; dense {fmt_pct(dense_rob[base])}% robust): fastest "
                             f"{fastest['label']} ({_fmt_speedup(fastest['speedup'][b])}x its dense), {len(slower)} of "
                             f"{len(mine)} recipes slower than dense, Pareto front "
                             f"{', '.join(p['label'] for p in fronts[base])}{_front_spread(fronts[base])}")
            smallest = max(comp, key=lambda p: p["ratio"])
            finding = (f"On {device} at batch {b}, per base (speedup vs the dense model of the same base; Pareto "
                       f"front of robust accuracy vs latency): " + "; ".join(parts)
                       + f". Smallest: {smallest['label']} ({smallest['ratio']:.2f}x fewer bytes).")
        if batch_sizes[0] != b:
            finding += " " + _small_batch_speedups(comp, batch_sizes[0], bases if multi else None)
    else:
        finding = "No compressed model finished: nothing to compare."
    notes = ["Speedup = dense latency / compressed latency, both measured in this run on this device, per seed, "
             "then averaged" + (" (against the dense model of the same base)" if multi else "")
             + ". Latencies are medians over repeated forward passes on random inputs."]
    if multi:
        notes.append("Bases (how the dense parent was trained) are never averaged together; each base has its own "
                     "dense reference and its own Pareto front.")
    if skipped:
        notes.append("Not run here: " + "; ".join(f"{r['recipe']} ({r['reason']})" for r in skipped))
    tables = [Table("Mean ± std over seeds" + (", per base." if multi else "."), head, rows)]
    if layer_rows:
        tables.append(Table(f"Per-layer breakdown at batch {batch_sizes[-1]} (first seed): the module each layer "
                            "ran as and its share of the forward time (the rest is activations, normalisation and "
                            "Python overhead).", (["base"] if multi else [])
                            + ["recipe", "batch", "layer", "module (backend)", "ms", "share %"], layer_rows))
    return Section(ex["name"], ex.get("title", ex["name"]), ex.get("question", ""), finding, "efficiency",
                   {"kind": "efficiency", "points": pts, "bases": bases,
                    "front": [p["id"] for b in bases for p in fronts[b]],
                    "fronts": {b: [p["id"] for p in fronts[b]] for b in bases},
                    "batch_sizes": batch_sizes, "eps": eps}, tables, notes)


def _small_batch_speedups(comp: list[dict], b: int, bases: list[str] | None) -> str:
    """At the smallest batch (where memory traffic, not compute, bounds a large layer): how many
    recipes beat dense, and by how much."""
    parts = []
    for base in bases or [None]:
        mine = [p for p in comp if base is None or p["base"] == base]
        faster = sorted((p for p in mine if p["speedup"][b][2] and p["speedup"][b][0] > 1),
                        key=lambda p: -p["speedup"][b][0])
        text = f"{len(faster)} of {len(mine)} recipes faster than dense"
        if faster:
            text += " (" + ", ".join(f"{p['label']} {_fmt_speedup(p['speedup'][b])}x" for p in faster) + ")"
        parts.append(text if base is None else f"{base} base: {text}")
    return f"At batch {b}: " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------------- main
def analyse(spec: dict, records: list[dict], point_ids: set[str] | None = None) -> list[Section]:
    """One section per experiment of ``spec`` (a ``StudySpec.to_dict()``) from ``records``."""
    sections = []
    for ex in spec["experiments"]:
        mine = [r for r in records if r.get("experiment") == ex["name"]
                and (point_ids is None or r.get("point_id") in point_ids)]
        ok = [r for r in mine if r.get("status", "ok") == "ok"]
        skipped = [r for r in mine if r.get("status") == "skipped"]
        kind = ex["kind"]
        if kind == "sweep":
            s = _sweep(ex, ok, spec)
        elif kind == "compact":
            s = _compact(ex, ok, spec)
        elif kind == "capacity":
            s = _capacity(ex, ok, spec)
        elif kind == "equal_bytes":
            s = _equal_bytes(ex, ok, spec)
        else:
            s = _efficiency(ex, ok, spec, skipped)
        if skipped and kind != "efficiency":
            s.notes.append("Not run here: " + "; ".join(sorted({f"{r['recipe']} ({r['reason']})" for r in skipped})))
        sections.append(s)
    return sections
