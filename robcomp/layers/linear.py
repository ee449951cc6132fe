"""Compressed replacements for ``nn.Linear``.

Each module stores only the compressed format (as buffers) and computes from it; the number of
bytes in its buffers is the model size the reports quote. Modules keep nn.Linear's attributes
(``in_features``, ``out_features``, ``bias``) and expose the dense equivalent through
``dequantize()`` (and the read-only ``weight`` property) for inspection and references.

The packed weights are frozen: gradients flow to the *input* (what white-box attacks need) and to
the bias, never to the packed weight. Fine-tune masked or fake-quantised dense weights first and
pack at the end.

Backends: ``"torch"`` runs the plain-PyTorch reference (``robcomp.kernels.reference``),
``"triton"`` the Triton kernels, ``"cpu"`` robcomp's CPU kernels (``robcomp.kernels.cpu``) and
``"auto"`` the dispatched path: each layer lists the paths it can run on a device
(:meth:`CompressedLinear.paths`), runs the one ``robcomp.tune`` recorded for the input's device,
dtype and row count, else its static default (:meth:`CompressedLinear.default_path`), and records
what it ran (``last_path``, ``paths_run``). ``forward`` never times anything (``robcomp.layers.dispatch``).

Derived weights a path needs (the tinygemm copy of an int4 weight, bf16 scales, a semi-structured
2:4 weight) are built once per layer on first use, kept as plain attributes (not saved), and
counted in :func:`tensor_bytes` and ``compressed_bytes()``: no hidden memory.
"""
from __future__ import annotations

import abc
import functools
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from robcomp.layers import plans
from robcomp.layers.backend import resolve_backend, triton_available, validate_backend
from robcomp.layers.dispatch import m_bucket
from robcomp.inputs import check_float_input
from robcomp.kernels import reference as ref
from robcomp.recipes import FP8Dynamic, Int4WeightOnly, Int8Dynamic, Int8WeightOnly, Recipe, Sparse24, Sparse24Int4

__all__ = [
    "CompressedLinear",
    "Sparse24Linear",
    "Int8WeightOnlyLinear",
    "Int4WeightOnlyLinear",
    "Int8DynamicLinear",
    "FP8DynamicLinear",
    "Sparse24Int4Linear",
    "tensor_bytes",
    "layer_paths",
]


