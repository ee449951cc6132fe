"""Convolutions through the compressed matmul layers.

A 1x1 convolution (groups 1, no padding, dilation 1) *is* a matmul over channels:
``y[b, :, h, w] = W @ x[b, :, h, w]``. ``Conv1x1`` holds a ``CompressedLinear`` of shape
``[out_channels, in_channels]`` and runs it on the channels-last view of the input, so 1x1 convs
use the 2:4 / low-bit kernels (and their input-gradient kernels) like any Linear. A stride is taken
by sub-sampling the input first (exactly what a strided 1x1 conv computes).

Other kernel sizes stay dense ``nn.Conv2d``. An im2col path (``F.unfold`` + compressed matmul) was
measured slower than the dense convolution on CPU for the models here (see
``docs/compression.md``), so it is not used; the compression summary records the reason.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from robcomp.nn import CompressedLinear

__all__ = ["Conv1x1", "conv1x1_incompatibility", "conv_as_linear", "KXK_REASON"]

KXK_REASON = ("{k}x{k} conv stays dense: no im2col path (im2col + matmul measured slower than the "
              "dense convolution; only 1x1 convs run through the compressed matmul layers)")


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


def conv_as_linear(conv: nn.Conv2d) -> nn.Linear:
    """The ``nn.Linear`` equivalent of a 1x1 conv (weights shared by value, not by storage)."""
    lin = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.detach().reshape(conv.out_channels, conv.in_channels))
        if conv.bias is not None:
            lin.bias.copy_(conv.bias.detach())
    return lin


class Conv1x1(nn.Module):
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
    def recipe(self):
        return self.linear.recipe

    @property
    def bias(self):
        return self.linear.bias

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
