"""``compress(model, recipe_or_list)``: swap layers for compressed ones and say what happened.

Recipes apply in order. Model-level recipes (channel pruning) rewrite the model first-class
through torch-pruning; layer recipes replace ``nn.Linear`` modules with the compressed modules of
``robcomp.nn``. The model is modified in place and returned, with a per-layer summary attached as
``model.compression_summary``. A ``ChannelPrune`` followed by layer recipes rounds the channels it
keeps to what they need (``round_to`` raised to a multiple of their int4 group size, 4 for 2:4;
the summary's ``notes`` say so). If a recipe of the list fails, the model is put back as it was
given (layer swaps undone; before a model-level recipe a deep copy is kept to restore) and the
error is raised.

Default selection (when no ``filter_fn`` is given): every ``nn.Linear`` and 1x1 ``nn.Conv2d``
except the classifier head (the last Linear of the model, which is small and sensitive), layers
with fewer than ``MIN_WEIGHTS`` weights (too small to gain) and layers the recipe cannot take (e.g.
in_features not divisible by the int4 group size); each skip is recorded with its reason. 1x1
convs run as ``robcomp.layers.conv.Conv1x1`` around a compressed Linear, patch convs (stride == kernel,
a ViT's patch embedding) as ``robcomp.layers.conv.PatchConv``; other convs stay dense and the summary says
why. Hugging Face ``transformers`` ``Conv1D`` layers (GPT-2; weight ``[in, out]``) are replaced by
the compressed Linear they stand for. Each summary row names the layer's class before and after
(``before_type`` / ``after_type``). ``MagnitudePrune`` attaches masks (``robcomp.masks``): reported as "no speedup".
A ``filter_fn(module, name)`` overrides the default; a layer it selects that the recipe cannot take
is an error, not a silent skip.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from robcomp.layers.backend import validate_backend
from robcomp.layers.conv import (Conv1x1, PatchConv, conv_as_linear, conv_matmul_incompatibility, hf_conv1d_as_linear,
                          is_hf_conv1d, is_patch_conv)
from robcomp.layers.linear import LAYER_TYPES, CompressedLinear, tensor_bytes
from robcomp.recipes import Recipe

__all__ = ["compress", "CompressionSummary", "LayerReport", "model_bytes", "count_parameters"]

FilterFn = Callable[[nn.Module, str], bool]


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


@dataclass
class LayerReport:
    name: str
    recipe: str
    action: str  # "compressed", "pruned" or "skipped"
    before_shape: tuple
    after_shape: tuple
    before_bytes: int
    after_bytes: int
    backend: str = ""
    reason: str = ""
    before_type: str = ""  # the layer's class before and after, e.g. "Conv1D" -> "Int8WeightOnlyLinear"
    after_type: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CompressionSummary:
    layers: list[LayerReport] = field(default_factory=list)
    recipes: list[dict] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    notes: list[str] = field(default_factory=list)  # what compress adjusted (e.g. round_to for later recipes)

    def to_dict(self) -> dict:
        return {"recipes": self.recipes, "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "notes": list(self.notes),
                "layers": [layer.to_dict() for layer in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionSummary":
        layers = [LayerReport(**{**r, "before_shape": tuple(r["before_shape"]), "after_shape": tuple(r["after_shape"])})
                  for r in d.get("layers", [])]
        return cls(layers=layers, recipes=list(d.get("recipes", [])), bytes_before=int(d.get("bytes_before", 0)),
                   bytes_after=int(d.get("bytes_after", 0)), notes=list(d.get("notes", [])))

    @classmethod
    def from_json(cls, text: str) -> "CompressionSummary":
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        head = ("layer", "recipe", "action", "type", "shape before", "shape after", "bytes before", "bytes after",
                "note")
        rows = [head] + [(r.name, r.recipe, r.action,
                          f"{r.before_type} -> {r.after_type}" if r.after_type != r.before_type else r.before_type,
                          "x".join(map(str, r.before_shape)),
                          "x".join(map(str, r.after_shape)), str(r.before_bytes), str(r.after_bytes),
                          r.reason or r.backend) for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        lines.append(f"model bytes: {self.bytes_before} -> {self.bytes_after} ({ratio:.2f}x smaller)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _as_recipes(recipe_or_list: Recipe | Sequence[Recipe]) -> list[Recipe]:
    recipes = [recipe_or_list] if isinstance(recipe_or_list, Recipe) else list(recipe_or_list)
    if not recipes:
        raise ValueError("recipe_or_list is empty: give at least one recipe")
    for r in recipes:
        if not isinstance(r, Recipe):
            raise TypeError(f"recipe_or_list must hold robcomp recipes, got {type(r).__name__}")
    return recipes


def _head_name(model: nn.Module) -> str | None:
    linears = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, CompressedLinear))]
    return linears[-1] if linears else None


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


#: layers with fewer weights than this are left dense by default: the kernel launch and the
#: activation traffic dominate, so packing saves a few hundred bytes and no time.
MIN_WEIGHTS = 1024


def _candidates(model: nn.Module):
    """(name, module) of every layer a layer recipe could touch: Linear, Conv2d, transformers Conv1D,
    compressed layers."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, CompressedLinear)) or is_hf_conv1d(module):
            yield name, module


