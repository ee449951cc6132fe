"""How big a model is: stored bytes and stored values, counting compressed layers by what they
store (packed weights, scales, metadata), not by the dense weights they stand for."""
from __future__ import annotations

import torch.nn as nn

from robcomp.layers.linear import CompressedLinear, tensor_bytes

__all__ = ["model_bytes", "count_parameters"]


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer: the size a saved model takes."""
    return tensor_bytes(model)


def count_parameters(model: nn.Module) -> int:
    """Number of stored weight values: trainable parameters plus the elements packed in compressed
    layers counted as the dense weights they stand for are *not* included; this is what is stored."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            total += sum(b.numel() for b in m.buffers(recurse=False))
    return total
