"""Look a recipe's handler up: the registry with robcomp's own handlers loaded (importing their
modules registers them: ``layer_swap`` for the layer formats, ``prune`` for ``ChannelPrune``,
``masks`` for ``MagnitudePrune``)."""
from __future__ import annotations

from robcomp.compression import layer_swap, masks, prune  # noqa: F401  (they register on import)
from robcomp.compression.registry import Handler, registered
from robcomp.recipes import Recipe

__all__ = ["handler_for", "layer_type_for", "layer_recipe_types", "is_layer_recipe"]


def handler_for(recipe: Recipe | type[Recipe]) -> Handler:
    recipe_type = recipe if isinstance(recipe, type) else type(recipe)
    table = registered()
    for cls in recipe_type.__mro__:
        if cls in table:
            return table[cls]
    raise ValueError(f"recipe {getattr(recipe_type, 'name', recipe_type.__name__)!r} has no handler in this "
                     "installation (register one with robcomp.compression.registry.register_handler)")


def is_layer_recipe(recipe: Recipe | type[Recipe]) -> bool:
    """True for recipes that replace layers by compressed modules (not model rewrites)."""
    return handler_for(recipe).layer_type is not None


def layer_type_for(recipe: Recipe | type[Recipe]) -> type:
    """The compressed module class that stores ``recipe``'s format."""
    handler = handler_for(recipe)
    if handler.layer_type is None:
        raise ValueError(f"{recipe!r} rewrites the model: it has no compressed layer type")
    return handler.layer_type


def layer_recipe_types() -> list[type[Recipe]]:
    """Every recipe type that has a compressed layer, in registration order."""
    return [t for t, h in registered().items() if h.layer_type is not None]
