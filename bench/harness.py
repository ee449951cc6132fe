"""Shared harness for robcomp's kernel and layer benchmarks (pytest-benchmark suites in bench/).

It implements the measurement rules of DESIGN.md once, so that every suite reports the same way:

* **Timing**: on CUDA ``triton.testing.do_bench`` (CUDA events, warm-up, the L2 is flushed before
  every repetition so inputs never sit in cache, median of many runs); on CPU ``time.perf_counter``
  around the call, median over repeats. Never time zeros: build inputs with :func:`randn`.
* **Metadata**: every record carries the device name, driver/CUDA, torch, triton and Python
  versions, the date (UTC), and its own dtype and shape (:func:`environment`).
* **Throughput**: achieved GB/s and TFLOP/s next to the device's peak (roofline %, from
  :data:`robcomp.report.bench.PEAKS`; unknown devices get no percentage).
* **Ratios**: speedups are computed only against a baseline measured in the same run
  (:meth:`Recorder.ratio`), never across runs or devices.

Reuse in a suite (see bench/test_sparse24.py)::

    from bench.harness import Measurement, time_ms, matmul_flops

    def test_my_kernel(benchmark, recorder, device):          # fixtures from bench/conftest.py
        x, w = ...
        ms = time_ms(lambda: my_kernel(x, w), device)
        m = recorder.add(Measurement(suite="lowbit", case="int4 M=16 4096x4096", impl="triton",
                                     dtype="float16", shape={"M": 16, "N": 4096, "K": 4096},
                                     ms=ms, bytes=..., flops=matmul_flops(16, 4096, 4096)))
        base = recorder.add(Measurement(..., impl="dense", ...))
        benchmark.extra_info.update(m.as_dict(), speedup_vs_dense=recorder.ratio(m, "dense"))
        benchmark.pedantic(...)  # optional: let pytest-benchmark keep its own statistics too

``recorder`` (session-scoped) writes ``bench/results/<suite>-<device>-<date>.json`` at the end of
the session on CUDA, or anywhere when ``ROBCOMP_BENCH_SAVE=1``; files are written atomically.
With ``--benchmark-disable`` suites should run each path once for correctness and skip timing
(``benchmark.disabled``).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment(device: torch.device | str | None = None) -> dict:
    """Device name, driver/CUDA, torch, triton and Python versions and the UTC date."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton missing
        triton_version = None
    info = {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device_type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, compute_capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), driver=_driver_version())
    else:
        info.update(device=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                    triton_interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    peak = peaks(info["device"])
    if peak:
        info["peak_gbps"], info["peak_tflops_fp16"] = peak
    return info


def _driver_version() -> str | None:
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def peaks(device_name: str) -> tuple[float, float] | None:
    """(memory GB/s, fp16 tensor-core TFLOP/s) of a known device; one table, in robcomp.report.bench."""
    from robcomp.report.bench import peak_for

    return peak_for(device_name)


def randn(*shape, dtype=torch.float16, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Random normal inputs (never time on zeros)."""
    return torch.randn(*shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)


def time_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 25, rep: int = 100,
            cpu_repeats: int = 5, cpu_warmup: int = 1) -> float:
    """Median milliseconds of ``fn()``: ``do_bench`` on CUDA (``warmup``/``rep`` in ms), else
    ``time.perf_counter`` over ``cpu_repeats`` calls after ``cpu_warmup`` warm-up calls."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(cpu_warmup):
        fn()
    samples = []
    for _ in range(max(1, cpu_repeats)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


def matmul_flops(m: int, n: int, k: int) -> int:
    """Dense-equivalent FLOPs of ``[m, k] x [k, n]`` (a 2:4 kernel is credited the same work)."""
    return 2 * m * n * k


def nbytes(*tensors_or_counts) -> int:
    """Bytes of tensors (``numel * element_size``) plus plain integer byte counts."""
    total = 0
    for t in tensors_or_counts:
        total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else int(t)
    return total


@dataclasses.dataclass
class Measurement:
    suite: str
    case: str                 # what is compared (shape + op), shared by the impls of one comparison
    impl: str                 # "triton", "dense", "semi_structured", "reference", ...
    dtype: str
    shape: dict
    ms: float
    bytes: int = 0            # bytes that must move (weights + activations + outputs)
    flops: int = 0

    @property
    def gbps(self) -> float:
        return gbps(self.bytes, self.ms)

    @property
    def tflops(self) -> float:
        return tflops(self.flops, self.ms)

    def as_dict(self, env: dict | None = None) -> dict:
        d = dataclasses.asdict(self)
        d.update(gbps=round(self.gbps, 2), tflops=round(self.tflops, 4))
        if env and env.get("peak_gbps"):
            d["roofline_bw_pct"] = round(100 * self.gbps / env["peak_gbps"], 1)
            d["roofline_compute_pct"] = round(100 * self.tflops / env["peak_tflops_fp16"], 1)
        return d


class Recorder:
    """Collects the measurements of one session; ratios against a baseline of the same run."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.env = environment(self.device)
        self.rows: list[Measurement] = []

    def add(self, m: Measurement) -> Measurement:
        self.rows.append(m)
        return m

    def ratio(self, m: Measurement, baseline_impl: str) -> float | None:
        """``baseline.ms / m.ms`` (speedup, > 1 is faster) for the same suite/case/dtype, or None."""
        for b in reversed(self.rows):
            if (b.suite, b.case, b.dtype, b.impl) == (m.suite, m.case, m.dtype, baseline_impl) and m.ms > 0:
                return b.ms / m.ms
        return None

    def records(self) -> list[dict]:
        out = []
        for m in self.rows:
            d = m.as_dict(self.env)
            if m.impl != "dense":
                r = self.ratio(m, "dense")
                if r is not None:
                    d["speedup_vs_dense"] = round(r, 4)
            out.append(d)
        return out

    def save(self, suite: str | None = None, directory: Path | str = RESULTS_DIR) -> Path | None:
        """Write ``{environment, results}`` as JSON, atomically; None when there is nothing to write."""
        rows = [r for r in self.records() if suite is None or r["suite"] == suite]
        if not rows:
            return None
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.env.get("device", "device")).strip("-").lower()
        stamp = self.env["date"].replace(":", "").replace("-", "")[:15]
        path = directory / f"{suite or 'bench'}-{slug}-{stamp}.json"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bench-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"environment": self.env, "results": rows}, f, indent=1)
        os.replace(tmp, path)
        return path
