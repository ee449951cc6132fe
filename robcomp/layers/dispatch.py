"""Per-shape choice between the implementations ("paths") of a compressed matmul, on every device.

A compressed layer can run several paths that compute the same format (see
``CompressedLinear.paths``):

* CPU: ``"native"`` (robcomp's CPU kernels, ``kernels/cpu.py``), ``"dense"`` (the weight unpacked
  per call, then ``F.linear``), ``"bf16_tiles"`` (decoded tile by tile into bf16 for oneDNN's
  bf16 GEMM, ``kernels/bf16_tiles.py``), ``"numba_fp32"`` / ``"numba_int8"`` (the int8 GEMVs),
  ``"reference"`` (``kernels/reference.py``);
* CUDA: ``"triton"`` (the Triton kernels), ``"dense"`` (dequantised per call into cuBLAS),
  ``"semi_structured"`` (2:4, ``torch.sparse.to_sparse_semi_structured``), ``"int_mm"`` (W8A8,
  ``torch._int_mm``), ``"scaled_mm"`` (FP8, ``torch._scaled_mm``), ``"reference"``.

Which one is fastest depends on the machine and on the shape, so the choice is an explicit,
recorded step: :func:`robcomp.tune` measures each compressed layer's candidates at the shapes it
sees and stores the winner per (device key, layer format, dtype, M bucket, N, K)

* in the layers (``forward`` looks it up; it never times anything), and
* on disk in ``<cache dir>/dispatch.json`` (``robcomp._io.cache_dir()``: ``$ROBCOMP_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/robcomp``, else ``~/.cache/robcomp``),
  replaced atomically, so a later ``tune`` on the same machine reuses the measurements. The device
  key names the CPU model and thread count or the GPU and its compute capability, and the torch,
  triton and numba versions: a decision is never reused on other hardware or software.

Without a tuned entry a layer runs its device's static default (``CompressedLinear.default_path``).
The decision rule (:func:`decide`) is a pure function of the timings, and :func:`choose` takes the
measuring function as an argument, so both are unit-tested with injected timings.
"""
from __future__ import annotations

import functools
import json
import math
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from robcomp._io import cache_dir, write_json_atomic

__all__ = ["m_bucket", "decide", "DispatchCache", "choose", "device_key", "dispatch_key",
           "measure_interleaved", "PATHS"]

#: every path name a layer may run (CompressedLinear.paths lists those of one layer and device)
PATHS = ("native", "dense", "reference", "triton", "semi_structured", "int_mm", "scaled_mm", "bitsandbytes",
         "numba_fp32", "numba_int8", "bf16_tiles", "onednn", "fbgemm")
CACHE_FILE = "dispatch.json"


def m_bucket(m: int) -> int:
    """Rows are grouped in powers of two (1, 2, 4, ... 4096): one measurement per bucket."""
    m = max(int(m), 1)
    return min(1 << (m - 1).bit_length(), 4096)


def decide(timings: dict[str, float | None], preferred: str = "triton", tolerance: float = 0.02) -> str:
    """The fastest candidate; ``preferred`` wins unless another is faster by more than ``tolerance``
    (relative). Missing, NaN, infinite or non-positive timings (a candidate that failed) are ignored;
    with no valid timing the answer is ``preferred``."""
    valid = {k: float(v) for k, v in timings.items()
             if v is not None and math.isfinite(float(v)) and float(v) > 0}
    if not valid:
        return preferred
    best = min(valid, key=valid.get)
    if preferred in valid and valid[preferred] <= valid[best] * (1.0 + tolerance):
        return preferred
    return best


