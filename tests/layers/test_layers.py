"""Compressed layers (torch backend) against an independent float64 computation, and compress()."""
import copy

import pytest
import torch
import torch.nn as nn

import robcomp as rc
from robcomp.compression.compress import compress
from robcomp.kernels import reference as ref
from robcomp.layers.linear import Int4WeightOnlyLinear, Int8WeightOnlyLinear, Sparse24Linear, tensor_bytes
from robcomp.zoo.models import MODELS, build_model


def _dense_equivalent(linear: nn.Linear, recipe) -> torch.Tensor:
    """The weight the compressed layer must compute with, derived independently (float64)."""
    w = linear.weight.detach().double()
    if isinstance(recipe, rc.Sparse24):
        groups = w.abs().reshape(w.shape[0], -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True)
        return w * keep.reshape(w.shape)
    if isinstance(recipe, rc.Int8WeightOnly):
        scale = w.abs().amax(1, keepdim=True) / 127
        return torch.round(w / scale).clamp(-127, 127) * scale
    g = recipe.group_size
    wg = w.reshape(w.shape[0], -1, g)
    lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 15).float().double()
    zero = torch.round(-lo / scale).clamp(0, 15)
    return ((torch.round(wg / scale) + zero).clamp(0, 15) - zero).mul(scale).reshape(w.shape)


LAYERS = [(rc.Sparse24(), Sparse24Linear), (rc.Int8WeightOnly(), Int8WeightOnlyLinear),
          (rc.Int4WeightOnly(32), Int4WeightOnlyLinear), (rc.Int4WeightOnly(64), Int4WeightOnlyLinear)]


@pytest.mark.parametrize("recipe, cls", LAYERS, ids=lambda v: getattr(v, "label", lambda: "")())
@pytest.mark.parametrize("m", [1, 3, 33])
def test_layer_matches_float64_reference(recipe, cls, m):
    linear = nn.Linear(128, 37)
    layer = cls.from_linear(linear, recipe, backend="torch")
    w64 = _dense_equivalent(linear, recipe)
    assert torch.allclose(layer.dequantize().double(), w64, rtol=0, atol=1e-6)
    x = torch.rand(2, m, 128, requires_grad=True)
    y = layer(x)
    expected = x.detach().double() @ w64.T + linear.bias.detach().double()
    assert y.shape == (2, m, 37)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5)
    # input gradient through the compressed layer equals dY @ W of the dense equivalent
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy)
    assert torch.allclose(gx.double(), dy.double() @ w64, rtol=1e-5, atol=1e-5)
    assert gx.abs().sum() > 0


@pytest.mark.parametrize("recipe, cls", LAYERS, ids=lambda v: getattr(v, "label", lambda: "")())
def test_layer_stores_only_the_compressed_format(recipe, cls):
    linear = nn.Linear(256, 64)
    layer = cls.from_linear(linear, recipe, backend="torch")
    dense_bytes = linear.weight.numel() * 4
    weight_bytes = tensor_bytes(layer) - 64 * 4  # minus bias
    assert {n for n, _ in layer.named_parameters()} == {"bias"}
    assert weight_bytes < dense_bytes
    expected = {rc.Sparse24: 256 * 64 // 2 * 4 + 64 * 256 // 8,
                rc.Int8WeightOnly: 256 * 64 + 64 * 4}.get(type(recipe))
    if expected is None:
        expected = 256 * 64 // 2 + 2 * 64 * (256 // recipe.group_size) * 4
    assert weight_bytes == expected
    assert (layer.in_features, layer.out_features) == (256, 64)


def test_int4_sqnr_and_exact_2_4_round_trip():
    w = torch.randn(64, 256)
    q, s, z = ref.int4_pack(w, 32)
    err = ref.int4_unpack(q, s, z, 32) - w
    sqnr_db = 10 * torch.log10(w.pow(2).sum() / err.pow(2).sum())
    assert sqnr_db > 18  # 4-bit asymmetric per group of 32: ~20 dB on Gaussian weights
    v, meta = ref.sparse24_pack(w)
    assert torch.equal(ref.sparse24_unpack(v, meta, 256), w * ref.sparse24_mask(w))


def test_bad_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="divisible by 4"):
        Sparse24Linear.from_linear(nn.Linear(30, 8))
    with pytest.raises(ValueError, match="group_size=64 does not divide in_features=96"):
        Int4WeightOnlyLinear.from_linear(nn.Linear(96, 8), rc.Int4WeightOnly(64))
    bad = nn.Linear(8, 8)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Int8WeightOnlyLinear.from_linear(bad)
    layer = Int8WeightOnlyLinear.from_linear(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.rand(2, 7))
    with pytest.raises(ValueError, match="backend"):
        Int8WeightOnlyLinear.from_linear(nn.Linear(8, 4), backend="cuda")


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("recipe", [rc.Sparse24(), rc.Int8WeightOnly(), rc.Int4WeightOnly(32)],
                         ids=lambda r: r.label())
def test_compress_builtin_models(name, recipe):
    model = build_model(name).eval()
    twin = copy.deepcopy(model)
    x = torch.rand(5, 1, 8, 8)
    compress(model, recipe, backend="torch")
    summary = model.compression_summary
    done = [r for r in summary.layers if r.action == "compressed"]
    assert done, summary
    assert any(r.name == "head" and r.action == "skipped" for r in summary.layers)
    assert summary.bytes_after < summary.bytes_before
    assert summary.bytes_after == sum(t.numel() * t.element_size()
                                      for t in list(model.parameters()) + list(model.buffers()))
    # the compressed model computes exactly the dense model holding the dequantised weights
    with torch.no_grad():
        for r in done:
            twin.get_submodule(r.name).weight.copy_(model.get_submodule(r.name).dequantize())
    out = model(x.requires_grad_(True))
    assert torch.allclose(out, twin(x), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (twin_grad,) = torch.autograd.grad(twin(x).sum(), x)
    assert grad.abs().sum() > 0
    assert torch.allclose(grad, twin_grad, rtol=1e-4, atol=1e-6)


def test_compress_rejects_explicitly_selected_incompatible_layer():
    model = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(ValueError, match=r"layer '0'.*divisible by 4"):
        compress(model, rc.Sparse24(), filter_fn=lambda m, name: name == "0")
    with pytest.raises(ValueError, match="applies to no layer"):
        compress(model, rc.Sparse24())
    assert isinstance(model[0], nn.Linear)  # nothing half-done


def test_channel_prune_shrinks_and_keeps_head_outputs():
    model = build_model("cnn").eval()
    x = torch.rand(8, 1, 8, 8)
    before = sum(p.numel() for p in model.parameters())
    compress(model, rc.ChannelPrune(0.5), example_inputs=x)
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.4 * before
    assert model(x).shape == (8, 10)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="example_inputs"):
        compress(build_model("mlp"), rc.ChannelPrune(0.5))


@pytest.mark.parametrize("recipe", [rc.Int8Dynamic(), rc.FP8Dynamic()], ids=lambda r: r.name)
def test_half_keeps_dynamic_scales_in_fp32(recipe):
    """``model.half()`` converts the bias and leaves the per-channel scales float32 and unrounded
    (the kernels take fp32 scales); moving back and forth changes nothing."""
    layer = rc.compress(nn.Sequential(nn.Linear(96, 40)), recipe,
                             filter_fn=lambda m, n: True)[0]
    scale = layer.scale.clone()
    assert scale.dtype == torch.float32
    layer.half()
    assert layer.bias.dtype == torch.float16
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale)
    layer.to(torch.bfloat16).float()
    assert torch.equal(layer.scale, scale)
