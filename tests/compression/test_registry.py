"""The recipe-handler registry: compress() reaches every recipe through it, a new recipe type plugs in
with register_handler, and the lookups say clearly what is missing."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import robcomp as rc
from robcomp.compression import registry
from robcomp.compression.handlers import handler_for, is_layer_recipe, layer_recipe_types, layer_type_for
from robcomp.layers.linear import CompressedLinear
from robcomp.recipes import Recipe
from robcomp.summary import LayerReport


def test_every_shipped_recipe_has_a_handler():
    layer = {rc.Sparse24, rc.Int8WeightOnly, rc.Int4WeightOnly, rc.Int8Dynamic, rc.FP8Dynamic, rc.Sparse24Int4}
    assert set(layer_recipe_types()) == layer
    for t in layer:
        assert is_layer_recipe(t) and issubclass(layer_type_for(t), CompressedLinear)
        assert layer_type_for(t).recipe_type is t and not handler_for(t).rewrites_model
    for t in (rc.ChannelPrune, rc.MagnitudePrune):
        assert not is_layer_recipe(t) and handler_for(t).rewrites_model
        with pytest.raises(ValueError, match="no compressed layer type"):
            layer_type_for(t)


@dataclass(frozen=True)
class _ScaleBias(Recipe):
    """A model rewrite that exists only in this test."""
    name = "scale_bias"
    factor: float = 2.0


def test_a_registered_handler_runs_inside_compress_and_its_failure_is_undone(monkeypatch):
    monkeypatch.setattr(registry, "_HANDLERS", dict(registry._HANDLERS))  # leave the real table as it was
    seen = []

    @registry.register_handler(_ScaleBias, rewrites_model=True)
    def scale_bias(model, recipe, ctx):
        seen.append((recipe, ctx.filter_fn, ctx.backend))
        with torch.no_grad():
            model[0].bias.mul_(recipe.factor)
        if recipe.factor < 0:
            raise ValueError("negative factor")
        return [LayerReport("0", recipe.label(), "rewritten", (4, 4), (4, 4), 0, 0)]

    model = nn.Sequential(nn.Linear(4, 4))
    bias = model[0].bias.detach().clone()
    rc.compress(model, _ScaleBias(3.0), backend="torch")
    assert torch.equal(model[0].bias, 3 * bias)
    assert [r.action for r in model.compression_summary.layers] == ["rewritten"]
    assert seen == [(_ScaleBias(3.0), None, "torch")]
    with pytest.raises(ValueError, match="negative factor"):
        rc.compress(model, _ScaleBias(-1.0))
    assert torch.equal(model[0].bias, 3 * bias)  # rewrites_model: the deep copy was restored
    with pytest.raises(ValueError, match="already registered"):
        registry.register_handler(_ScaleBias)(lambda model, recipe, ctx: [])


def test_a_recipe_without_handler_is_refused_by_name():
    @dataclass(frozen=True)
    class Unknown(Recipe):
        name = "unknown_format"

    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="'unknown_format' has no handler"):
        rc.compress(model, Unknown())
    with pytest.raises(TypeError, match="recipe_type must be a Recipe subclass"):
        registry.register_handler(int)
