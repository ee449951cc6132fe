"""Robust compression: PGD-AT / TRADES fine-tuning, compression-aware training, HYDRA pruning."""
import copy

import pytest
import torch
import torch.nn as nn

from robcomp.attacks.pgd import PGD
from robcomp.compression.compress import compress
from robcomp.compression.masks import masked_modules
from robcomp.layers.linear import CompressedLinear, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from robcomp.recipes import ChannelPrune, Int4WeightOnly, Int8WeightOnly, MagnitudePrune, Sparse24
from robcomp.training.adversarial import FakeQuant, adversarial_finetune, compression_aware_finetune, hydra_prune, trades_loss
from robcomp.training.train import TrainConfig, accuracy, train
from robcomp.zoo.models import build_model

EPS = 0.1


@pytest.fixture(scope="module")
def robust_mlp(digits):
    """A small adversarially trained MLP (the dense starting point of every robust recipe)."""
    torch.manual_seed(0)
    xtr, ytr, _, _ = digits
    model = build_model("mlp", width=64)
    return train(model, xtr, ytr, TrainConfig(epochs=6, adversarial=True, eps=EPS, pgd_steps=2), progress=False)


def robust_accuracy(model, x, y):
    model.eval()
    return accuracy(model, PGD(EPS, steps=10, seed=1)(model, x, y), y)


def test_trades_loss_is_finite_and_differentiable(robust_mlp, digits):
    xtr, ytr, _, _ = digits
    model = copy.deepcopy(robust_mlp).train()
    loss = trades_loss(EPS, steps=2)(model, xtr[:32], ytr[:32])
    loss.backward()
    assert torch.isfinite(loss) and model.body[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_adversarial_finetune_after_recipes(robust_mlp, digits, method):
    xtr, ytr, xte, yte = digits
    model = compress(copy.deepcopy(robust_mlp), Int8WeightOnly())
    packed = model.body[0].qweight.clone()
    bias = model.body[0].bias.detach().clone()
    adversarial_finetune(model, xtr[:256], ytr[:256], TrainConfig(epochs=1, lr=1e-3, eps=EPS, pgd_steps=2),
                         method=method)
    assert torch.equal(model.body[0].qweight, packed)  # packed weights are frozen buffers
    assert not torch.equal(model.body[0].bias.detach(), bias)  # biases, head move
    assert accuracy(model, xte, yte) > 0.8
    with pytest.raises(ValueError, match="method"):
        adversarial_finetune(model, xtr, ytr, method="fgsm")


def test_finetune_after_channel_prune_recovers(robust_mlp, digits):
    xtr, ytr, xte, yte = digits
    model = compress(copy.deepcopy(robust_mlp), ChannelPrune(0.5), example_inputs=xtr[:64])
    before = robust_accuracy(model, xte, yte)
    adversarial_finetune(model, xtr[:512], ytr[:512], TrainConfig(epochs=1, lr=1e-3, eps=EPS, pgd_steps=2))
    assert robust_accuracy(model, xte, yte) > before


@pytest.mark.parametrize("recipe,method", [(Sparse24(), "clean"), (Int8WeightOnly(), "pgd"),
                                           (Int4WeightOnly(group_size=32), "trades")], ids=lambda v: str(v)[:12])
def test_compression_aware_training_ends_packed(robust_mlp, digits, recipe, method):
    xtr, ytr, xte, yte = digits
    model = compression_aware_finetune(copy.deepcopy(robust_mlp), recipe, xtr[:512], ytr[:512],
                                       TrainConfig(epochs=1, lr=1e-3, eps=EPS, pgd_steps=2), method=method)
    assert isinstance(model.body[0], CompressedLinear) and isinstance(model.body[2], CompressedLinear)
    assert not masked_modules(model)
    assert not any("parametrizations" in n for n, _ in model.named_modules())
    assert accuracy(model, xte, yte) > 0.8


@pytest.mark.parametrize("kind,layer,recipe", [("int8", Int8WeightOnlyLinear, Int8WeightOnly()),
                                               ("int4", Int4WeightOnlyLinear, Int4WeightOnly(group_size=32))])
def test_fake_quant_is_exactly_the_packed_weight(kind, layer, recipe):
    lin = nn.Linear(64, 16)
    fq = FakeQuant(kind, 32)
    assert torch.equal(fq(lin.weight).detach(), layer.from_linear(lin, recipe).dequantize())
    w = lin.weight.detach().clone().requires_grad_(True)
    fq(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through


def test_hydra_beats_magnitude_pruning_at_90_percent(robust_mlp, digits):
    """Both start from the same robust model and get the same adversarial fine-tuning."""
    xtr, ytr, xte, yte = digits
    ft = TrainConfig(epochs=1, lr=1e-3, adversarial=True, eps=EPS, pgd_steps=2, seed=1)
    magnitude = compress(copy.deepcopy(robust_mlp), MagnitudePrune(0.9))
    train(magnitude, xtr, ytr, ft, progress=False)
    torch.manual_seed(0)
    hydra = hydra_prune(copy.deepcopy(robust_mlp), xtr, ytr, 0.9,
                        score_config=TrainConfig(epochs=3, lr=1e-3, weight_decay=0.0, adversarial=True, eps=EPS,
                                                 pgd_steps=2),
                        finetune_config=ft)
    for m in (magnitude, hydra):
        for name in ("body.0", "body.2"):
            assert (m.get_submodule(name).weight == 0).float().mean().item() == pytest.approx(0.9, abs=0.005)
    rob_mag, rob_hydra = robust_accuracy(magnitude, xte, yte), robust_accuracy(hydra, xte, yte)
    assert rob_hydra > rob_mag, (rob_hydra, rob_mag)
