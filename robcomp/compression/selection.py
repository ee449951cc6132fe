"""Which layers a recipe touches by default: the one classifier-head rule and the size floor.

Every part of robcomp that leaves the head dense (layer recipes, channel pruning, masks,
compression-aware training) asks :func:`classifier_head`.
"""
from __future__ import annotations

import torch.nn as nn

from robcomp.layers.conv import is_hf_conv1d
from robcomp.layers.linear import CompressedLinear

__all__ = ["classifier_head", "MIN_WEIGHTS", "candidates"]

#: layers with fewer weights than this are left dense by default: the kernel launch and the
#: activation traffic dominate, so packing saves a few hundred bytes and no time.
MIN_WEIGHTS = 1024


def classifier_head(model: nn.Module) -> str | None:
    """Name of the model's classifier head: the module its ``head_name`` attribute names (robcomp's
    models set it), else the last Linear (dense or compressed); None for a model without one."""
    declared = getattr(model, "head_name", None)
    if isinstance(declared, str) and declared in dict(model.named_modules()):
        return declared
    linears = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, CompressedLinear))]
    return linears[-1] if linears else None


def candidates(model: nn.Module):
    """(name, module) of every layer a layer recipe could touch: Linear, Conv2d, transformers Conv1D,
    compressed layers."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, CompressedLinear)) or is_hf_conv1d(module):
            yield name, module
