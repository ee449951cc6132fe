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
import importlib
from typing import ClassVar

import torch
import torch.nn as nn

from robcomp.backend import resolve_backend, validate_backend
from robcomp.kernels import reference as ref
from robcomp.recipes import Int4WeightOnly, Int8WeightOnly, Recipe, Sparse24

__all__ = [
    "CompressedLinear",
    "Sparse24Linear",
    "Int8WeightOnlyLinear",
    "Int4WeightOnlyLinear",
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
    #: module under ``robcomp.kernels`` holding the Triton launchers for this format
    kernel_module: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 recipe: Recipe, backend: str = "auto") -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.recipe = recipe
        self.backend = validate_backend(backend)
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
    @abc.abstractmethod
    def _build(cls, linear: nn.Linear, recipe: Recipe, backend: str) -> "CompressedLinear":
        """Pack ``linear``'s weight into this format and return the new module."""

    # ------------------------------------------------------------------ running
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected in_features={self.in_features}")
        backend = resolve_backend(self.backend, x.device)
        if backend == "torch":
            return self.forward_reference(x)
        if backend == "triton":
            return self.forward_triton(x)
        raise ValueError(f"backend {backend!r} is not supported by {type(self).__name__}; use 'torch' or 'triton'")

    @abc.abstractmethod
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Forward through the plain-PyTorch reference (differentiable w.r.t. ``x``)."""

    @abc.abstractmethod
    def forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        """Forward through the Triton kernels (with their input-gradient kernels)."""

    def _kernels(self):
        """Import this format's Triton launchers, with a clear error when they cannot run."""
        try:
            return importlib.import_module(f"robcomp.kernels.{self.kernel_module}")
        except ImportError as e:
            raise RuntimeError(f"backend 'triton' for {type(self).__name__} is unavailable: {e}") from e

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
    kernel_module = "sparse24"

    @classmethod
    def incompatibility(cls, linear, recipe):
        if linear.in_features % 4:
            return f"2:4 sparsity needs in_features divisible by 4, got {linear.in_features}"
        return None

    @classmethod
    def _build(cls, linear, recipe, backend):
        values, meta = ref.sparse24_pack(linear.weight.detach())
        module = cls(linear.in_features, linear.out_features, linear.bias, recipe, backend)
        module.register_buffer("values", values)
        module.register_buffer("meta", meta)
        return module

    def forward_reference(self, x):
        return ref.sparse24_linear(x, self.values, self.meta, self.bias)

    def forward_triton(self, x):
        return self._kernels().sparse24_linear(x, self.values, self.meta, self.bias)

    def dequantize(self):
        return ref.sparse24_unpack(self.values, self.meta, self.in_features)


@register_layer
class Int8WeightOnlyLinear(CompressedLinear):
    """int8 weight, symmetric per output channel; floating-point activations (W8A16)."""

    recipe_type = Int8WeightOnly
    kernel_module = "lowbit"

    @classmethod
    def _build(cls, linear, recipe, backend):
        qweight, scale = ref.int8_weight_pack(linear.weight.detach())
        module = cls(linear.in_features, linear.out_features, linear.bias, recipe, backend)
        module.register_buffer("qweight", qweight)
        module.register_buffer("scale", scale)
        return module

    def forward_reference(self, x):
        return ref.int8_weight_linear(x, self.qweight, self.scale, self.bias)

    def forward_triton(self, x):
        return self._kernels().int8_weight_linear(x, self.qweight, self.scale, self.bias)

    def dequantize(self):
        return ref.int8_weight_unpack(self.qweight, self.scale)


@register_layer
class Int4WeightOnlyLinear(CompressedLinear):
    """int4 weight, asymmetric per group along in_features, two values per byte (W4A16)."""

    recipe_type = Int4WeightOnly
    kernel_module = "lowbit"

    @classmethod
    def incompatibility(cls, linear, recipe):
        if linear.in_features % recipe.group_size:
            return f"group_size={recipe.group_size} does not divide in_features={linear.in_features}"
        return None

    @classmethod
    def _build(cls, linear, recipe, backend):
        qweight, scales, zeros = ref.int4_pack(linear.weight.detach(), recipe.group_size)
        module = cls(linear.in_features, linear.out_features, linear.bias, recipe, backend)
        module.group_size = recipe.group_size
        module.register_buffer("qweight", qweight)
        module.register_buffer("scales", scales)
        module.register_buffer("zeros", zeros)
        return module

    def forward_reference(self, x):
        return ref.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def forward_triton(self, x):
        return self._kernels().int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def dequantize(self):
        return ref.int4_unpack(self.qweight, self.scales, self.zeros, self.group_size)

