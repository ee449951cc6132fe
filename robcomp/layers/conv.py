"""Convolutions through the compressed matmul layers.

A 1x1 convolution (groups 1, no padding, dilation 1) *is* a matmul over channels:
``y[b, :, h, w] = W @ x[b, :, h, w]``. ``Conv1x1`` holds a ``CompressedLinear`` of shape
``[out_channels, in_channels]`` and runs it on the channels-last view of the input, so 1x1 convs
use the 2:4 / low-bit kernels (and their input-gradient kernels) like any Linear. A stride is taken
by sub-sampling the input first (exactly what a strided 1x1 conv computes).

A *patch* convolution (stride equal to the kernel, no padding, dilation 1, groups 1: a ViT's
patch embedding) is an exact reshape + matmul too: the non-overlapping ``kh x kw`` patches are
cut out with a reshape, flattened in the weight's ``(C, kh, kw)`` order and multiplied by the
``[out, C*kh*kw]`` weight (``PatchConv``). Rows and columns past the last whole patch are dropped,
as the convolution drops them.

Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections) is a Linear whose weight
is stored ``[in, out]``: :func:`hf_conv1d_as_linear` gives the equivalent ``nn.Linear`` and the
compressed layer replaces the Conv1D directly (same ``[..., in] -> [..., out]`` forward).

Other kernel sizes stay dense ``nn.Conv2d``. An im2col path (``F.unfold`` + compressed matmul) was
measured slower than the dense convolution on CPU for the models here (see
``docs/compression.md``), so it is not used; the compression summary records the reason.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from robcomp.layers.linear import CompressedLinear

__all__ = ["Conv1x1", "PatchConv", "conv1x1_incompatibility", "conv_matmul_incompatibility", "conv_as_linear",
           "is_patch_conv",
           "is_hf_conv1d", "hf_conv1d_as_linear", "KXK_REASON"]

KXK_REASON = ("{k}x{k} conv stays dense: no im2col path (im2col + matmul measured slower than the "
              "dense convolution; only 1x1 and patch convs (stride == kernel) run through the compressed "
              "matmul layers)")


def conv1x1_incompatibility(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot run as a matmul (None when it can)."""
    if tuple(conv.kernel_size) != (1, 1):
        k = conv.kernel_size[0]
        return KXK_REASON.format(k=k)
    if conv.groups != 1:
        return f"grouped 1x1 conv (groups={conv.groups}) stays dense"
    padded = conv.padding != "valid" if isinstance(conv.padding, str) else any(p != 0 for p in conv.padding)
    if padded and conv.padding != "same":
        return f"padded 1x1 conv (padding={conv.padding}) stays dense"
    if conv.padding_mode != "zeros":
        return f"1x1 conv with padding_mode={conv.padding_mode!r} stays dense"
    return None


