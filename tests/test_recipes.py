import pytest

import robcomp as rc
from robcomp.recipes import RECIPES, parse_recipe, recipe_from_dict


@pytest.mark.parametrize("recipe", [rc.Sparse24(), rc.Int8WeightOnly(), rc.Int4WeightOnly(64), rc.Int8Dynamic(),
                                    rc.FP8Dynamic(), rc.Sparse24Int4(32), rc.ChannelPrune(0.4, importance="lamp"),
                                    rc.MagnitudePrune(0.9, scope="global")])
def test_round_trip_through_dict(recipe):
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_label_names_only_changed_fields():
    assert rc.Int4WeightOnly().label() == "int4_weight_only"
    assert rc.Int4WeightOnly(group_size=64).label() == "int4_weight_only(group_size=64)"
    assert rc.ChannelPrune(0.5).label() == "channel_prune(ratio=0.5)"


@pytest.mark.parametrize("make, match", [
    (lambda: rc.Int4WeightOnly(group_size=100), "group_size"),
    (lambda: rc.Sparse24Int4(group_size=0), "group_size"),
    (lambda: rc.ChannelPrune(ratio=1.0), "ratio"),
    (lambda: rc.ChannelPrune(ratio=0.5, importance="random"), "importance"),
    (lambda: rc.ChannelPrune(ratio=0.5, round_to=0), "round_to"),
    (lambda: rc.MagnitudePrune(sparsity=-0.1), "sparsity"),
    (lambda: rc.MagnitudePrune(scope="block"), "scope"),
])
def test_validated_on_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_parse_recipe_command_line_form():
    assert parse_recipe("int4_weight_only:group_size=64") == rc.Int4WeightOnly(64)
    assert parse_recipe("channel_prune:ratio=0.5,global_pruning=true") == rc.ChannelPrune(0.5, global_pruning=True)
    assert set(RECIPES) >= {"sparse24", "int8_weight_only", "int4_weight_only", "channel_prune"}
    with pytest.raises(ValueError, match="unknown recipe 'foo'"):
        parse_recipe("foo")
    with pytest.raises(ValueError, match="key=value"):
        parse_recipe("channel_prune:0.5")
