"""``compress(model, recipe_or_list)``: swap layers for compressed ones and say what happened.

Recipes apply in order. Model-level recipes (channel pruning) rewrite the model first-class
through torch-pruning; layer recipes replace ``nn.Linear`` modules with the compressed modules of
``robcomp.layers.linear``. The model is modified in place and returned, with a per-layer summary attached as
``model.compression_summary``. A ``ChannelPrune`` followed by layer recipes rounds the channels it
keeps to what they need (``round_to`` raised to a multiple of their int4 group size, 4 for 2:4;
the summary's ``notes`` say so). If a recipe of the list fails, the model is put back as it was
given (layer swaps undone; before a model-level recipe a deep copy is kept to restore) and the
error is raised.

Each recipe is carried out by the handler registered for its type (``robcomp.compression.registry``):
``layer_swap`` for layer formats, ``prune`` for ``ChannelPrune``, ``masks`` for ``MagnitudePrune``.

Default selection (when no ``filter_fn`` is given): every ``nn.Linear`` and 1x1 ``nn.Conv2d``
except the classifier head (the last Linear of the model, which is small and sensitive), layers
with fewer than ``MIN_WEIGHTS`` weights (too small to gain) and layers the recipe cannot take (e.g.
in_features not divisible by the int4 group size); each skip is recorded with its reason. 1x1
convs run as ``robcomp.layers.conv.Conv1x1`` around a compressed Linear, patch convs (stride == kernel,
a ViT's patch embedding) as ``robcomp.layers.conv.PatchConv``; other convs stay dense and the summary says
why. Hugging Face ``transformers`` ``Conv1D`` layers (GPT-2; weight ``[in, out]``) are replaced by
the compressed Linear they stand for. Each summary row names the layer's class before and after
(``before_type`` / ``after_type``). ``MagnitudePrune`` attaches masks (``robcomp.compression.masks``): reported as "no speedup".
A ``filter_fn(module, name)`` overrides the default; a layer it selects that the recipe cannot take
is an error, not a silent skip.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from robcomp.compression.handlers import handler_for, is_layer_recipe
from robcomp.compression.masks import WeightMask, masked_modules
from robcomp.compression.registry import FilterFn, HandlerContext
from robcomp.layers.backend import validate_backend
from robcomp.layers.sizes import model_bytes
from robcomp.recipes import Recipe, Sparse24
from robcomp.summary import CompressionSummary

__all__ = ["compress", "pack_nm"]


def _as_recipes(recipe_or_list: Recipe | Sequence[Recipe]) -> list[Recipe]:
    recipes = [recipe_or_list] if isinstance(recipe_or_list, Recipe) else list(recipe_or_list)
    if not recipes:
        raise ValueError("recipe_or_list is empty: give at least one recipe")
    for r in recipes:
        if not isinstance(r, Recipe):
            raise TypeError(f"recipe_or_list must hold robcomp recipes, got {type(r).__name__}")
    return recipes


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
        later = [r for r in recipes[i + 1:] if is_layer_recipe(r)]
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
        rewrites = any(handler_for(r).rewrites_model for r in recipes)
        self.backup = copy.deepcopy(model.__dict__) if rewrites else None

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
        ctx = HandlerContext(example_inputs=example_inputs, filter_fn=filter_fn, backend=backend, journal=undo.journal)
        for recipe in recipes:
            summary.layers += handler_for(recipe).fn(model, recipe, ctx)
    except BaseException:
        undo()  # a failed list leaves the model as it was given
        raise
    summary.bytes_after = model_bytes(model)
    model.compression_summary = summary
    return model


def pack_nm(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Pack every 2:4-masked Linear into a ``Sparse24Linear`` (bakes the mask first), keeping
    other layers as they are. The packed layer computes exactly with the masked weights."""
    names = {n for n, m in masked_modules(model).items()
             if isinstance(m, nn.Linear) and next(p for p in m.parametrizations.weight
                                                  if isinstance(p, WeightMask)).pattern == "2:4"}
    if not names:
        raise ValueError("pack_nm found no 2:4-masked Linear layer; call apply_nm_masks(model, 2, 4) first")
    for n in names:
        parametrize.remove_parametrizations(model.get_submodule(n), "weight", leave_parametrized=True)
    return compress(model, Sparse24(), filter_fn=lambda mod, name: name in names, backend=backend)
