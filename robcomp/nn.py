"""Compressed replacements for ``nn.Linear``.

Each module stores only the compressed format (as buffers) and computes from it; the number of
bytes in its buffers is the model size the reports quote. Modules keep nn.Linear's attributes
(``in_features``, ``out_features``, ``bias``) and expose the dense equivalent through
``dequantize()`` (and the read-only ``weight`` property) for inspection and references.

The packed weights are frozen: gradients flow to the *input* (what white-box attacks need) and to
the bias, never to the packed weight. Fine-tune masked or fake-quantised dense weights first and
pack at the end.

Backends: ``"torch"`` runs the plain-PyTorch reference (``robcomp.kernels.reference``),
``"triton"`` the Triton kernels, ``"auto"`` picks per input device (see ``robcomp.backend``).
"""
from __future__ import annotations

import abc
from typing import ClassVar

import torch
import torch.nn as nn

from robcomp.backend import resolve_backend, validate_backend
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
    "LAYER_TYPES",
    "register_layer",
    "tensor_bytes",
]


def tensor_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (what a saved model would occupy)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class CompressedLinear(nn.Module, abc.ABC):
    """Base class of the compressed layers: shape bookkeeping, bias, backend dispatch."""

    recipe_type: ClassVar[type[Recipe]]
    #: how the input gradient is computed: "exact" (dY @ W of the stored weight) or
    #: "straight-through" (a rounding step in the forward is treated as the identity)
    gradient: ClassVar[str] = "exact"

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

    # ------------------------------------------------------------------ running
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_input(x, f"{type(self).__name__}.forward")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected in_features={self.in_features}")
        backend = resolve_backend(self.backend, x.device)
        if backend == "torch":
            return self.forward_reference(x)
        if backend == "triton":
            return self.forward_triton(x)
        if backend == "bitsandbytes":
            return self.forward_bitsandbytes(x)
        raise ValueError(f"backend {backend!r} is not supported by {type(self).__name__}; use 'torch' or 'triton'")

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
        return tensor_bytes(self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, recipe={self.recipe.label()}, backend={self.backend}")


LAYER_TYPES: dict[type[Recipe], type[CompressedLinear]] = {}


def register_layer(cls: type[CompressedLinear]) -> type[CompressedLinear]:
    """Class decorator: make ``compress`` use ``cls`` for its recipe type."""
    LAYER_TYPES[cls.recipe_type] = cls
    return cls


@register_layer
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

    def forward_triton(self, x):
        # On CUDA, robcomp.dispatch picks per shape between the Triton kernel, torch semi-structured
        # sparse and dense (cached derived weights, never counted in the model size); elsewhere and
        # under torch.compile it is the kernel (custom op robcomp::sparse24_linear).
        # imported here: triton is only needed by this backend
        from robcomp.dispatch import sparse24_forward_dispatch
        from robcomp.kernels import sparse24 as kernels

        return sparse24_forward_dispatch(self, x, kernels)

    def dequantize(self):
        return ref.sparse24_unpack(self.values, self.meta, self.in_features)


@register_layer
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

    def dequantize(self):
        return ref.int8_weight_unpack(self.qweight, self.scale)


@register_layer
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
        if linear.in_features % recipe.group_size:
            return f"group_size={recipe.group_size} does not divide in_features={linear.in_features}"
        return None

    @staticmethod
    def pack(weight, recipe):
        qweight, scales, zeros = ref.int4_pack(weight, recipe.group_size)
        return {"qweight": qweight, "scales": scales, "zeros": zeros}

    def forward_reference(self, x):
        return ref.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def forward_triton(self, x):
        from robcomp.kernels import lowbit

        return lowbit.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def dequantize(self):
        return ref.int4_unpack(self.qweight, self.scales, self.zeros, self.group_size)




@register_layer
class Int8DynamicLinear(CompressedLinear):
    """W8A8: int8 weight (per channel, float32 scale) and int8 activations quantised per token at
    run time; int8 x int8 -> int32 dot. The input gradient is the straight-through estimator:
    ``dX = dY @ dequant(W)``, the activation rounding counted as the identity (``gradient``)."""

    recipe_type = Int8Dynamic
    gradient: ClassVar[str] = "straight-through"

    @staticmethod
    def pack(weight, recipe):
        qweight, scale = ref.int8_dynamic_pack(weight)
        return {"qweight": qweight, "scale": scale}

    def forward_reference(self, x):
        return ref.int8_dynamic_linear(x, self.qweight, self.scale.float(), self.bias)

    def forward_triton(self, x):
        from robcomp.kernels import lowbit

        return lowbit.int8_dynamic_linear(x, self.qweight, self.scale.float().contiguous(), self.bias)

    def dequantize(self):
        return ref.int8_dynamic_unpack(self.qweight, self.scale.float())


@register_layer
class FP8DynamicLinear(CompressedLinear):
    """FP8 (e4m3) weight per channel and e4m3 activations per token. ``backend="triton"`` needs a
    CUDA GPU with compute capability >= 8.9 and raises ``ValueError`` elsewhere; ``backend="torch"``
    emulates e4m3 with ``torch.float8_e4m3fn`` casts (CPU included). The codes are stored as raw
    ``uint8`` bits (``qweight_bits``) so that ``model.half()`` cannot convert them. STE gradient."""

    recipe_type = FP8Dynamic
    gradient: ClassVar[str] = "straight-through"

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

    def dequantize(self):
        return ref.fp8_dynamic_unpack(self.qweight, self.scale.float())


@register_layer
class Sparse24Int4Linear(CompressedLinear):
    """2:4 sparse weight whose kept values are int4 per group (format in kernels/sparse24_lowbit.py):
    ``qvalues uint8 [N, K/4]``, ``scales``/``zeros [N, K/group_size]``, 2:4 ``meta``. Exact gradient."""

    recipe_type = Sparse24Int4

    @classmethod
    def incompatibility(cls, linear, recipe):
        if linear.in_features % recipe.group_size:
            return f"group_size={recipe.group_size} does not divide in_features={linear.in_features}"
        return None

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
