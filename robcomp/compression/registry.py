"""Which function carries out which recipe: ``register_handler(RecipeType)`` (as torchao's
``register_quantize_module_handler``).

A handler is called as ``handler(model, recipe, ctx)`` with a :class:`HandlerContext` and returns
the :class:`~robcomp.summary.LayerReport` rows of what it did. Layer recipes (a compressed module
per ``nn.Linear``) register with the layer class that stores their format (``layer_type``); model
rewrites (channel pruning, masks) register with ``rewrites_model=True``, which tells ``compress`` to
keep a deep copy to restore if a later recipe of the list fails. ``compress`` looks the recipe's
type up through :mod:`robcomp.compression.handlers` (which imports the shipped handlers) and
nowhere else. This module imports no handler, so handler modules can import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from robcomp.recipes import Recipe
from robcomp.summary import LayerReport

__all__ = ["Handler", "HandlerContext", "register_handler", "registered"]

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class HandlerContext:
    """What ``compress`` passes every handler besides the model and the recipe."""

    example_inputs: Any = None
    filter_fn: FilterFn | None = None
    backend: str = "auto"
    #: (parent, child name, old module) of every module swapped so far, for undoing a failed list
    journal: list = field(default_factory=list)


@dataclass(frozen=True)
class Handler:
    fn: Callable[[nn.Module, Recipe, HandlerContext], list[LayerReport]]
    rewrites_model: bool = False
    layer_type: type | None = None  # the compressed module class of a layer recipe


_HANDLERS: dict[type[Recipe], Handler] = {}


def register_handler(recipe_type: type[Recipe], *, rewrites_model: bool = False, layer_type: type | None = None):
    """Decorator: ``fn`` carries out recipes of ``recipe_type``. One handler per recipe type."""
    if not (isinstance(recipe_type, type) and issubclass(recipe_type, Recipe)):
        raise TypeError(f"recipe_type must be a Recipe subclass, got {recipe_type!r}")

    def decorate(fn):
        if recipe_type in _HANDLERS and _HANDLERS[recipe_type].fn is not fn:
            raise ValueError(f"a handler for {recipe_type.__name__} is already registered "
                             f"({_HANDLERS[recipe_type].fn.__qualname__})")
        _HANDLERS[recipe_type] = Handler(fn, rewrites_model, layer_type)
        return fn

    return decorate


def registered() -> dict[type[Recipe], Handler]:
    """Recipe type -> handler, in registration order (read-only by convention)."""
    return _HANDLERS
