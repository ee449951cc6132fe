"""Unstructured and N:M masks, masked fine-tuning, packing, 2:4 channel-permutation search."""
import copy

import pytest
import torch
import torch.nn as nn

from robcomp.compression.compress import compress, pack_nm
from robcomp.zoo.data import load_digits_split
from robcomp.compression.masks import (apply_masks, apply_nm_masks, magnitude_masks, mask_sparsity, masked_modules, nm_mask,
                           remove_masks)
from robcomp.compression.permute import apply_permutation, find_permutation, kept_magnitude, permute_model_for_24
from robcomp.layers.linear import Sparse24Linear
from robcomp.recipes import MagnitudePrune
from robcomp.training.train import TrainConfig, accuracy, train
from robcomp.zoo.models import build_model


@pytest.fixture(scope="module")
def digits():
    xtr, ytr, xte, yte = load_digits_split()
    return xtr[:512], ytr[:512], xte, yte


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    xtr, ytr, _, _ = digits
    return train(build_model("mlp", width=64), xtr, ytr, TrainConfig(epochs=6), progress=False)


def test_magnitude_masks_exact_sparsity():
    layers = {"a": nn.Linear(32, 16), "b": nn.Linear(16, 8)}
    masks = magnitude_masks(layers, 0.75, "layer")
    assert all((~m).sum().item() == round(0.75 * m.numel()) for m in masks.values())
    g = magnitude_masks(layers, 0.5, "global")
    assert sum((~m).sum().item() for m in g.values()) == round(0.5 * (512 + 128))
    kept_min = min(layers[n].weight.abs()[m].min() for n, m in g.items())
    dropped_max = max(layers[n].weight.abs()[~m].max() for n, m in g.items())
    assert kept_min >= dropped_max
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks(layers, 0.5, "row")


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_mask_pattern(n, m):
    w = torch.randn(8, 32)
    mask = nm_mask(w, n, m)
    assert (mask.reshape(8, -1, m).sum(-1) == n).all()
    kept = w.abs().reshape(8, -1, m).topk(n, -1).values.sum()
    assert torch.isclose((w.abs() * mask).sum(), kept)
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.randn(4, 6), 2, 4)


def test_masked_finetuning_keeps_pattern_then_packs_24(digits, trained_mlp):
    xtr, ytr, xte, yte = digits
    model = copy.deepcopy(trained_mlp)
    chosen = apply_nm_masks(model, 2, 4)
    assert set(chosen) == {"body.0", "body.2"}
    train(model, xtr, ytr, TrainConfig(epochs=2, lr=1e-3), progress=False)
    for name in chosen:
        w = model.get_submodule(name).weight
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    assert mask_sparsity(model) == pytest.approx(0.5)
    with torch.no_grad():
        before = model(xte)
    pack_nm(model)
    assert isinstance(model.body[0], Sparse24Linear) and isinstance(model.body[2], Sparse24Linear)
    assert not masked_modules(model)
    with torch.no_grad():
        assert torch.allclose(model(xte), before, atol=1e-5)
    assert accuracy(model, xte, yte) > 0.8


def test_4_8_masks_stay_masks_and_remove_bakes():
    model = build_model("mlp", width=64)
    apply_nm_masks(model, 4, 8)
    with pytest.raises(ValueError, match="2:4"):
        pack_nm(model)
    w = model.body[0].weight.detach().clone()
    remove_masks(model)
    assert not masked_modules(model) and torch.equal(model.body[0].weight.detach(), w)


def test_magnitude_prune_then_sparse24_pack_combines():
    model = compress(build_model("mlp", width=64), MagnitudePrune(0.5))
    apply_masks(model, {"body.2": torch.ones(64, 64, dtype=torch.bool)})  # AND with the existing mask
    assert (model.body[2].weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)


def test_permutation_random_layer_keeps_more_magnitude():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    perm = find_permutation(w)
    assert sorted(perm.tolist()) == list(range(64))
    assert kept_magnitude(w, perm) > kept_magnitude(w) * 1.01


def test_permutation_trained_layer_without_gather(trained_mlp, digits):
    _, _, xte, _ = digits
    model = trained_mlp
    w = model.body[2].weight.detach().clone()
    perm = find_permutation(w)
    assert kept_magnitude(w, perm) > kept_magnitude(w)
    with torch.no_grad():
        before = model(xte)
    gains = permute_model_for_24(model)
    assert set(gains) == {"body.2"} and gains["body.2"][1] > gains["body.2"][0]
    with torch.no_grad():  # producer rows permuted instead of gathering the activations: same function
        assert torch.allclose(model(xte), before, atol=1e-5)
    with pytest.raises(ValueError, match="permutation"):
        apply_permutation(model.body[0], model.body[2], torch.zeros(64, dtype=torch.long))


def test_permutation_on_vit_mlp_keeps_function():
    torch.manual_seed(0)
    model = build_model("vit").eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    gains = permute_model_for_24(model, max_passes=3)
    assert set(gains) == {"blocks.0.mlp.2", "blocks.1.mlp.2"}
    assert all(after >= b for b, after in gains.values())
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)