def tensor_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers plus the derived weights its compressed
    layers built for a fast path (what the model occupies in memory)."""
    tensors = list(module.parameters()) + list(module.buffers())
    derived = sum(m.derived_bytes() for m in module.modules() if isinstance(m, CompressedLinear))
    return sum(t.numel() * t.element_size() for t in tensors) + derived


def layer_paths(model: nn.Module) -> dict[str, dict[str, str]]:
    """``{layer name: {"<dtype>|M<bucket>": path}}``: which path each compressed layer ran, per
    dtype and row bucket, since it was built (what ``rc.evaluate`` records)."""
    return {name: dict(m.paths_run) for name, m in model.named_modules()
            if isinstance(m, CompressedLinear) and m.paths_run}


def _group_incompatibility(linear: nn.Linear, recipe) -> str | None:
    """Why a grouped format (scales per ``group_size`` input columns) cannot take ``linear``."""
    if linear.in_features % recipe.group_size:
        return f"group_size={recipe.group_size} does not divide in_features={linear.in_features}"
    return None


class CompressedLinear(nn.Module, abc.ABC):
    """Base class of the compressed layers: shape bookkeeping, bias, backend dispatch."""

    recipe_type: ClassVar[type[Recipe]]
    #: how the input gradient is computed: "exact" (dY @ W of the stored weight) or
    #: "straight-through" (a rounding step in the forward is treated as the identity)
    gradient: ClassVar[str] = "exact"
    #: buffers that stay float32 through ``model.half()`` / ``.to(dtype)``: the per-channel scales
    #: of the dynamic formats, which the kernels take in fp32 (rounding them to fp16 changes results)
    fp32_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 recipe: Recipe, backend: str = "auto") -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.recipe = recipe
        self.backend = validate_backend(backend)
        if hasattr(recipe, "group_size"):
            self.group_size = recipe.group_size
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone())

    # ------------------------------------------------------------------ construction
    @classmethod
    def incompatibility(cls, linear: nn.Linear, recipe: Recipe) -> str | None:
        """Why ``recipe`` cannot be applied to ``linear`` (None when it can)."""
        return None

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe | None = None, backend: str = "auto") -> "CompressedLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        recipe = cls.recipe_type() if recipe is None else recipe
        if not isinstance(recipe, cls.recipe_type):
            raise TypeError(f"recipe must be a {cls.recipe_type.__name__}, got {type(recipe).__name__}")
        reason = cls.incompatibility(linear, recipe)
        if reason:
            raise ValueError(f"cannot apply {recipe.label()} to Linear({linear.in_features}, "
                             f"{linear.out_features}): {reason}")
        module = cls._build(linear, recipe, backend)
        return module.to(linear.weight.device)

    @classmethod
    def _build(cls, linear: nn.Linear, recipe: Recipe, backend: str) -> "CompressedLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias, recipe, backend)
        for name, tensor in cls.pack(linear.weight.detach(), recipe).items():
            module.register_buffer(name, tensor)
        return module

    @staticmethod
    @abc.abstractmethod
    def pack(weight: torch.Tensor, recipe: Recipe) -> dict[str, torch.Tensor]:
        """The buffers (name -> tensor) that store ``weight`` in this format."""

    def _apply(self, fn, recurse=True):
        """``fn`` moves and converts every tensor; the :attr:`fp32_buffers` follow the device
        only (moved from the float32 originals, so nothing is rounded on the way)."""
        keep = {n: self._buffers[n] for n in self.fp32_buffers if self._buffers.get(n) is not None}
        self.forget_plans()
        super()._apply(fn, recurse)
        for name, original in keep.items():
            self._buffers[name] = original.to(device=self._buffers[name].device, dtype=torch.float32)
        return self

    # ------------------------------------------------------------------ running
    #: paths this format has on CPU / CUDA, beyond "reference" (availability: :meth:`paths`)
    cpu_paths: ClassVar[tuple[str, ...]] = ("native", "dense")
    cuda_paths: ClassVar[tuple[str, ...]] = ("triton", "dense")
    #: paths that give no input gradient; a call that needs one runs ``fallback_path`` instead
    inference_only: ClassVar[frozenset[str]] = frozenset()
    #: per-process run-time state kept in ``__dict__`` (paths, tuned choices, derived weights):
    #: never saved by ``robcomp.save``, rebuilt on use
    transient_attrs: ClassVar[frozenset[str]] = frozenset(
        {"last_path", "_paths_run", "_tuned_paths", "_paths_memo", "_derived", "_bnb_cache", "_plans"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x) is torch.Tensor and not torch.compiler.is_compiling():
            key = plans.signature(x, self._parameters["bias"])
            plan = self.__dict__.get("_plans", _NO_PLANS).get(key)
            if plan is None or not plan.current():
                plan = self._plan(x, key)
            d = self.__dict__  # plain attributes (nn.Module.__setattr__ is slow)
            d["last_path"] = plan.ran
            d["_paths_run"][plan.run_key] = plan.path
            return plan.run(self, x)
        self._check_input(x)
        path = self.select_path(x)
        if not torch.compiler.is_compiling():
            self.paths_run[_run_key(x.dtype, x.numel() // max(x.shape[-1], 1))] = path
        return self.run_path(path, x)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():  # the message only on failure
            check_float_input(x, f"{type(self).__name__}.forward")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected in_features={self.in_features}")

    def _plan(self, x: torch.Tensor, key: tuple) -> plans.Plan:
        """Check ``x``, choose its path as the unplanned ``forward`` does and keep the decision
        (``robcomp.layers.plans``)."""
        self._check_input(x)
        path = self.select_path(x)
        ran = self._effective_path(path, x)
        run, tensors = self._eager_runner(ran, x)
        plan = plans.Plan(path, ran, _run_key(x.dtype, x.numel() // max(x.shape[-1], 1)), run, tensors)
        plans.store(self.__dict__.setdefault("_plans", {}), key, plan)
        self.__dict__.setdefault("_paths_run", {})
        return plan

    def _eager_runner(self, path: str, x: torch.Tensor):
        """``(run(layer, x), buffers it holds views of)``: the prepared batch-1 kernel where the
        format has one for ``path`` and no gradient is recorded, else the path's usual launcher."""
        bias = self._parameters["bias"]
        if (x.device.type == "cpu" and x.numel() > 0 and x.dtype in (torch.float32, torch.bfloat16)
                and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))):
            from robcomp.kernels import cpu

            fn = self.prepared(path, x.numel() // self.in_features) if cpu.available() else None
            if fn is not None:
                return (lambda layer, xi: fn(xi, layer._parameters["bias"])), tuple(self._buffers.values())
        return (lambda layer, xi: layer._run(path, xi)), ()

    def prepared(self, path: str, m: int):
        """``fn(x, bias)``: the forward of ``path`` for ``m``-row CPU inputs without a gradient,
        prepared once (``kernels/cpu_prepared.py``), or None where the format has none."""
        return None

    def forget_plans(self) -> None:
        """Drop the eager call plans (after anything they depend on changed)."""
        self.__dict__.pop("_plans", None)

    def __setattr__(self, name, value):
        self.__dict__.pop("_plans", None)
        super().__setattr__(name, value)

    def register_buffer(self, name, tensor, persistent=True):
        self.__dict__.pop("_plans", None)
        super().register_buffer(name, tensor, persistent)

    @property
    def paths_run(self) -> dict[str, str]:
        return self.__dict__.setdefault("_paths_run", {})

    def select_path(self, x: torch.Tensor) -> str:
        """The path ``forward`` runs for ``x``: fixed by an explicit backend, else the tuned choice
        for (device type, dtype, M bucket), else :meth:`default_path`."""
        backend = resolve_backend(self.backend, x.device)
        if backend == "torch":
            return "reference"
        if backend in ("triton", "bitsandbytes"):
            return backend
        if backend == "cpu":
            if x.device.type != "cpu":
                raise ValueError(f"backend='cpu' runs robcomp's CPU kernels; the input is on {x.device}")
            return "native" if "native" in self.paths(x.device, x.dtype) else "reference"
        if backend != "auto":
            raise ValueError(f"backend {backend!r} is not supported by {type(self).__name__}; "
                             "use 'auto', 'torch', 'cpu' or 'triton'")
        m = x.numel() // max(x.shape[-1], 1)
        path = self.tuned_paths.get((x.device.type, x.dtype, m_bucket(m)))
        if path is None:
            path = self.default_path(x.device, x.dtype, m)
        if torch.compiler.is_compiling() and not self.ready_for(path, x.device):
            return self.traced_fallback(path)  # no derived weight may be built while tracing
        return path

    def traced_fallback(self, path: str) -> str:
        """The path a traced graph runs where ``path`` is not ready (:meth:`ready_for`)."""
        return "reference"

    @property
    def tuned_paths(self) -> dict:
        """``{(device type, dtype, M bucket): path}`` recorded by ``robcomp.tune``."""
        return self.__dict__.setdefault("_tuned_paths", {})

    def paths(self, device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
        """The paths this layer can run on ``device`` for ``dtype`` activations (tune's candidates)."""
        memo = self.__dict__.setdefault("_paths_memo", {})  # shapes and installs do not change
        key = (device.type if isinstance(device, torch.device) else torch.device(device).type, dtype)
        out = memo.get(key)
        if out is None:
            out = memo[key] = self._paths(torch.device(device), dtype)
        return out

    def _paths(self, device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
        if device.type == "cpu":
            from robcomp.kernels import cpu as cpu_kernels
            fast = self.cpu_paths if cpu_kernels.available() and dtype in cpu_kernels.native_dtypes() else ()
            out = tuple(p for p in fast if self.can_run(p, device))
        elif device.type == "cuda":
            out = tuple(p for p in self.cuda_paths if p != "triton" or triton_available())
        else:
            out = ()
        return out + ("reference",)

    def can_run(self, path: str, device: torch.device) -> bool:
        """False where a path exists for the format but not for this layer's shape."""
        return True

    def default_path(self, device: torch.device, dtype: torch.dtype, m: int) -> str:
        """Static choice without a tuned entry: on CPU "bf16_tiles" from the format's
        :attr:`bf16_tiles_from_m` rows (CPUs with fast bf16), else the first of :meth:`paths` (on
        CPU the native kernel where one exists for ``dtype``, on CUDA the Triton kernel)."""
        paths = self.paths(device, dtype)
        return self._cpu_default(paths, m) or paths[0]

    def ready_for(self, path: str, device: torch.device) -> bool:
        """Whether ``path`` can run without building a derived weight first."""
        return True

    def run_path(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """Run ``path`` (one of :data:`robcomp.layers.dispatch.PATHS`) on ``x``, or its fallback
        where the path is inference-only and ``x`` needs a gradient."""
        ran = self._effective_path(path, x)
        if not torch.compiler.is_compiling():
            self.__dict__["last_path"] = ran
        return self._run(ran, x)

    def _effective_path(self, path: str, x: torch.Tensor) -> str:
        if path in self.inference_only and torch.is_grad_enabled() and x.requires_grad:
            return self.fallback_path(x.device)
        return path

    def _run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        if path == "reference":
            return self.forward_reference(x)
        if path == "triton":
            return self.forward_triton(x)
        if path == "bitsandbytes":
            return self.forward_bitsandbytes(x)
        if path == "native":
            if x.device.type != "cpu":
                raise ValueError(f"path 'native' runs robcomp's CPU kernels; the input is on {x.device}")
            return self.forward_cpu(x)
        if path == "dense":
            # in the path's compute dtype (bf16 for weight-only formats on CPU); the CPU unpackers are
            # numba kernels dynamo cannot trace, so a traced graph unpacks with the torch reference
            w = self.dequantize().to(x.dtype) if torch.compiler.is_compiling() else self.dense_weight(x)
            if w.dtype == x.dtype:
                return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
            y = F.linear(x.to(w.dtype), w).to(x.dtype)  # bias added (and its gradient summed) in x's dtype
            return y if self.bias is None else y + self.bias.to(x.dtype)
        method = getattr(self, f"forward_{path}", None)
        if method is None:
            raise ValueError(f"path {path!r} is not available for {type(self).__name__}; "
                             f"it has {self.paths(x.device, x.dtype)}")
        return method(x)

    def fallback_path(self, device: torch.device) -> str:
        return "triton" if device.type == "cuda" and triton_available() else "reference"

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """Forward through robcomp's CPU kernels (``robcomp.kernels.cpu``)."""
        raise ValueError(f"{type(self).__name__} has no CPU kernel")

    #: the smallest M from which ``default_path`` takes "bf16_tiles" on a CPU with fast bf16
    #: (per format, from the CPU benchmark in bench/RESULTS.md); None: never by default
    bf16_tiles_from_m: ClassVar[int | None] = None

    def forward_bf16_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """The weight decoded tile by tile into bf16 for oneDNN's bf16 GEMM (``kernels/bf16_tiles.py``)."""
        if x.device.type != "cpu":
            raise ValueError(f"path 'bf16_tiles' runs robcomp's CPU kernels; the input is on {x.device}")
        from robcomp.kernels import bf16_tiles

        return self.run_bf16_tiles(bf16_tiles, x)

    def run_bf16_tiles(self, tiles, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no 'bf16_tiles' path")

    #: whether "native" has the few-rows GEMVs (kernels/cpu.py ``few_rows``): up to
    #: ``FEW_ROWS_UP_TO`` rows, with x in L1, they beat the bf16 tiles' per-call decode
    few_rows_native: ClassVar[bool] = False

    def _cpu_default(self, paths: tuple[str, ...], m: int) -> str | None:
        """"bf16_tiles" where this format's threshold and the CPU's bf16 speed say so (not where
        the native few-rows GEMVs take these rows), else None."""
        if self.bf16_tiles_from_m is None or m < self.bf16_tiles_from_m or "bf16_tiles" not in paths:
            return None
        if self.few_rows_native:
            from robcomp.kernels import cpu

            if cpu.few_rows(m, self.in_features):
                return None
        from robcomp.kernels import bf16_tiles

        return "bf16_tiles" if bf16_tiles.fast_bf16() else None

    def dense_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The dense weight the "dense" path multiplies with, unpacked for this call."""
        return self.dequantize().to(x.dtype)

    # ------------------------------------------------------------------ derived weights
    def _stamp(self) -> tuple:
        bufs = [b for _, b in sorted(self._buffers.items()) if b is not None]
        return tuple((b.data_ptr(), b._version, b.device) for b in bufs)

    def derived(self, name: str, build) -> object:
        """The derived weight ``name`` (built by ``build()`` once; rebuilt when a buffer changes)."""
        cache = self.__dict__.get("_derived")
        if torch.compiler.is_compiling():  # select_path checked that it exists; never build while tracing
            return cache[name]
        stamp = self._stamp()
        if cache is None or cache.get("stamp") != stamp:
            cache = {"stamp": stamp}
            self.__dict__["_derived"] = cache
        if name not in cache:
            cache[name] = build()
        return cache[name]

    def has_derived(self, name: str) -> bool:
        cache = self.__dict__.get("_derived")
        if torch.compiler.is_compiling():
            return bool(cache) and name in cache
        return bool(cache) and cache.get("stamp") == self._stamp() and name in cache

    def __getstate__(self):
        """Copies and pickles leave the derived weights out; they are rebuilt on use (oneDNN's
        prepacked weight is an opaque tensor that can be neither copied nor pickled)."""
        state = self.__dict__.copy()
        state.pop("_derived", None)
        state.pop("_plans", None)
        return state

    def derived_bytes(self) -> int:
        """Bytes of the derived weights this layer holds now."""
        cache = self.__dict__.get("_derived") or {}
        if cache and cache.get("stamp") != self._stamp():  # stale: a packed buffer changed or moved
            self.__dict__.pop("_derived", None)
            return 0
        total = 0
        for key, value in cache.items():
            if key == "stamp":
                continue
            tensors = value.values() if isinstance(value, dict) else [value]
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    total += _storage_bytes(t)
            if isinstance(value, dict):  # what an opaque object in it (fbgemm's packed params) holds
                total += int(value.get("opaque_bytes", 0))
        return total

    def forward_bitsandbytes(self, x: torch.Tensor) -> torch.Tensor:
        """Forward through bitsandbytes' layers, for the formats it has."""
        raise ValueError(f"backend 'bitsandbytes' is not supported by {type(self).__name__}; "
                         "it exists for Int8WeightOnly and Int4WeightOnly")

    @abc.abstractmethod
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Forward through the plain-PyTorch reference (differentiable w.r.t. ``x``)."""

    @abc.abstractmethod
    def forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        """Forward through the Triton kernels (with their input-gradient kernels)."""

    # ------------------------------------------------------------------ inspection
    @abc.abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight this layer computes with."""

    @property
    def weight(self) -> torch.Tensor:
        """Dense equivalent of the packed weight (a detached copy: packed weights are frozen)."""
        return self.dequantize().detach()

    def compressed_bytes(self) -> int:
        """Bytes of the stored format plus the derived weights held now."""
        return tensor_bytes(self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, recipe={self.recipe.label()}, backend={self.backend}")


@functools.lru_cache(maxsize=4096)
def _run_key(dtype: torch.dtype, m: int) -> str:
    """``paths_run``'s key, e.g. ``"float32|M16"`` (cached: formatting it cost more than a small kernel)."""
    return f"{str(dtype).replace('torch.', '')}|M{m_bucket(m)}"


_NO_PLANS: dict = {}


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor, including a semi-structured sparse one (its packed parts)."""
    parts = [getattr(t, a, None) for a in ("packed", "meta")] if not type(t) is torch.Tensor else []
    parts = [p for p in parts if isinstance(p, torch.Tensor)]
    if parts:
        return sum(p.numel() * p.element_size() for p in parts)
    return t.numel() * t.element_size()


class Sparse24Linear(CompressedLinear):
    """2:4 sparse weight: ``values [N, K/2]`` + 2-bit ``meta`` (format in kernels/reference.py)."""

    recipe_type = Sparse24

    @classmethod
    def incompatibility(cls, linear, recipe):
        if linear.in_features % 4:
            return f"2:4 sparsity needs in_features divisible by 4, got {linear.in_features}"
        return None

    @staticmethod
    def pack(weight, recipe):
        values, meta = ref.sparse24_pack(weight)
        return {"values": values, "meta": meta}

    def forward_reference(self, x):
        return ref.sparse24_linear(x, self.values, self.meta, self.bias)

    cuda_paths = ("triton", "semi_structured", "dense")
    inference_only = frozenset({"semi_structured"})

    def forward_triton(self, x):
        # imported here: triton is only needed by this backend (custom op robcomp::sparse24_linear)
        from robcomp.kernels import sparse24 as kernels

        return kernels.sparse24_linear(x, self.values, self.meta, self.bias)

    def forward_cpu(self, x):
        from robcomp.kernels import cpu

        return cpu.sparse24_linear(x, self.values, self.meta, self.bias)

    def prepared(self, path, m):
        if path != "native" or m != 1:
            return None
        from robcomp.kernels import cpu_prepared

        return cpu_prepared.sparse24(self.values, self.meta, self.bias)

    def forward_semi_structured(self, x):
        """torch semi-structured sparse (cuSPARSELt/CUTLASS, fp16/bf16 CUDA, inference only) on a
        derived copy of the weight, counted in the layer's bytes."""
        from torch.sparse import to_sparse_semi_structured

        w = self.derived(f"semi_structured_{x.dtype}", lambda: to_sparse_semi_structured(self.dequantize().to(x.dtype)))
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    cpu_paths = ("native", "dense", "bf16_tiles")
    bf16_tiles_from_m = 64
    few_rows_native = True

    def can_run(self, path, device):
        # bf16 tiles round the kept values: only offered where they are stored in bf16 already,
        # so a float32 2:4 layer keeps its float32 precision on every path
        return path != "bf16_tiles" or self.values.dtype == torch.bfloat16

    def default_path(self, device, dtype, m):
        # CPU: the numba kernels (half the bytes, blocked over rows) win up to a few dozen rows; far
        # above, a GEMM on the unpacked weight (bf16 tiles where bf16 is fast; bench/RESULTS.md)
        paths = self.paths(device, dtype)
        tiles = self._cpu_default(paths, m)
        if tiles:
            return tiles
        if torch.device(device).type == "cpu" and m > 128 and "dense" in paths:
            return "dense"
        return paths[0]

    def run_bf16_tiles(self, tiles, x):
        return tiles.sparse24_linear(x, self.values, self.meta, self.bias)

    def dense_weight(self, x):
        if x.device.type == "cpu" and "native" in self.paths(x.device, x.dtype):
            from robcomp.kernels import cpu

            w = cpu.dense_weight("sparse24", self.values, self.meta)
            return w if x.dtype == torch.float32 else w.to(x.dtype)
        return self.dequantize().to(x.dtype)

    def dequantize(self):
        return ref.sparse24_unpack(self.values, self.meta, self.in_features)


class Int8WeightOnlyLinear(CompressedLinear):
    """int8 weight, symmetric per output channel; floating-point activations (W8A16).

    ``backend="bitsandbytes"`` runs bitsandbytes' ``Linear8bitLt`` (CUDA only; its int8 format is
    the same row-wise absmax int8, so the codes are identical; ``threshold=0``, no outliers).
    """

    recipe_type = Int8WeightOnly

    @staticmethod
    def pack(weight, recipe):
        qweight, scale = ref.int8_weight_pack(weight)
        return {"qweight": qweight, "scale": scale}

    def forward_bitsandbytes(self, x):
        return _bnb_forward(self, x, "int8")

    def forward_reference(self, x):
        return ref.int8_weight_linear(x, self.qweight, self.scale, self.bias)

    def forward_triton(self, x):
        from robcomp.kernels import lowbit

        return lowbit.int8_weight_linear(x, self.qweight, self.scale, self.bias)

    # "numba_fp32": numba GEMV with fp32 activations, the fastest at M <= 2 (kernels/cpu.py)
    cpu_paths = ("native", "dense", "numba_fp32", "bf16_tiles")
    bf16_tiles_from_m = 16

    def can_run(self, path, device):
        # torch 2.13's _weight_int8pack_mm reads out of bounds (segfaults) for K % 16 != 0 at M > 1
        return path != "native" or self.in_features % 16 == 0

    def default_path(self, device, dtype, m):
        paths = self.paths(device, dtype)
        if m <= 2 and "numba_fp32" in paths:
            return "numba_fp32"
        return self._cpu_default(paths, m) or paths[0]

    def run_bf16_tiles(self, tiles, x):
        return tiles.int8_weight_linear(x, self.qweight, self.scale, self.bias)

    def forward_numba_fp32(self, x):
        from robcomp.kernels import cpu

        if x.device.type != "cpu":
            raise ValueError(f"path 'numba_fp32' runs robcomp's CPU kernels; the input is on {x.device}")
        return cpu.int8_weight_linear_fp32(x, self.qweight, self.scale, self.bias)

    def prepared(self, path, m):
        from robcomp.kernels import cpu, cpu_prepared

        if path == "numba_fp32" and m == 1:
            return cpu_prepared.int8_weight(self.qweight, self.scale, self.bias)
        if path == "native" and self.can_run("native", torch.device("cpu")):
            return cpu_prepared.int8_pack(self.qweight, self.derived("cpu_int8", lambda: cpu.derived_int8(self.scale)))
        return None

    def forward_cpu(self, x):
        from robcomp.kernels import cpu

        d = self.derived("cpu_int8", lambda: cpu.derived_int8(self.scale))
        return cpu.int8_weight_linear(x, self.qweight, self.scale, self.bias, d)

    def ready_for(self, path, device):
        return path != "native" or self.has_derived("cpu_int8")

    def dense_weight(self, x):
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            from robcomp.kernels import cpu

            if cpu.available():
                return cpu.dense_weight("int8", self.qweight, self.scale)  # bf16, as the native kernel
        return self.dequantize().to(x.dtype)

    def dequantize(self):
        return ref.int8_weight_unpack(self.qweight, self.scale)


class Int4WeightOnlyLinear(CompressedLinear):
    """int4 weight, asymmetric per group along in_features, two values per byte (W4A16).

    ``backend="bitsandbytes"`` runs bitsandbytes' ``Linear4bit`` (CUDA only) on this layer's
    dequantised weight re-quantised to bitsandbytes' own 4-bit format: ``bnb_quant_type`` "nf4"
    (default) or "fp4", blocks of 64 with absmax scales. That is a second rounding, so its outputs
    differ from the robcomp int4 format's: it is a baseline, not the same model.
    """

    recipe_type = Int4WeightOnly
    #: bitsandbytes 4-bit data type used by backend="bitsandbytes": "nf4" or "fp4"
    bnb_quant_type: str = "nf4"

    def forward_bitsandbytes(self, x):
        return _bnb_forward(self, x, "4bit")

    @classmethod
    def incompatibility(cls, linear, recipe):
        return _group_incompatibility(linear, recipe)

    @staticmethod
    def pack(weight, recipe):
        qweight, scales, zeros = ref.int4_pack(weight, recipe.group_size)
        return {"qweight": qweight, "scales": scales, "zeros": zeros}

    def forward_reference(self, x):
        return ref.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def forward_triton(self, x):
        from robcomp.kernels import lowbit

        return lowbit.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    cpu_paths = ("native", "dense", "bf16_tiles")
    bf16_tiles_from_m = 64

    def can_run(self, path, device):
        # tinygemm's CPU kernel takes N divisible by 16 and groups of 32..256
        return path != "native" or (self.out_features % 16 == 0 and self.group_size in (32, 64, 128, 256))

    def run_bf16_tiles(self, tiles, x):
        return tiles.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def forward_cpu(self, x):
        from robcomp.kernels import cpu

        d = self.derived("cpu_int4", lambda: cpu.derived_int4(self.qweight, self.scales, self.zeros, self.group_size))
        if d is None:
            return self.forward_reference(x)
        return cpu.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias, d)

    def prepared(self, path, m):
        if path != "native":
            return None
        from robcomp.kernels import cpu, cpu_prepared

        d = self.derived("cpu_int4", lambda: cpu.derived_int4(self.qweight, self.scales, self.zeros, self.group_size))
        return None if d is None else cpu_prepared.int4_tinygemm(d, self.group_size, self.out_features, self.in_features)

    def ready_for(self, path, device):
        return path != "native" or self.has_derived("cpu_int4")

    def dense_weight(self, x):
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            from robcomp.kernels import cpu

            if cpu.available():
                return cpu.dense_weight("int4", self.qweight, self.scales, self.zeros, group_size=self.group_size)
        return self.dequantize().to(x.dtype)

    def dequantize(self):
        return ref.int4_unpack(self.qweight, self.scales, self.zeros, self.group_size)




class _DynamicActivationLinear(CompressedLinear):
    """A weight with a float32 scale per channel whose activations are quantised per token at run
    time; the input gradient is the straight-through estimator ``dX = dY @ dequant(W)``, the
    activation rounding counted as the identity (``gradient``)."""

    gradient: ClassVar[str] = "straight-through"
    fp32_buffers = ("scale",)

    def _vendor_matmul(self, x, quantize_rows, matmul):
        """``matmul(xq, qweight.T, xs, scale)`` on the reference's per-token codes ``xq, xs =
        quantize_rows(x)``, run by a vendor kernel (``torch._int_mm``, ``torch._scaled_mm``); STE."""
        def fn(xd):
            xq, xs = quantize_rows(xd.reshape(-1, self.in_features))
            y = matmul(xq, self.qweight.t(), xs, self.scale, xd.dtype)
            return y.to(xd.dtype).reshape(*xd.shape[:-1], self.out_features)
        return ref._StraightThrough.apply(x, self.dequantize(), self.bias, fn)


class Int8DynamicLinear(_DynamicActivationLinear):
    """W8A8: int8 weight (per channel, float32 scale) and int8 activations quantised per token at
    run time; int8 x int8 -> int32 dot; straight-through input gradient."""

    recipe_type = Int8Dynamic

    @staticmethod
    def pack(weight, recipe):
        qweight, scale = ref.int8_dynamic_pack(weight)
        return {"qweight": qweight, "scale": scale}

    def forward_reference(self, x):
        return ref.int8_dynamic_linear(x, self.qweight, self.scale.float(), self.bias)

    def forward_triton(self, x):
        from robcomp.kernels import lowbit

        return lowbit.int8_dynamic_linear(x, self.qweight, self.scale.float().contiguous(), self.bias)

    # "dense" would drop the activation rounding, so it is no path of this format
    # "fbgemm" / "onednn": the same int8 x int8 -> int32 product by fbgemm's or oneDNN's u8 x s8
    #   GEMM on a prepacked copy (counted in the layer's bytes), where exact (VNNI);
    # "native": torch._int_mm; "numba_int8": a numba GEMV, one row of x per pass over the weight
    cpu_paths = ("onednn", "fbgemm", "native", "numba_int8")
    cuda_paths = ("triton", "int_mm")
    #: rows up to which the numba GEMV is the default (it streams a weight beyond the cache
    #: fastest at one row: 14336x4096 2.1 ms against fbgemm's 3.0 and oneDNN's 4.3)
    gemv_up_to_m: ClassVar[int] = 1
    #: rows up to which fbgemm is the default above that, for weights of at least
    #: :attr:`fbgemm_from_weights`: its kernel wins at few rows (4096x4096, M = 4: 0.64 ms
    #: against oneDNN's 1.0 and the GEMV's 2.2); from 16 rows the two are level and oneDNN's
    #: blocked GEMM wins from a few dozen, so a layer run at every M does not hold both copies
    fbgemm_up_to_m: ClassVar[int] = 8
    fbgemm_from_weights: ClassVar[int] = 1 << 20
    #: weights (N x K) from which oneDNN is the default above that: below, the weight is cache
    #: resident and oneDNN's fixed cost per call (~0.1-0.3 ms) loses to torch._int_mm
    onednn_from_weights: ClassVar[int] = 1 << 22

    def can_run(self, path, device):
        from robcomp.kernels import cpu_int8_gemm

        if path == "onednn":
            return cpu_int8_gemm.onednn_int8()
        if path == "fbgemm":
            return cpu_int8_gemm.fbgemm_int8()
        return True

    def forward_cpu(self, x):
        from robcomp.kernels import cpu

        return cpu.int8_dynamic_linear(x, self.qweight, self.scale, self.bias)

    def forward_onednn(self, x):
        from robcomp.kernels import cpu_int8_gemm

        if x.device.type != "cpu":
            raise ValueError(f"path 'onednn' runs oneDNN's CPU int8 GEMM; the input is on {x.device}")
        d = self.derived("cpu_onednn_int8", lambda: cpu_int8_gemm.derived_int8_onednn(self.qweight))
        return cpu_int8_gemm.int8_dynamic_linear_onednn(x, self.qweight, self.scale, self.bias, d)

    def forward_fbgemm(self, x):
        from robcomp.kernels import cpu_int8_gemm

        if x.device.type != "cpu":
            raise ValueError(f"path 'fbgemm' runs fbgemm's CPU int8 GEMM; the input is on {x.device}")
        d = self.derived("cpu_fbgemm_int8", lambda: cpu_int8_gemm.derived_int8_fbgemm(self.qweight, self.scale))
        return cpu_int8_gemm.int8_dynamic_linear_fbgemm(x, self.qweight, self.scale, self.bias, d)

    def ready_for(self, path, device):
        if path == "fbgemm":  # its packed params are a TorchScript object, which the tracer does not take
            return not torch.compiler.is_compiling() and self.has_derived("cpu_fbgemm_int8")
        return path != "onednn" or self.has_derived("cpu_onednn_int8")

    def traced_fallback(self, path):
        # torch._int_mm: the same exact product, traceable, with no derived weight
        return "native" if path in ("fbgemm", "onednn") else "reference"

    def default_path(self, device, dtype, m):
        """The numba GEMV up to :attr:`gemv_up_to_m` rows, fbgemm up to :attr:`fbgemm_up_to_m`
        for weights from :attr:`fbgemm_from_weights`, then oneDNN for large weights, else
        ``torch._int_mm`` (bench/RESULTS.md, CPU section; ``robcomp.tune`` measures instead)."""
        paths = self.paths(device, dtype)
        if torch.device(device).type != "cpu":
            return paths[0]
        weights = self.in_features * self.out_features
        if m <= self.gemv_up_to_m and "numba_int8" in paths:
            return "numba_int8"
        if m <= self.fbgemm_up_to_m and weights >= self.fbgemm_from_weights and "fbgemm" in paths:
            return "fbgemm"
        if weights >= self.onednn_from_weights and "onednn" in paths:
            return "onednn"
        return next(p for p in paths if p not in ("onednn", "fbgemm"))

    def forward_numba_int8(self, x):
        from robcomp.kernels import cpu

        if x.device.type != "cpu":
            raise ValueError(f"path 'numba_int8' runs robcomp's CPU kernels; the input is on {x.device}")
        return cpu.int8_dynamic_linear_gemv(x, self.qweight, self.scale, self.bias)

    def prepared(self, path, m):
        from robcomp.kernels import cpu_int8_gemm, cpu_prepared

        n, k = self.out_features, self.in_features
        if path == "fbgemm" and self.can_run(path, torch.device("cpu")):
            d = self.derived("cpu_fbgemm_int8", lambda: cpu_int8_gemm.derived_int8_fbgemm(self.qweight, self.scale))
            return cpu_prepared.int8_engine(cpu_int8_gemm.fbgemm_parts(d), n, k)
        if path == "onednn" and self.can_run(path, torch.device("cpu")):
            d = self.derived("cpu_onednn_int8", lambda: cpu_int8_gemm.derived_int8_onednn(self.qweight))
            return cpu_prepared.int8_engine(cpu_int8_gemm.onednn_parts(d, self.scale), n, k)
        if path != "numba_int8" or m != 1:
            return None
        return cpu_prepared.int8_dynamic(self.qweight, self.scale, self.bias)

    def forward_int_mm(self, x):
        """``torch._int_mm`` (cuBLASLt int8) on the reference's per-token int8 activations; STE."""
        return self._vendor_matmul(x, ref.quantize_rows_int8, lambda xq, wt, xs, s, _dtype:
                                   torch._int_mm(xq, wt).to(torch.float32) * xs[:, None] * s[None, :])

    def dequantize(self):
        return ref.int8_dynamic_unpack(self.qweight, self.scale.float())


class FP8DynamicLinear(_DynamicActivationLinear):
    """FP8 (e4m3) weight per channel and e4m3 activations per token. ``backend="triton"`` needs a
    CUDA GPU with compute capability >= 8.9 and raises ``ValueError`` elsewhere; ``backend="torch"``
    emulates e4m3 with ``torch.float8_e4m3fn`` casts (CPU included). The codes are stored as raw
    ``uint8`` bits (``qweight_bits``) so that ``model.half()`` cannot convert them. STE gradient."""

    recipe_type = FP8Dynamic

    @staticmethod
    def pack(weight, recipe):
        qweight, scale = ref.fp8_dynamic_pack(weight)
        return {"qweight_bits": qweight.view(torch.uint8), "scale": scale}

    @property
    def qweight(self) -> torch.Tensor:
        return self.qweight_bits.view(torch.float8_e4m3fn)

    def forward_reference(self, x):
        return ref.fp8_dynamic_linear(x, self.qweight, self.scale.float(), self.bias)

    def forward_triton(self, x):
        from robcomp.kernels import lowbit

        return lowbit.fp8_dynamic_linear(x, self.qweight, self.scale.float().contiguous(), self.bias)

    cpu_paths = ("native", "bf16_tiles")
    cuda_paths = ("triton", "scaled_mm")
    bf16_tiles_from_m = 2
    few_rows_native = True

    def _nan_codes(self) -> bool:
        from robcomp.kernels import bf16_tiles

        return self.derived("fp8_nan_codes", lambda: bf16_tiles.fp8_has_nan(self.qweight_bits))

    def forward_cpu(self, x):
        from robcomp.kernels import cpu

        return cpu.fp8_dynamic_linear(x, self.qweight, self.scale, self.bias, nan_codes=self._nan_codes())

    def prepared(self, path, m):
        if path != "native" or m != 1 or self._nan_codes():
            return None
        from robcomp.kernels import cpu_prepared

        return cpu_prepared.fp8_dynamic(self.qweight_bits, self.scale, self.bias)

    def run_bf16_tiles(self, tiles, x):
        if self._nan_codes():  # the tile decoder does not map NaN codes
            return self.forward_cpu(x)
        return tiles.fp8_dynamic_linear(x, self.qweight, self.scale, self.bias)

    def ready_for(self, path, device):
        return path not in ("native", "bf16_tiles") or self.has_derived("fp8_nan_codes")

    def forward_scaled_mm(self, x):
        """``torch._scaled_mm`` (FP8 tensor cores, row-wise scales) on the reference's per-token
        e4m3 activations; STE gradient."""
        return self._vendor_matmul(x, ref.quantize_rows_fp8, lambda xq, wt, xs, s, dtype: torch._scaled_mm(
            xq, wt, scale_a=xs[:, None].contiguous(), scale_b=s[None, :].contiguous(),
            out_dtype=torch.bfloat16 if dtype == torch.float32 else dtype))

    def dequantize(self):
        return ref.fp8_dynamic_unpack(self.qweight, self.scale.float())


class Sparse24Int4Linear(CompressedLinear):
    """2:4 sparse weight whose kept values are int4 per group (format in kernels/sparse24_lowbit.py):
    ``qvalues uint8 [N, K/4]``, ``scales``/``zeros [N, K/group_size]``, 2:4 ``meta``. Exact gradient."""

    recipe_type = Sparse24Int4

    @classmethod
    def incompatibility(cls, linear, recipe):
        return _group_incompatibility(linear, recipe)

    @staticmethod
    def pack(weight, recipe):
        qvalues, scales, zeros, meta = ref.sparse24_int4_pack(weight, recipe.group_size)
        return {"qvalues": qvalues, "scales": scales, "zeros": zeros, "meta": meta}

    def forward_reference(self, x):
        return ref.sparse24_int4_linear(x, self.qvalues, self.scales, self.zeros, self.meta, self.group_size, self.bias)

    def forward_triton(self, x):
        from robcomp.kernels import sparse24_lowbit

        return sparse24_lowbit.sparse24_int4_linear(x, self.qvalues, self.scales, self.zeros, self.meta,
                                                   self.group_size, self.bias)

    def forward_cpu(self, x):
        from robcomp.kernels import cpu

        return cpu.sparse24_int4_linear(x, self.qvalues, self.scales, self.zeros, self.meta, self.group_size, self.bias)

    def prepared(self, path, m):
        if path != "native" or m != 1:
            return None
        from robcomp.kernels import cpu_prepared

        return cpu_prepared.sparse24_int4(self.qvalues, self.scales, self.zeros, self.meta, self.group_size, self.bias)

    cpu_paths = ("native", "dense", "bf16_tiles")
    bf16_tiles_from_m = 4
    few_rows_native = True
    default_path = Sparse24Linear.default_path

    def run_bf16_tiles(self, tiles, x):
        return tiles.sparse24_int4_linear(x, self.qvalues, self.scales, self.zeros, self.meta, self.group_size,
                                          self.bias)

    def dense_weight(self, x):
        if x.device.type == "cpu" and "native" in self.paths(x.device, x.dtype):
            from robcomp.kernels import cpu

            w = cpu.dense_weight("sparse24_int4", self.qvalues, self.scales, self.zeros, self.meta,
                                 group_size=self.group_size)
            return w if x.dtype == torch.float32 else w.to(x.dtype)
        return self.dequantize().to(x.dtype)

    def dequantize(self):
        return ref.sparse24_int4_unpack(self.qvalues, self.scales, self.zeros, self.meta, self.group_size)


# ---------------------------------------------------------------------- bitsandbytes backend
def _bnb_module(layer: CompressedLinear, kind: str, device: torch.device) -> nn.Module:
    """bitsandbytes layer for ``layer``'s weight, built once per device (not a registered submodule,
    so it is neither saved nor counted in the model size)."""
    cached = layer.__dict__.get("_bnb_cache")
    if cached is not None and cached[0] == (device, kind, getattr(layer, "bnb_quant_type", None)):
        return cached[1]
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"backend='bitsandbytes' for {type(layer).__name__} needs a CUDA device (bitsandbytes' "
                         f"Linear8bitLt / Linear4bit GPU kernels); the input is on {device}. "
                         "Use backend='torch' or backend='triton' instead.")
    try:
        import bitsandbytes as bnb
    except Exception as e:  # pragma: no cover - depends on the installation
        raise RuntimeError(f"backend='bitsandbytes' is unavailable: cannot import bitsandbytes ({e})") from e
    w = layer.dequantize().detach().to(torch.float16).cpu()
    if kind == "int8":
        mod = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=False,
                                  has_fp16_weights=False, threshold=0.0)
        mod.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        qt = layer.bnb_quant_type
        if qt not in ("nf4", "fp4"):
            raise ValueError(f"bnb_quant_type must be 'nf4' or 'fp4', got {qt!r}")
        mod = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False,
                                compute_dtype=torch.float16, quant_type=qt)
        mod.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=qt)
    mod = mod.to(device)  # bitsandbytes quantises on the move to the GPU
    layer.__dict__["_bnb_cache"] = ((device, kind, getattr(layer, "bnb_quant_type", None)), mod)
    return mod


def _bnb_forward(layer: CompressedLinear, x: torch.Tensor, kind: str) -> torch.Tensor:
    mod = _bnb_module(layer, kind, x.device)
    y = mod(x.to(torch.float16)).to(x.dtype)
    if x.requires_grad and torch.is_grad_enabled() and y.grad_fn is None:
        raise RuntimeError(f"bitsandbytes' {type(mod).__name__} gave no gradient w.r.t. its input; white-box "
                           "attacks need one: use backend='triton' or 'torch'")
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y
