"""Per-shape choice between the implementations of a compressed matmul, from measured timings.

A 2:4 Triton kernel wins where the matmul is memory-bound (small M) and can lose where it is
compute-bound; PyTorch's semi-structured sparse path (cuSPARSELt/CUTLASS) and plain dense cuBLAS
win elsewhere. So that a compressed layer is never slower than the dense layer it replaced, the
layer times the candidates once per (device, versions, dtype, M bucket, N, K), keeps the fastest
and caches the decision:

* in memory, per process, and
* on disk in ``<cache dir>/dispatch.json`` (``$ROBCOMP_CACHE_DIR``, else ``~/.cache/robcomp``),
  replaced atomically, so later processes skip the measurement. The key carries the device name,
  compute capability and torch/triton versions: a decision is never reused on other hardware or
  software.

Candidates (:func:`sparse24_forward_dispatch`): ``"triton"`` (the packed kernel), ``"semi_structured"``
(``torch.sparse.to_sparse_semi_structured``, where it runs, inference only) and ``"dense"``.
The dense and semi-structured weights are *caches* rebuilt from the packed weight on the GPU when
(and only when) the dispatch picks them. They are plain attributes, not buffers: they are not
saved, not counted in the model size (``tensor_bytes``), and are dropped if the packed weight
changes. On CPU and under the Triton interpreter the dispatch is trivially the kernel, and under
``torch.compile`` tracing it is the kernel too (no timing or file I/O while tracing).

The decision rule (:func:`decide`) is a pure function of the timings, unit-tested with injected
timings; :func:`choose` takes the measuring function as an argument for the same reason.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

__all__ = ["cache_dir", "m_bucket", "decide", "DispatchCache", "choose", "sparse24_forward_dispatch",
           "CANDIDATES"]

CANDIDATES = ("triton", "semi_structured", "dense")
CACHE_FILE = "dispatch.json"


def cache_dir() -> Path:
    """``$ROBCOMP_CACHE_DIR`` if set, else ``~/.cache/robcomp`` (created on first write)."""
    env = os.environ.get("ROBCOMP_CACHE_DIR", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "robcomp"


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

    def get(self, key: str) -> str | None:
        entry = self._load().get(key)
        choice = entry.get("choice") if isinstance(entry, dict) else None
        return choice if choice in CANDIDATES else None

    def put(self, key: str, choice: str, timings: dict) -> None:
        with self._lock:
            data = self._load()
            data[key] = {"choice": choice, "timings_ms": {k: (None if v is None or not math.isfinite(v) else v)
                                                          for k, v in timings.items()}}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".dispatch-", suffix=".json")
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError:
                pass  # a read-only cache dir costs a re-measurement next process, nothing else


_DEFAULT_CACHE: DispatchCache | None = None


def _default_cache() -> DispatchCache:
    global _DEFAULT_CACHE
    path = cache_dir() / CACHE_FILE
    if _DEFAULT_CACHE is None or _DEFAULT_CACHE.path != path:
        _DEFAULT_CACHE = DispatchCache(path)
    return _DEFAULT_CACHE


def device_key(device: torch.device) -> str:
    import triton
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cc = "%d.%d" % torch.cuda.get_device_capability(device)
    else:
        name, cc = device.type, "-"
    return f"{name}|cc{cc}|torch {torch.__version__}|triton {triton.__version__}"


def _do_bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def choose(op: str, device: torch.device, shape: tuple[int, int, int], dtype: torch.dtype,
           candidates: Callable[[], dict[str, Callable[[], object]]], *,
           measure: Callable[[Callable[[], object]], float] | None = None,
           cache: DispatchCache | None = None, preferred: str = "triton") -> str:
    """Choice for ``op`` at ``shape = (M, N, K)``: cached, else measured with ``measure`` (default
    ``triton.testing.do_bench`` median) over ``candidates()`` (name -> zero-argument callable) and
    stored. A candidate that raises is recorded as failed. Off CUDA, or while ``torch.compile``
    traces, the answer is ``preferred`` without measuring."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return preferred
    m, n, k = shape
    key = f"{op}|{device_key(device)}|{str(dtype).replace('torch.', '')}|M{m_bucket(m)}|N{n}|K{k}"
    cache = cache or _default_cache()
    hit = cache.get(key)
    if hit is not None:
        return hit
    measure = measure or _do_bench_ms
    timings: dict[str, float | None] = {}
    with torch.no_grad():
        for name, fn in candidates().items():
            try:
                timings[name] = measure(fn)
            except Exception:
                timings[name] = None
    choice = decide(timings, preferred)
    cache.put(key, choice, timings)
    return choice


