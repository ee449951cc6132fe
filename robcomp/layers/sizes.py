"""How big a model is: stored bytes and stored values, counting compressed layers by what they
store (packed weights, scales, metadata), not by the dense weights they stand for."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from robcomp.layers.linear import CompressedLinear, tensor_bytes

__all__ = ["model_bytes", "count_parameters", "count_nonzero_parameters"]


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


def count_nonzero_parameters(model: nn.Module) -> dict:
    """Non-zero values of the weights the model computes with, and how many values those weights
    have: compressed layers through their dequantised weight, masked weights after their mask
    (``torch.nn.utils.parametrize``), every other parameter as stored."""
    nonzero, dense = 0, 0

    def add(t: torch.Tensor) -> None:
        nonzero_, numel = int((t != 0).sum()), t.numel()
        nonlocal nonzero, dense
        nonzero, dense = nonzero + nonzero_, dense + numel

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, parametrize.ParametrizationList) or ".parametrizations" in f".{name}":
                continue  # the originals and masks: counted through the parametrized tensor below
            if isinstance(m, CompressedLinear):
                add(m.dequantize())
            if parametrize.is_parametrized(m):
                for pname in m.parametrizations:
                    add(getattr(m, pname))
            for p in m.parameters(recurse=False):
                add(p)
    return {"nonzero_parameters": nonzero, "dense_equivalent_parameters": dense}