def _patch_incompatibility(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` is not a patch convolution (stride == kernel, unpadded, dense); None when it is."""
    if tuple(conv.stride) != tuple(conv.kernel_size):
        return "stride differs from the kernel"
    padded = conv.padding != "valid" if isinstance(conv.padding, str) else any(p != 0 for p in conv.padding)
    if padded or conv.groups != 1 or any(d != 1 for d in conv.dilation):
        return "padded, grouped or dilated"
    return None


def conv_matmul_incompatibility(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot run as a matmul, neither as a 1x1 nor as a patch conv (None when it can)."""
    if tuple(conv.kernel_size) == (1, 1):
        return conv1x1_incompatibility(conv)
    if _patch_incompatibility(conv) is None:
        return None
    kh, kw = conv.kernel_size
    return KXK_REASON.format(k=kh) if kh == kw else KXK_REASON.replace("{k}x{k}", f"{kh}x{kw}")


def is_patch_conv(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) != (1, 1) and _patch_incompatibility(conv) is None


def conv_as_linear(conv: nn.Conv2d) -> nn.Linear:
    """The ``nn.Linear`` equivalent of a 1x1 or patch conv, weight ``[out, C*kh*kw]`` (weights shared
    by value, not by storage)."""
    k = conv.weight[0].numel()
    lin = nn.Linear(k, conv.out_channels, bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.detach().reshape(conv.out_channels, k))
        if conv.bias is not None:
            lin.bias.copy_(conv.bias.detach())
    return lin


class _ConvOverLinear(nn.Module):
    """A conv computed by the compressed Linear it wraps (``self.linear``): its recipe and bias."""

    @property
    def recipe(self):
        return self.linear.recipe

    @property
    def bias(self):
        return self.linear.bias


class Conv1x1(_ConvOverLinear):
    """A 1x1 ``nn.Conv2d`` replacement computing through a compressed linear layer.

    Keeps Conv2d's attributes (``in_channels``, ``out_channels``, ``kernel_size``, ``stride``).
    """

    def __init__(self, linear: CompressedLinear, stride=(1, 1)) -> None:
        super().__init__()
        self.linear = linear
        self.in_channels = linear.in_features
        self.out_channels = linear.out_features
        self.kernel_size = (1, 1)
        self.stride = tuple(stride) if isinstance(stride, (tuple, list)) else (int(stride), int(stride))

    @property
    def weight(self) -> torch.Tensor:
        """Dense ``[out, in, 1, 1]`` equivalent of the packed weight."""
        return self.linear.weight.reshape(self.out_channels, self.in_channels, 1, 1)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, layer_type: type[CompressedLinear], recipe, backend: str = "auto") -> "Conv1x1":
        reason = conv1x1_incompatibility(conv)
        if reason:
            raise ValueError(f"cannot run this conv as a matmul: {reason}")
        return cls(layer_type.from_linear(conv_as_linear(conv), recipe, backend), conv.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if self.stride != (1, 1):
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        y = self.linear(x.permute(0, 2, 3, 1))  # channels last: [B, H, W, C_in] -> [B, H, W, C_out]
        return y.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), stride={self.stride}"


class PatchConv(_ConvOverLinear):
    """A patch ``nn.Conv2d`` (stride == kernel, no padding) computing through a compressed linear layer.

    Keeps Conv2d's attributes (``in_channels``, ``out_channels``, ``kernel_size``, ``stride``).
    """

    def __init__(self, linear: CompressedLinear, in_channels: int, kernel_size) -> None:
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if linear.in_features != in_channels * kh * kw:
            raise ValueError(f"linear has {linear.in_features} inputs; a {kh}x{kw} patch of {in_channels} channels "
                             f"has {in_channels * kh * kw}")
        self.linear = linear
        self.in_channels = in_channels
        self.out_channels = linear.out_features
        self.kernel_size = (kh, kw)
        self.stride = (kh, kw)

    @property
    def weight(self) -> torch.Tensor:
        """Dense ``[out, in, kh, kw]`` equivalent of the packed weight."""
        return self.linear.weight.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, layer_type: type[CompressedLinear], recipe,
                  backend: str = "auto") -> "PatchConv":
        if not is_patch_conv(conv):
            raise ValueError("cannot run this conv as a patch matmul: it needs stride == kernel, no padding, "
                             "groups 1 and dilation 1")
        return cls(layer_type.from_linear(conv_as_linear(conv), recipe, backend), conv.in_channels, conv.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        (kh, kw), (b, c, h, w) = self.kernel_size, x.shape
        ho, wo = h // kh, w // kw
        patches = x[:, :, :ho * kh, :wo * kw].reshape(b, c, ho, kh, wo, kw).permute(0, 2, 4, 1, 3, 5)
        y = self.linear(patches.reshape(b, ho, wo, c * kh * kw))  # [B, Ho, Wo, C_out]
        return y.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is ``transformers.pytorch_utils.Conv1D`` (checked without importing transformers)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers"


def hf_conv1d_as_linear(conv1d: nn.Module) -> nn.Linear:
    """The ``nn.Linear(nx, nf)`` equivalent of a transformers ``Conv1D`` (weight ``[nx, nf]`` transposed)."""
    w = conv1d.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], bias=conv1d.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        if conv1d.bias is not None:
            lin.bias.copy_(conv1d.bias.detach())
    return lin
