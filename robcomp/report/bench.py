"""The hardware efficiency section: pytest-benchmark JSON (``robcomp bench``) and the study's own
timings, as time, speedup vs dense measured in the same run, bytes moved, achieved GB/s and
TFLOP/s, and the percentage of the device's peak where the device is in :data:`PEAKS` ("peak
unknown" otherwise).

pytest-benchmark JSON: ``{"machine_info", "benchmarks": [{"name", "group", "params", "stats":
{"median", ...}, "extra_info": {...}}], "datetime", "version"}``. robcomp's suites put their
measurements in ``extra_info`` (``ms``, ``bytes``, ``flops``, ``gbps``/``GBps``, ``tflops``/``TFLOPs``,
``speedup_vs_dense``, ``device``, ``shape``, ``format``/``impl``); any other benchmark JSON still
gives its median time.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["PEAKS", "peak_for", "load_bench", "bench_rows", "study_hardware_rows", "is_baseline"]

#: device-name fragment -> (memory GB/s, dense fp16/bf16 tensor-core TFLOP/s), datasheet values
PEAKS = {
    "H100 80GB HBM3": (3350.0, 989.0),
    "H100 SXM": (3350.0, 989.0),
    "H100 PCIe": (2000.0, 756.0),
    "H100 NVL": (3900.0, 835.0),
    "H200": (4800.0, 989.0),
    "A100-SXM4-80GB": (2039.0, 312.0),
    "A100-SXM4-40GB": (1555.0, 312.0),
    "A100-PCIE-40GB": (1555.0, 312.0),
    "A100 80GB PCIe": (1935.0, 312.0),
    "L40S": (864.0, 362.0),
    "L4": (300.0, 121.0),
    "RTX 4090": (1008.0, 165.0),
}


def peak_for(device: str | None) -> tuple[float, float] | None:
    if not device:
        return None
    for fragment, peak in PEAKS.items():
        if fragment in device:
            return peak
    return None


def load_bench(path: str | Path) -> dict:
    """Read and check a pytest-benchmark JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"--bench {str(path)!r}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--bench {str(path)!r} is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"--bench {str(path)!r} is not pytest-benchmark JSON (no 'benchmarks' list)")
    return data


#: what platform.processor() / machine() return where no CPU name is known; never a device name
_ARCH_NAMES = {"x86_64", "amd64", "aarch64", "arm64", "i386", "i686", "armv7l", "ppc64le", "s390x", ""}


def _device(name: str | None, cpu_brand: str | None) -> str:
    """One name per device in every table: a bare architecture becomes the CPU's brand when known."""
    if (name or "").strip().lower() in _ARCH_NAMES and cpu_brand:
        return cpu_brand
    return name or cpu_brand or "unknown device"


def is_baseline(row: dict) -> bool:
    """A row that times the reference itself (dense against dense): its speedup is 1 by construction."""
    impl = (row.get("impl") or "").lower()
    return impl == "dense" or (bool(row.get("speedup_vs")) and impl == row["speedup_vs"].lower())


def _num(*values):
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def bench_rows(data: dict, source: str = "") -> list[dict]:
    """One row per benchmark: name, device, shape, ms, speedup, bytes, GB/s, TFLOP/s, % of peak."""
    machine = data.get("machine_info") or {}
    brand = (machine.get("cpu") or {}).get("brand_raw")
    default_device = _device(machine.get("machine"), brand)
    rows = []
    medians = {}
    for b in data["benchmarks"]:
        ex = b.get("extra_info") or {}
        stats = b.get("stats") or {}
        ms = _num(ex.get("ms"), (stats.get("median") or 0) * 1e3 if stats.get("median") is not None else None)
        name = b.get("name") or b.get("fullname") or "?"
        medians[name] = ms
        nbytes = _num(ex.get("bytes"))
        flops = _num(ex.get("flops"))
        gbps = _num(ex.get("gbps"), ex.get("GBps"), nbytes / ms / 1e6 if nbytes and ms else None)
        tflops = _num(ex.get("tflops"), ex.get("TFLOPs"), flops / ms / 1e9 if flops and ms else None)
        device = _device(ex.get("device"), brand) if ex.get("device") else default_device
        peak = peak_for(device)
        speedup = _num(*(ex.get(k) for k in ex if k.startswith("speedup_vs_")))
        base = next((k[len("speedup_vs_"):] for k in ex if k.startswith("speedup_vs_")), None)
        shape = ex.get("shape")
        rows.append({
            "name": name, "group": b.get("group") or "", "source": source, "device": device,
            "impl": ex.get("impl") or ex.get("format") or "", "dtype": ex.get("dtype") or "",
            "shape": " ".join(f"{k}={v}" for k, v in shape.items()) if isinstance(shape, dict) else str(shape or ""),
            "ms": ms, "speedup": speedup, "speedup_vs": base, "bytes": nbytes, "gbps": gbps, "tflops": tflops,
            "bw_pct": 100 * gbps / peak[0] if peak and gbps is not None else None,
            "compute_pct": 100 * tflops / peak[1] if peak and tflops is not None else None,
            "peak": "peak unknown" if peak is None else f"{peak[0]:g} GB/s, {peak[1]:g} TFLOP/s",
        })
    return rows


def study_hardware_rows(records: list[dict]) -> list[dict]:
    """From the study's efficiency points: per recipe and batch size, median latency, speedup vs the
    dense model of the same seed (same run), weight bytes read per call, GB/s and TFLOP/s."""
    dense = {(r["model_name"], r["width"], r["base"], r["seed"]): r for r in records
             if r.get("kind") == "efficiency" and r.get("role") == "dense" and r.get("status", "ok") == "ok"}
    rows = []
    first_seed = min((d["seed"] for d in dense.values()), default=None)
    for r in records:
        if r.get("kind") != "efficiency" or r.get("status", "ok") != "ok" or r.get("seed") != first_seed:
            continue
        env = r.get("env") or {}
        device = _device(env.get("device_name"), env.get("cpu")) if env.get("device_name") else env.get("device", "?")
        peak = peak_for(device) if env.get("device") != "cpu" else None
        d = dense.get((r["model_name"], r["width"], r["base"], r["seed"]))
        macs = (r.get("macs") or {}).get("macs")
        n_in, n_out = r.get("io_elements") or (0, 0)
        for b, lat in sorted(r.get("latency", {}).items(), key=lambda kv: int(kv[0])):
            ms = lat["median_ms"]
            # weights read once per call + fp32 inputs and logits; activations between layers not counted
            moved = r["model_bytes"] + int(b) * 4 * (n_in + n_out)
            gbps = moved / ms / 1e6 if ms > 0 else None
            tflops = 2 * macs * int(b) / ms / 1e9 if macs and ms > 0 else None
            sp = d["latency"][b]["median_ms"] / ms if d and b in d.get("latency", {}) and ms > 0 else None
            rows.append({"name": f"{r['model_name']} {r['recipe']} @ batch {b}", "impl": r["recipe"], "batch": int(b),
                         "device": device, "ms": ms, "speedup": sp, "speedup_vs": "dense", "bytes": moved,
                         "gbps": gbps, "tflops": tflops,
                         "bw_pct": 100 * gbps / peak[0] if peak and gbps else None,
                         "compute_pct": 100 * tflops / peak[1] if peak and tflops else None,
                         "peak": "peak unknown" if peak is None else f"{peak[0]:g} GB/s, {peak[1]:g} TFLOP/s"})
    return rows
