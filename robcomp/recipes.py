"""Compression recipes: frozen dataclasses that say *what* to do, validated on construction.

How a recipe is carried out lives elsewhere (the handler registered for its type in
``robcomp.compression.registry``: compressed layers of ``robcomp.layers``, pruning, masks); a
recipe is plain configuration that serialises to JSON and back, so it can be written into result
records and model manifests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from robcomp.options import parse_options

__all__ = [
    "Recipe",
    "Sparse24",
    "Int8WeightOnly",
    "Int4WeightOnly",
    "Int8Dynamic",
    "FP8Dynamic",
    "Sparse24Int4",
    "ChannelPrune",
    "MagnitudePrune",
    "RECIPES",
    "recipe_from_dict",
    "parse_recipe",
]

INT4_GROUP_SIZES = (32, 64, 128)
IMPORTANCES = ("magnitude", "taylor", "lamp", "bn_scale")


@dataclass(frozen=True)
class Recipe:
    """Base class. ``name`` is the stable identifier used on the command line and in records."""

    name: ClassVar[str] = "recipe"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    def label(self) -> str:
        """Short label naming only the non-default fields, e.g. ``int4_weight_only(group_size=64)``."""
        changed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if getattr(self, f.name) != _default(f)}
        if not changed:
            return self.name
        return f"{self.name}({', '.join(f'{k}={_fmt(v)}' for k, v in changed.items())})"


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")


@dataclass(frozen=True)
class Sparse24(Recipe):
    """2:4 semi-structured sparsity: keep the 2 largest weights of every 4 along in_features."""

    name: ClassVar[str] = "sparse24"


@dataclass(frozen=True)
class Int8WeightOnly(Recipe):
    """int8 weights (symmetric, per output channel), activations stay in floating point."""

    name: ClassVar[str] = "int8_weight_only"


@dataclass(frozen=True)
class Int4WeightOnly(Recipe):
    """int4 weights, asymmetric per group of ``group_size`` along in_features."""

    name: ClassVar[str] = "int4_weight_only"
    group_size: int = 128

    def __post_init__(self) -> None:
        _check_group_size(self.group_size)


@dataclass(frozen=True)
class Int8Dynamic(Recipe):
    """int8 weights and int8 activations quantised per token at run time (W8A8)."""

    name: ClassVar[str] = "int8_dynamic"


@dataclass(frozen=True)
class FP8Dynamic(Recipe):
    """fp8 (e4m3) weights and activations quantised at run time; needs a GPU with fp8."""

    name: ClassVar[str] = "fp8_dynamic"


@dataclass(frozen=True)
class Sparse24Int4(Recipe):
    """2:4 sparsity whose kept values are then quantised to int4 per group."""

    name: ClassVar[str] = "sparse24_int4"
    group_size: int = 128

    def __post_init__(self) -> None:
        _check_group_size(self.group_size)


@dataclass(frozen=True)
class ChannelPrune(Recipe):
    """Structured (channel) pruning through torch-pruning: layers physically shrink.

    ``ratio`` is the fraction of channels removed from each prunable layer (or globally with
    ``global_pruning``); ``round_to`` keeps channel counts a tensor-core-friendly multiple.
    ``ignored`` lists module names that must keep their output channels.
    """

    name: ClassVar[str] = "channel_prune"
    ratio: float = 0.3
    importance: str = "magnitude"
    global_pruning: bool = False
    iterative_steps: int = 1
    round_to: int | None = 8
    ignored: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be a number in (0, 1), got {self.ratio!r}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if not isinstance(self.iterative_steps, int) or self.iterative_steps < 1:
            raise ValueError(f"iterative_steps must be a positive integer, got {self.iterative_steps!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ValueError(f"round_to must be a positive integer or None, got {self.round_to!r}")
        object.__setattr__(self, "ratio", float(self.ratio))
        object.__setattr__(self, "ignored", tuple(self.ignored))


@dataclass(frozen=True)
class MagnitudePrune(Recipe):
    """Unstructured magnitude pruning stored as masks: a research baseline with no speedup."""

    name: ClassVar[str] = "magnitude_prune"
    sparsity: float = 0.5
    scope: str = "layer"

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        object.__setattr__(self, "sparsity", float(self.sparsity))


RECIPES: dict[str, type[Recipe]] = {
    cls.name: cls
    for cls in (Sparse24, Int8WeightOnly, Int4WeightOnly, Int8Dynamic, FP8Dynamic, Sparse24Int4,
                ChannelPrune, MagnitudePrune)
}


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    """Inverse of ``Recipe.to_dict``."""
    d = dict(d)
    name = d.pop("name", None)
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    cls = RECIPES[name]
    if "ignored" in d:
        d["ignored"] = tuple(d["ignored"])
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"bad arguments for recipe {name!r}: {e}") from None


def parse_recipe(spec: str) -> Recipe:
    """Parse ``name`` or ``name:key=value,key=value`` (the command-line form), e.g.
    ``int4_weight_only:group_size=64`` or ``channel_prune:ratio=0.5``."""
    name = spec.strip().partition(":")[0]
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    name, kwargs = parse_options(spec, "recipe")
    return recipe_from_dict({"name": name, **kwargs})
