"""Tests for robcomp.zoo.models: shapes, input gradients, in-model normalisation, build_model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robcomp.zoo.models import MODELS, Normalize, TinyViT, build_model

WIDTHS = {"cnn": (8, 16), "mlp": (32, 64), "wide_mlp": (32, 64), "vit": (32, 64)}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("which", [0, 1])
def test_forward_and_input_gradient(name, which):
    torch.manual_seed(0)
    model = build_model(name, WIDTHS[name][which]).eval()
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    out = model(x)
    assert out.shape == (4, 10)
    out.logsumexp(1).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_structure(name):
    model = build_model(name)
    assert isinstance(next(iter(model.children())), Normalize)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 10
    assert getattr(model, "head_name", "head") == "head"
    assert not isinstance(model, nn.MultiheadAttention)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def test_normalisation_inside():
    model = build_model("mlp").eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        model.normalize.mean.fill_(0.0)
        assert not torch.allclose(model(x), ref)  # the buffer is actually used


def test_default_widths_and_deterministic():
    cnn = build_model("cnn")
    assert cnn.fc.in_features % 128 == 0
    torch.manual_seed(1)
    a = build_model("vit")
    torch.manual_seed(1)
    b = build_model("vit")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    attn = a.blocks[0].attn
    assert attn.num_heads * attn.head_dim == attn.proj.in_features
    assert attn.qkv.out_features == 3 * attn.proj.in_features


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_other_input_shapes(name, shape):
    model = build_model(name, input_shape=shape, num_classes=7).eval()
    assert model(torch.rand(2, *shape)).shape == (2, 7)


def test_build_model_errors():
    with pytest.raises(ValueError, match="cnn"):
        build_model("resnet")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="width"):
            build_model("cnn", bad)
    with pytest.raises(ValueError):
        TinyViT(width=30, heads=4)


def test_wide_mlp_outgrows_a_cpu_cache():
    """The default study's memory-bound model: its hidden weights (fp32) exceed a 32 MB last-level cache."""
    model = build_model("wide_mlp")
    hidden = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "head"]
    assert [m.in_features for m in hidden] == [64, 2048, 2048]
    assert sum(4 * m.weight.numel() for m in hidden) > 32 * 2 ** 20
    assert build_model("wide_mlp", 128).head.in_features == 128