def _apply_layer_recipe(model: nn.Module, recipe: Recipe, filter_fn: FilterFn | None, backend: str,
                        head: str | None, journal: list) -> list[LayerReport]:
    layer_type = LAYER_TYPES.get(type(recipe))
    if layer_type is None:
        raise ValueError(f"recipe {recipe.name!r} has no layer implementation in this installation")
    reports, selected = [], []
    for name, module in list(_candidates(model)):
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


def _width_multiple(recipe: Recipe) -> int:
    """The multiple of in_features a layer recipe needs (its int4 group size; 4 for 2:4 sparsity)."""
    group = getattr(recipe, "group_size", None)
    need = group if isinstance(group, int) else 1
    return math.lcm(need, 4) if "sparse24" in recipe.name else need


def _round_for_later(recipes: list[Recipe]) -> tuple[list[Recipe], dict[int, str]]:
    """Raise each ChannelPrune's ``round_to`` to a multiple the later layer recipes need, so that the
    widths it leaves can still take them (e.g. group_size 32 after pruning); the notes say so."""
    out, notes = list(recipes), {}
    for i, recipe in enumerate(recipes):
        if recipe.name != "channel_prune":
            continue
        later = [r for r in recipes[i + 1:] if r.applies_to != "model"]
        need = math.lcm(*(_width_multiple(r) for r in later)) if later else 1
        current = recipe.round_to or 1
        if need > 1 and current % need:
            rounded = math.lcm(current, need)
            out[i] = dataclasses.replace(recipe, round_to=rounded)
            notes[i] = (f"round_to raised from {recipe.round_to} to {rounded} so the pruned widths fit "
                        + ", ".join(r.label() for r in later))
    return out, notes


class _Undo:
    """Puts the model back as it was when a recipe of the list fails: layer swaps are undone from
    their journal; model-level recipes (pruning rewrites tensors in place) restore a deep copy
    taken before the first one runs."""

    def __init__(self, model: nn.Module, recipes: list[Recipe]) -> None:
        self.model, self.journal = model, []
        self.backup = copy.deepcopy(model.__dict__) if any(r.applies_to == "model" for r in recipes) else None

    def __call__(self) -> None:
        if self.backup is not None:
            self.model.__dict__.clear()
            self.model.__dict__.update(self.backup)
            return
        for parent, child, old in reversed(self.journal):
            setattr(parent, child, old)


def compress(model: nn.Module, recipe_or_list: Recipe | Sequence[Recipe], *,
             example_inputs: torch.Tensor | Iterable[torch.Tensor] | None = None,
             filter_fn: FilterFn | None = None, backend: str = "auto") -> nn.Module:
    """Compress ``model`` in place with one recipe or a list applied in order; return it.

    ``example_inputs`` is needed by model-level recipes that trace the model (channel pruning).
    ``backend`` is stored on every compressed layer (``"auto"`` decides per input device).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable as filter_fn(module, name) -> bool")
    validate_backend(backend)
    recipes, notes = _round_for_later(_as_recipes(recipe_or_list))
    summary = CompressionSummary(recipes=[r.to_dict() for r in recipes], bytes_before=model_bytes(model),
                                 notes=[f"{recipes[i].label()}: {note}" for i, note in notes.items()])
    undo = _Undo(model, recipes)
    try:
        for recipe in recipes:
            if recipe.applies_to == "model":
                from robcomp.compression.prune import apply_model_recipe  # torch-pruning is imported only when needed

                summary.layers += apply_model_recipe(model, recipe, example_inputs=example_inputs,
                                                     filter_fn=filter_fn)
            else:
                summary.layers += _apply_layer_recipe(model, recipe, filter_fn, backend, _head_name(model),
                                                      undo.journal)
    except BaseException:
        undo()  # a failed list leaves the model as it was given
        raise
    summary.bytes_after = model_bytes(model)
    model.compression_summary = summary
    return model
