"""The GPU kernels' speed targets (including "never below 0.98x at any M after dispatch") and how the GPU suite decides whether each is met.

A *case* is one planned timing: ``{"format", "kind", "op", "dtype", "M", "K", "N", "status",
"speedup", "path"}`` with ``kind`` one of ``"raw"`` (the Triton launcher), ``"layer"`` (the
dispatched layer after ``robcomp.tune``), ``status`` one of ``"ok"``, ``"error"``, ``"skipped"``
and ``speedup`` = dense ms / case ms in the same run. A target is

* **unmet** when any of its cases errored, when the format failed a correctness check, or when
  its worst measured ratio is below the target;
* **incomplete** (``met: None``) when every measured ratio reaches the target but cases were
  skipped, and **no data** when none was measured;
* **met** only when every planned case ran and reached it.
"""
from __future__ import annotations

import statistics
from collections import Counter

#: ratio vs dense fp16 cuBLAS in the same run, on the target shapes
TARGETS = {
    "sparse24": {"M<=16": 1.5, "M=64": 1.2, "M>=2048": 0.98},
    "int8_weight": {"M<=16": 1.8, "M=64": 1.4, "M>=2048": 0.98},
    "int4_g128": {"M<=16": 3.0, "M=64": 1.5, "M>=2048": 0.98},
    "sparse24_int4_g128": {"M<=16": 4.0, "M=64": 2.0, "M>=2048": 0.98},
    "int8_dynamic": {"M<=16": 1.3, "M>=2048": 1.5},
    "fp8_dynamic": {"M<=16": 1.3, "M>=2048": 1.5},
}
REGIMES = {"M<=16": lambda m: m <= 16, "M=64": lambda m: m == 64, "M>=2048": lambda m: m >= 2048,
           "every M": lambda m: True}
#: which implementation a regime's target is about: the raw kernel at small M (the kernel table's
#: columns), the dispatched layer at large M and for the "never below" rule
KIND = {"M<=16": "raw", "M=64": "raw", "M>=2048": "layer", "every M": "layer"}
DISPATCHED_FLOOR = 0.98
GRAD_TARGET = 0.8   # input-gradient ratio >= 0.8x the forward's ratio, M <= 16
GRAD_FORMATS = ("sparse24", "int8_weight", "int4_g128", "sparse24_int4_g128")


def _worst(cases):
    vals = [c["speedup"] for c in cases if c["status"] == "ok" and c.get("speedup") is not None]
    return (round(min(vals), 3) if vals else None), (round(statistics.median(vals), 3) if vals else None), vals


def verdict(target: float, cases: list[dict], correctness_failed: bool, values: list[float] | None = None) -> tuple:
    """(met, status) of one target from its planned cases (``values``: the ratios to judge, by
    default the cases' speedups)."""
    errored = sum(c["status"] == "error" for c in cases)
    skipped = sum(c["status"] == "skipped" for c in cases)
    vals = values if values is not None else _worst(cases)[2]
    if errored:
        return False, f"unmet: {errored} case(s) errored"
    if correctness_failed:
        return False, "unmet: correctness check failed"
    if not vals:
        return None, "no data" + (f" ({skipped} skipped)" if skipped else "")
    if min(vals) < target:
        return False, "unmet"
    if skipped:
        return None, f"incomplete: {skipped} case(s) skipped"
    return True, "met"


def evaluate(cases: list[dict], correctness: list[dict], shapes: list[tuple[int, int]], formats: list[str],
             dtype: str = "float16") -> list[dict]:
    """One row per (format, regime) target and one per input-gradient target."""
    shapes = {tuple(s) for s in shapes}
    pool = [c for c in cases if c["dtype"] == dtype and (c["K"], c["N"]) in shapes]
    failed = {c["format"] for c in correctness if c["dtype"] == dtype and not c["passed"]}
    rows = []
    for fmt, regimes in TARGETS.items():
        if fmt not in formats:
            continue
        for regime, target in [*regimes.items(), ("every M", DISPATCHED_FLOOR)]:
            def sel(kind, op="forward"):
                return [c for c in pool if c["format"] == fmt and c["kind"] == kind and c["op"] == op
                        and REGIMES[regime](c["M"])]
            judged = sel(KIND[regime])
            met, status = verdict(target, judged, fmt in failed)
            worst, median, _ = _worst(judged)
            raw_worst, layer_worst = _worst(sel("raw"))[0], _worst(sel("layer"))[0]
            paths = Counter(c.get("path") or "unrecorded" for c in sel("layer") if c["status"] == "ok")
            rows.append({"format": fmt, "regime": regime, "judged": KIND[regime], "target": target, "dtype": dtype,
                         "cases": len(judged), "worst": worst, "median": median, "raw_worst": raw_worst,
                         "layer_worst": layer_worst, "layer_paths": dict(paths), "met": met, "status": status})
    for fmt in GRAD_FORMATS:
        if fmt not in formats:
            continue
        grads = [c for c in pool if c["kind"] == "raw" and c["op"] == "input_grad" and fmt in c.get("formats", [fmt])
                 and c["M"] <= 16]
        fwd = {(c["M"], c["K"], c["N"]): c.get("speedup") for c in pool
               if c["format"] == fmt and c["kind"] == "raw" and c["op"] == "forward" and c["status"] == "ok"}
        rel = []
        for g in grads:
            f = fwd.get((g["M"], g["K"], g["N"]))
            if g["status"] == "ok" and g.get("speedup") is not None and f:
                rel.append(g["speedup"] / f)
        met, status = verdict(GRAD_TARGET, grads, fmt in failed, rel)
        rows.append({"format": fmt, "regime": "input_grad/forward M<=16", "judged": "raw", "target": GRAD_TARGET,
                     "dtype": dtype, "cases": len(grads), "worst": round(min(rel), 3) if rel else None,
                     "median": round(statistics.median(rel), 3) if rel else None, "raw_worst": None,
                     "layer_worst": None, "layer_paths": {}, "met": met, "status": status})
    return rows
