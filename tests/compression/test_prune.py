"""ChannelPrune through torch-pruning: built-in models, a residual CNN, the ViT; MACs and latency."""
import copy

import pytest
import torch
import torch.nn as nn

from robcomp.compression.compress import compress
from robcomp.evaluation.timing import count_macs as _count_macs
from robcomp.recipes import ChannelPrune, Sparse24
from robcomp.zoo.models import build_model

X = torch.rand(16, 1, 8, 8)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNetTiny(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = ResBlock(width, width, 1)
        self.layer2 = ResBlock(width, 2 * width, 2)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def count_macs(model, x):
    """(MACs of one forward on ``x[:1]``'s shape, parameters): robcomp's one MAC counter."""
    return _count_macs(model, tuple(x.shape[1:]))["macs"], _params(model)


def _params(m):
    return sum(p.numel() for p in m.parameters())


MODELS = {"cnn": lambda: build_model("cnn"), "mlp": lambda: build_model("mlp"), "vit": lambda: build_model("vit"),
          "resnet": ResNetTiny}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("importance", ["magnitude", "taylor", "lamp", "bn_scale"])
def test_channel_prune_models(name, importance):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    if importance == "bn_scale" and name in ("mlp", "vit"):
        with pytest.raises(ValueError, match="BatchNorm"):
            compress(model, ChannelPrune(0.5, importance=importance), example_inputs=X)
        return
    p0, (m0, _) = _params(model), count_macs(model, X[:1])
    compress(model, ChannelPrune(0.5, importance=importance), example_inputs=X)
    assert _params(model) < 0.6 * p0 and count_macs(model, X[:1])[0] < 0.6 * m0
    assert model(X).shape == (16, 10)
    pruned = [r for r in model.compression_summary.layers if r.action == "pruned"]
    assert pruned and all(r.after_bytes < r.before_bytes for r in pruned)
    head = [r for r in model.compression_summary.layers if r.name == "head"][0]
    assert head.after_shape[0] == 10  # the classifier keeps its classes
    if name == "vit":  # heads pruned consistently: every head lost the same dims; attributes updated
        for blk in model.blocks:
            a = blk.attn
            assert a.num_heads == 4 and a.head_dim == 8
            assert a.qkv.out_features == 3 * a.num_heads * a.head_dim and a.proj.in_features == a.num_heads * a.head_dim


def _conv_linear_macs(model, x):
    total = []

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            total.append(out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        else:
            total.append(out.numel() * m.in_features)

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return sum(total)


def test_cnn_half_channels_quarter_macs_and_faster():
    torch.manual_seed(0)
    dense = build_model("cnn").eval()
    pruned = compress(copy.deepcopy(dense), ChannelPrune(0.5), example_inputs=X).eval()
    x1 = X[:1]
    # conv1 1->16 (9216), conv2 16->32 (294912), conv3 32->32 at 4x4 (147456), fc 512->64, head 64->10
    assert _conv_linear_macs(dense, x1) == 9216 + 294912 + 147456 + 32768 + 640
    # halved channels: 8, 16, 16; fc 256->32; head 32->10
    assert _conv_linear_macs(pruned, x1) == 4608 + 73728 + 36864 + 8192 + 320
    assert count_macs(dense, x1)[0] == _conv_linear_macs(dense, x1)  # the library's counter agrees
    assert [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)] == [8, 16, 16]
    ratio = count_macs(dense, x1)[0] / count_macs(pruned, x1)[0]
    assert 3.5 < ratio < 4.1
    # latency is a measurement, not a test assertion: the study's efficiency experiment times pruned vs
    # dense in one run (the report's Efficiency section)


def test_options_global_iterative_round_to_ignored():
    torch.manual_seed(0)
    m = compress(build_model("cnn"), ChannelPrune(0.5, global_pruning=True, iterative_steps=2, round_to=None,
                                                  ignored=("fc",)), example_inputs=X)
    assert m.fc.out_features == 64  # ignored keeps its outputs
    assert m(X).shape == (16, 10)
    m = compress(build_model("mlp"), ChannelPrune(0.3, round_to=16), example_inputs=X)
    assert all(layer.out_features % 16 == 0 for layer in (m.body[0], m.body[2]))
    with pytest.raises(ValueError, match="ignored"):
        compress(build_model("cnn"), ChannelPrune(0.5, ignored=("nope",)), example_inputs=X)


def test_prune_after_layer_recipe_is_an_error_and_frozen_params_ok():
    m = compress(build_model("mlp"), Sparse24())
    with pytest.raises(ValueError, match="ChannelPrune must come before"):
        compress(m, ChannelPrune(0.5), example_inputs=X)
    # frozen parameters and no_grad context: torch-pruning still traces; flags restored
    m = build_model("cnn")
    for p in m.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        compress(m, ChannelPrune(0.5), example_inputs=X)
    assert not any(p.requires_grad for p in m.parameters())
    assert m.fc.in_features == 256


@pytest.mark.parametrize("width, ratio", [(64, 0.9), (64, 0.99), (256, 0.99)])
def test_ratio_that_cannot_be_honoured_is_an_error_not_a_no_op(width, ratio):
    from robcomp.compression.compress import compress
    from robcomp.zoo.models import build_model
    from robcomp.recipes import ChannelPrune

    x = torch.rand(8, 1, 8, 8)
    with pytest.raises(ValueError, match=rf"ChannelPrune\(ratio={ratio:g}\) removed no channel.*round_to=8"):
        compress(build_model("mlp", width), ChannelPrune(ratio), example_inputs=x)
    # the highest ratio the message names does prune
    model = compress(build_model("mlp", width), ChannelPrune(1 - 8 / width), example_inputs=x)
    assert model.body[0].out_features == 8
