"""The handler of every layer recipe: swap ``nn.Linear`` (and 1x1 / patch ``nn.Conv2d``, transformers
``Conv1D``) modules for the compressed module that stores the recipe's format.

Default selection (no ``filter_fn``): every candidate except the classifier head, layers with fewer
than ``MIN_WEIGHTS`` weights and layers the format cannot take, each skip recorded with its reason.
A layer ``filter_fn`` selects that the format cannot take is an error, not a silent skip.
"""
from __future__ import annotations

import functools

import torch.nn as nn

from robcomp.compression.registry import HandlerContext, register_handler
from robcomp.compression.selection import MIN_WEIGHTS, candidates, classifier_head
from robcomp.layers.conv import (Conv1x1, PatchConv, conv_as_linear, conv_matmul_incompatibility, hf_conv1d_as_linear,
                                 is_hf_conv1d, is_patch_conv)
from robcomp.layers.linear import (CompressedLinear, FP8DynamicLinear, Int4WeightOnlyLinear, Int8DynamicLinear,
                                   Int8WeightOnlyLinear, Sparse24Int4Linear, Sparse24Linear, tensor_bytes)
from robcomp.recipes import Recipe
from robcomp.summary import LayerReport

__all__ = ["swap_layers", "LAYER_CLASSES"]

#: the compressed module of each layer format; each is registered as the handler of its recipe type
LAYER_CLASSES = (Sparse24Linear, Int8WeightOnlyLinear, Int4WeightOnlyLinear, Int8DynamicLinear, FP8DynamicLinear,
                 Sparse24Int4Linear)


def _set_module(model: nn.Module, name: str, new: nn.Module, journal: list | None = None) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if journal is not None:
        journal.append((parent, child, getattr(parent, child)))
    setattr(parent, child, new)


def _shape(m: nn.Module) -> tuple:
    if isinstance(m, nn.Conv2d):
        return tuple(m.weight.shape)
    if isinstance(m, Conv1x1):
        return (m.out_channels, m.in_channels, 1, 1)
    if isinstance(m, PatchConv):
        return (m.out_channels, m.in_channels, *m.kernel_size)
    if is_hf_conv1d(m):
        return tuple(m.weight.shape[::-1])  # as the Linear it stands for: [out, in]
    return (m.out_features, m.in_features)


def swap_layers(model: nn.Module, recipe: Recipe, ctx: HandlerContext, *,
                layer_type: type[CompressedLinear]) -> list[LayerReport]:
    """Replace every selected layer by ``layer_type.from_linear(layer, recipe)``; one report per
    candidate layer (compressed, or skipped with its reason)."""
    filter_fn, backend, journal, head = ctx.filter_fn, ctx.backend, ctx.journal, classifier_head(model)
    reports, selected = [], []
    for name, module in list(candidates(model)):
        size = tensor_bytes(module)
        skip = None
        is_conv = isinstance(module, nn.Conv2d)
        linear_view = None  # the Linear the recipe would pack
        if isinstance(module, CompressedLinear):
            skip = f"already compressed ({module.recipe.label()})"
        elif is_conv and (reason := conv_matmul_incompatibility(module)):
            if filter_fn is not None and filter_fn(module, name) and tuple(module.kernel_size) == (1, 1):
                raise ValueError(f"layer {name!r} cannot take {recipe.label()}: {reason}")
            skip = reason if (filter_fn is None or filter_fn(module, name)) else "excluded by filter_fn"
        else:
            linear_view = (conv_as_linear(module) if is_conv else hf_conv1d_as_linear(module)
                           if is_hf_conv1d(module) else module)
            if filter_fn is not None:
                if not filter_fn(module, name):
                    skip = "excluded by filter_fn"
                elif reason := layer_type.incompatibility(linear_view, recipe):
                    raise ValueError(f"layer {name!r} (Linear({linear_view.in_features}, {linear_view.out_features})) "
                                     f"cannot take {recipe.label()}: {reason}")
            elif name == head:
                skip = "classifier head (kept dense by default; pass filter_fn to include it)"
            elif linear_view.weight.numel() < MIN_WEIGHTS:
                skip = (f"too small to gain ({linear_view.weight.numel()} weights < {MIN_WEIGHTS}); "
                        "pass filter_fn to include it")
            else:
                skip = layer_type.incompatibility(linear_view, recipe)
        if skip:
            kind = type(module).__name__
            reports.append(LayerReport(name, recipe.label(), "skipped", _shape(module), _shape(module),
                                       size, size, reason=skip, before_type=kind, after_type=kind))
        else:
            selected.append((name, module, linear_view))
    if not selected:
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in reports) or "the model has no nn.Linear layer"
        raise ValueError(f"{recipe.label()} applies to no layer of this model ({reasons})")
    for name, module, linear_view in selected:
        new = layer_type.from_linear(linear_view, recipe, backend)
        note = ""
        if is_patch_conv(module):
            new, note = PatchConv(new, module.in_channels, module.kernel_size), "patch conv as reshape + matmul"
        elif isinstance(module, nn.Conv2d):
            new, note = Conv1x1(new, module.stride), "1x1 conv as matmul"
        elif is_hf_conv1d(module):
            note = "transformers Conv1D (weight [in, out]) as a Linear"
        _set_module(model, name, new, journal)
        reports.append(LayerReport(name, recipe.label(), "compressed", _shape(module), _shape(new),
                                   tensor_bytes(module), tensor_bytes(new), backend=backend, reason=note,
                                   before_type=type(module).__name__, after_type=type(new).__name__))
    return reports


for _cls in LAYER_CLASSES:
    register_handler(_cls.recipe_type, layer_type=_cls)(functools.partial(swap_layers, layer_type=_cls))