# ------------------------------------------------------------------------------------ 2:4 layer
def _weight_caches(layer) -> dict:
    """Per-layer dict of derived weights, reset when the packed weight changes."""
    stamp = (layer.values.data_ptr(), layer.values._version, layer.meta._version, layer.values.device)
    caches = layer.__dict__.get("_dispatch_caches")
    if caches is None or caches.get("stamp") != stamp:
        caches = {"stamp": stamp}
        layer.__dict__["_dispatch_caches"] = caches
    return caches


def _dense_weight(layer, dtype):
    caches = _weight_caches(layer)
    key = ("dense", dtype)
    if key not in caches:
        from robcomp.kernels import reference as ref
        caches[key] = ref.sparse24_unpack(layer.values, layer.meta, layer.in_features).to(dtype).detach()
    return caches[key]


def _semi_structured_weight(layer, dtype):
    caches = _weight_caches(layer)
    key = ("semi", dtype)
    if key not in caches:
        from torch.sparse import to_sparse_semi_structured
        caches[key] = to_sparse_semi_structured(_dense_weight(layer, dtype))
    return caches[key]


def _keep_only(layer, choice: str, dtype) -> None:
    """Drop the derived weights that measuring built but no decision of this layer uses (a layer
    called at several shapes keeps every weight one of its shapes was routed to)."""
    caches = layer.__dict__.get("_dispatch_caches")
    if not caches:
        return
    needed = caches.setdefault("needed", set())
    key = {"dense": ("dense", dtype), "semi_structured": ("semi", dtype)}.get(choice)
    if key is not None:
        needed.add(key)
    for k in [k for k in caches if k not in ("stamp", "needed") and k not in needed]:
        del caches[k]


def sparse24_forward_dispatch(layer, x: torch.Tensor, kernels) -> torch.Tensor:
    """Forward of a :class:`robcomp.nn.Sparse24Linear` through the fastest path for this shape."""
    import torch.nn.functional as F

    if x.device.type != "cuda" or torch.compiler.is_compiling():
        return kernels.sparse24_linear(x, layer.values, layer.meta, layer.bias)
    m = x.numel() // max(x.shape[-1], 1)
    n, k = layer.out_features, layer.in_features
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    bias = None if layer.bias is None else layer.bias.to(x.dtype)

    def candidates():
        xs = torch.randn(m, k, device=x.device, dtype=x.dtype)
        b = None if bias is None else bias.detach()
        c = {"triton": lambda: kernels.sparse24_forward(xs, layer.values, layer.meta, b),
             "dense": (lambda w=_dense_weight(layer, x.dtype): F.linear(xs, w, b))}
        if not needs_grad and x.dtype in (torch.float16, torch.bfloat16):
            try:
                ws = _semi_structured_weight(layer, x.dtype)
                c["semi_structured"] = lambda: F.linear(xs, ws, b)
            except Exception:
                pass
        return c

    choice = choose("sparse24_linear", x.device, (m, n, k), x.dtype, candidates)
    _keep_only(layer, choice, x.dtype)
    if choice == "dense":
        return F.linear(x, _dense_weight(layer, x.dtype), bias)
    if choice == "semi_structured" and not needs_grad:
        try:
            return F.linear(x, _semi_structured_weight(layer, x.dtype), bias)
        except Exception:
            pass
    return kernels.sparse24_linear(x, layer.values, layer.meta, layer.bias)
