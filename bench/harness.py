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
* **Numerics**: the error measures and per-dtype bounds that the kernel tests (tests/numerics.py
  re-exports them) and the GPU suite's correctness phase share (:func:`rel_err`, :func:`sqnr_db`,
  :data:`TOL`, :func:`poisoned_empty`).
* **What users pay per call**: :func:`launch_overhead_us` (eager wall clock per call and CUDA-graph
  replay per call).

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

import contextlib
import dataclasses
import datetime
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: largest relative error (max |err| / max |ref|) accepted per activation dtype, against float64
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}

#: the dense 8-bit tensor-core rate over the 16-bit one (datasheets: 2x for int8 on Ampere, Ada and
#: Hopper, and for fp8 on Ada and Hopper)
EIGHT_BIT_RATE = 2.0
#: device-name fragments of robcomp.report.bench.PEAKS without fp8 tensor cores
NO_FP8 = ("A100",)


# ------------------------------------------------------------------------------ environment
def environment(device: torch.device | str | None = None) -> dict:
    """Device name, driver/CUDA, torch, triton and Python versions, the UTC date and the device's
    datasheet peaks per dtype (:func:`peaks_by_dtype`)."""
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
        info.update(device=platform.processor() or platform.machine(), cpu_count=os.cpu_count(), driver=None,
                    triton_interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    peak = peaks(info["device"])
    if peak:
        info["peak_gbps"], info["peak_tflops_fp16"] = peak
        info["peaks"] = peaks_by_dtype(info["device"])
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


def peaks_by_dtype(device_name: str) -> dict | None:
    """The device's datasheet ceilings: ``hbm_gbps`` and dense tensor-core TFLOP/s (TOP/s for int8)
    per compute dtype (``float16``, ``bfloat16``, ``int8``, ``float8``; ``float8`` None where the
    device has no fp8 tensor cores), derived from robcomp.report.bench.PEAKS; None when unknown."""
    peak = peaks(device_name)
    if peak is None:
        return None
    gbps_, half = peak
    return {"hbm_gbps": gbps_, "float16": half, "bfloat16": half, "int8": EIGHT_BIT_RATE * half,
            "float8": None if any(f in device_name for f in NO_FP8) else EIGHT_BIT_RATE * half}


def measure_ceilings(device: torch.device | str, *, copy_bytes: int = 1 << 30, mm_size: int = 8192) -> dict:
    """The two ceilings measured on this device in this run (METHOD.md): a device-to-device copy
    (GB/s, bytes read plus written) and a dense bf16 matrix product (TFLOP/s) on random data, plus
    ``torch._int_mm`` (int8 TOP/s) where it runs. CUDA only; a failed probe is reported, not raised."""
    device = torch.device(device)
    out: dict = {"how": f"do_bench median; copy of {copy_bytes >> 20} MiB, {mm_size}^3 products"}
    src = torch.empty(copy_bytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    out["copy_gbps"] = round(gbps(2 * copy_bytes, time_ms(lambda: dst.copy_(src), device, warmup=10, rep=50)), 1)
    del src, dst
    a = torch.randn(mm_size, mm_size, device=device, dtype=torch.bfloat16)
    b = torch.randn(mm_size, mm_size, device=device, dtype=torch.bfloat16)
    out["bfloat16_tflops"] = round(tflops(matmul_flops(mm_size, mm_size, mm_size),
                                          time_ms(lambda: a @ b, device, warmup=10, rep=50)), 1)
    try:
        ai = torch.randint(-128, 127, (mm_size, mm_size), device=device, dtype=torch.int8)
        bi = torch.randint(-128, 127, (mm_size, mm_size), device=device, dtype=torch.int8).t()
        out["int8_tops"] = round(tflops(matmul_flops(mm_size, mm_size, mm_size),
                                        time_ms(lambda: torch._int_mm(ai, bi), device, warmup=10, rep=50)), 1)
    except Exception as e:
        out["int8_tops"] = None
        out["int8_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


# ------------------------------------------------------------------------------ inputs and numerics
def randn(*shape, dtype=torch.float16, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Random normal inputs (never time on zeros)."""
    return torch.randn(*shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)


def rotating(items: list) -> Callable[[], object]:
    """A zero-argument callable returning ``items`` in turn: a timed call cycles through several
    input sets, so that no input sits in the L2 from the previous repetition."""
    state = [0]

    def nxt():
        state[0] = (state[0] + 1) % len(items)
        return items[state[0]]
    return nxt


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|, in float64."""
    y, ref = y.double(), ref.double()
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``y`` against ``ref``, in dB."""
    y, ref = y.double(), ref.double()
    return 10 * math.log10(ref.pow(2).sum().item() / max((y - ref).pow(2).sum().item(), 1e-300))


@contextlib.contextmanager
def poisoned_empty():
    """While active, ``torch.empty`` returns NaN (floats) / 77 (integers): an output element that a
    kernel does not write shows up in the error."""
    real = torch.empty

    def empty(*shape, **kw):
        t = real(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(77)
    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


# ------------------------------------------------------------------------------ timing
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


def launch_overhead_us(fn: Callable[[], object], device: torch.device | str, *, calls: int = 200,
                       graph_calls: int = 10, replays: int = 50, warmup: int = 3) -> dict:
    """What one call costs the caller at a shape too small to keep the device busy.

    ``eager_us``: wall clock per call over ``calls`` back-to-back calls (one synchronisation at the
    end, so this is the host's launch cost wherever the device work is shorter). ``graph_us``
    (CUDA only): ``graph_calls`` calls captured once in a ``torch.cuda.CUDAGraph`` and replayed
    ``replays`` times, wall clock per call; ``graph_error`` says why capture failed (e.g. a path
    that synchronises or allocates on the host)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    out = {"eager_us": (time.perf_counter() - t0) / calls * 1e6, "calls": calls}
    if device.type != "cuda":
        out["graph_us"], out["graph_error"] = None, "CUDA graphs need a CUDA device"
        return out
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs recommends
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(graph_calls):
                fn()
        graph.replay()
        sync()
        t0 = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        sync()
        out.update(graph_us=(time.perf_counter() - t0) / (replays * graph_calls) * 1e6,
                   graph_calls=graph_calls, replays=replays)
    except Exception as e:
        sync_ok = True
        try:
            sync()
        except Exception:
            sync_ok = False
        out.update(graph_us=None, graph_error=f"{type(e).__name__}: {e}"[:300], device_ok_after=sync_ok)
    return out


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


# ------------------------------------------------------------------------------ records
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
    compute_dtype: str = ""   # whose tensor-core peak applies ("int8", "float8"); default: dtype
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. the dispatched path taken

    @property
    def gbps(self) -> float:
        return gbps(self.bytes, self.ms)

    @property
    def tflops(self) -> float:
        return tflops(self.flops, self.ms)

    def as_dict(self, env: dict | None = None) -> dict:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        d["compute_dtype"] = self.compute_dtype or self.dtype
        d.update(gbps=round(self.gbps, 2), tflops=round(self.tflops, 4), **extra)
        table = (env or {}).get("peaks") or {}
        if table.get("hbm_gbps"):
            d["roofline_bw_pct"] = round(100 * self.gbps / table["hbm_gbps"], 1)
        if table.get(d["compute_dtype"]):
            d["roofline_compute_pct"] = round(100 * self.tflops / table[d["compute_dtype"]], 1)
        measured = (env or {}).get("measured_peaks") or {}
        if measured.get("copy_gbps"):
            d["measured_bw_pct"] = round(100 * self.gbps / measured["copy_gbps"], 1)
        return d


def atomic_write_json(path: Path | str, obj) -> Path:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace``: a reader never
    sees a half-written file."""
    from robcomp._io import write_json_atomic  # stdlib only: importing it costs nothing

    return write_json_atomic(path, obj, parents=True, indent=1, default=str)


def device_slug(env: dict) -> str:
    """The device name as a file-name fragment ("NVIDIA H200" -> "nvidia-h200")."""
    return re.sub(r"[^A-Za-z0-9]+", "-", env.get("device") or "device").strip("-").lower()


class Recorder:
    """Collects the measurements of one session; ratios against a baseline of the same run."""

    def __init__(self, device: torch.device | str, env: dict | None = None):
        self.device = torch.device(device)
        self.env = env if env is not None else environment(self.device)
        self.rows: list[Measurement] = []

    def add(self, m: Measurement) -> Measurement:
        self.rows.append(m)
        return m

    def index(self) -> dict:
        """(suite, case, dtype, impl) -> the latest measurement of it."""
        return {(b.suite, b.case, b.dtype, b.impl): b for b in self.rows}

    def ratio(self, m: Measurement, baseline_impl: str, index: dict | None = None) -> float | None:
        """``baseline.ms / m.ms`` (speedup, > 1 is faster) for the same suite/case/dtype, or None.
        ``index``: :meth:`index`, when many ratios are taken at once."""
        b = (index if index is not None else self.index()).get((m.suite, m.case, m.dtype, baseline_impl))
        return b.ms / m.ms if b is not None and m.ms > 0 else None

    def records(self) -> list[dict]:
        out, index = [], self.index()
        for m in self.rows:
            d = m.as_dict(self.env)
            if m.impl != "dense":
                r = self.ratio(m, "dense", index)
                if r is not None:
                    d["speedup_vs_dense"] = round(r, 4)
            out.append(d)
        return out

    def save(self, suite: str | None = None, directory: Path | str = RESULTS_DIR) -> Path | None:
        """Write ``{environment, results}`` as JSON, atomically; None when there is nothing to write."""
        rows = [r for r in self.records() if suite is None or r["suite"] == suite]
        if not rows:
            return None
        stamp = self.env["date"].replace(":", "").replace("-", "")[:15]
        path = Path(directory) / f"{suite or 'bench'}-{device_slug(self.env)}-{stamp}.json"
        return atomic_write_json(path, {"environment": self.env, "results": rows})