class DispatchCache:
    """JSON file of ``{key: {"choice": ..., "timings_ms": {...}}}``, written atomically."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else cache_dir() / CACHE_FILE
        self._lock = threading.Lock()
        self._data: dict | None = None

    def _load(self) -> dict:
        if self._data is None:
            try:
                self._data = json.loads(self.path.read_text())
                if not isinstance(self._data, dict):
                    self._data = {}
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def entry(self, key: str) -> dict | None:
        entry = self._load().get(key)
        return entry if isinstance(entry, dict) and entry.get("choice") in PATHS else None

    def get(self, key: str) -> str | None:
        entry = self.entry(key)
        return None if entry is None else entry["choice"]

    def put(self, key: str, choice: str, timings: dict) -> None:
        with self._lock:
            data = self._load()
            data[key] = {"choice": choice, "timings_ms": {k: (None if v is None or not math.isfinite(v) else v)
                                                          for k, v in timings.items()}}
            try:
                write_json_atomic(self.path, data, parents=True, indent=1, sort_keys=True)
            except OSError:
                pass  # a read-only cache dir costs a re-measurement next process, nothing else


_DEFAULT_CACHE: DispatchCache | None = None


def default_cache() -> DispatchCache:
    global _DEFAULT_CACHE
    path = cache_dir() / CACHE_FILE
    if _DEFAULT_CACHE is None or _DEFAULT_CACHE.path != path:
        _DEFAULT_CACHE = DispatchCache(path)
    return _DEFAULT_CACHE


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _versions() -> str:
    out = [f"torch {torch.__version__}"]
    for mod in ("triton", "numba"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            out.append(f"{mod} -")
    return "|".join(out)


def device_key(device: torch.device) -> str:
    """Hardware and software a measurement holds for: GPU name and compute capability, or the CPU
    model and torch's thread count; plus the torch, triton and numba versions."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        hw = f"{name}|cc%d.%d" % torch.cuda.get_device_capability(device)
    elif device.type == "cpu":
        hw = f"{_cpu_model()}|threads{torch.get_num_threads()}"
    else:
        hw = device.type
    return f"{hw}|{_versions()}"


def dispatch_key(op: str, device: torch.device, shape: tuple[int, int, int], dtype: torch.dtype) -> str:
    m, n, k = shape
    return f"{op}|{device_key(device)}|{str(dtype).replace('torch.', '')}|M{m_bucket(m)}|N{n}|K{k}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_interleaved(candidates: dict[str, Callable[[], object]], device: torch.device, *,
                        budget_s: float = 0.5, max_rounds: int = 15, min_rounds: int = 3) -> dict[str, float | None]:
    """Median milliseconds of each candidate, timed round-robin (one call of each per round) so
    that a noisy, shared machine slows all of them alike. On CUDA ``triton.testing.do_bench``
    (CUDA events) per candidate. A candidate that raises gets ``None``."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing
        out = {}
        for name, fn in candidates.items():
            try:
                out[name] = float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
            except Exception:
                out[name] = None
        return out
    alive: dict[str, Callable[[], object]] = {}
    first: dict[str, float] = {}
    out: dict[str, float | None] = {}
    for name, fn in candidates.items():  # warm-up call (compiles numba kernels, builds derived weights)
        try:
            fn()
            t0 = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - t0
            alive[name] = fn
        except Exception:
            out[name] = None
    if not alive:
        return out
    per_round = sum(first.values())
    rounds = int(max(min_rounds, min(max_rounds, budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [first[name]] for name in alive}
    for _ in range(rounds - 1):
        for name, fn in alive.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    out.update({name: statistics.median(s) * 1e3 for name, s in samples.items()})
    return out


def choose(op: str, device: torch.device, shape: tuple[int, int, int], dtype: torch.dtype,
           candidates: Callable[[], dict[str, Callable[[], object]]], *,
           measure: Callable[[Callable[[], object]], float] | None = None,
           cache: DispatchCache | None = None, preferred: str = "triton") -> str:
    """Choice for ``op`` at ``shape = (M, N, K)``: cached, else measured and stored. ``measure``
    times one zero-argument callable (default: :func:`measure_interleaved` over all of
    ``candidates()``); a candidate that raises is recorded as failed. Never measures while
    ``torch.compile`` traces (the answer is then ``preferred``)."""
    return choose_entry(op, device, shape, dtype, candidates, measure=measure, cache=cache,
                        preferred=preferred)["choice"]


def choose_entry(op, device, shape, dtype, candidates, *, measure=None, cache=None, preferred="triton") -> dict:
    """:func:`choose` with its record: ``{"choice", "timings_ms", "key", "cached"}``."""
    if torch.compiler.is_compiling():
        return {"choice": preferred, "timings_ms": {}, "key": None, "cached": False}
    device = torch.device(device)
    key = dispatch_key(op, device, shape, dtype)
    cache = cache or default_cache()
    hit = cache.entry(key)
    if hit is not None:
        return {"choice": hit["choice"], "timings_ms": hit.get("timings_ms", {}), "key": key, "cached": True}
    with torch.no_grad():
        fns = candidates()
        if measure is None:
            timings = measure_interleaved(fns, device)
        else:
            timings = {}
            for name, fn in fns.items():
                try:
                    timings[name] = measure(fn)
                except Exception:
                    timings[name] = None
    choice = decide(timings, preferred)
    cache.put(key, choice, timings)
    return {"choice": choice, "timings_ms": timings, "key": key, "cached": False}
