"""Models whose forward returns a dict / tuple / object with logits: logits_of, the attacks, evaluate;
patch convolutions (stride == kernel) as an exact reshape + matmul."""
import pytest
import torch
import torch.nn as nn

import robcomp as rc
from robcomp.layers.conv import PatchConv
from robcomp.layers.linear import CompressedLinear
from robcomp.outputs import LogitsModel, logits_of


class Out:
    def __init__(self, logits):
        self.logits = logits


class Net(nn.Module):
    """A small classifier whose forward wraps its logits in ``kind``."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x):
        z = self.body(x)
        return {"dict": {"loss": None, "logits": z}, "tuple": (z, z.detach() * 0), "object": Out(z),
                "tensor": z}[self.kind]


def test_logits_of_each_output_kind_and_bad_output():
    z = torch.randn(2, 3)
    assert logits_of(z) is z and logits_of({"logits": z}) is z and logits_of((z, 1)) is z and logits_of(Out(z)) is z
    assert logits_of({"a": z}, output_fn=lambda o: o["a"]) is z
    with pytest.raises(TypeError, match="without logits"):
        logits_of({"hidden": z})
    with pytest.raises(TypeError, match="output_fn must return a tensor"):
        logits_of(z, output_fn=lambda o: 3)
    with pytest.raises(TypeError, match="output_fn must be callable"):
        LogitsModel(nn.Identity(), output_fn=3)


@pytest.mark.parametrize("kind", ["dict", "tuple", "object"])
def test_attacks_and_evaluate_take_wrapped_outputs(kind):
    torch.manual_seed(0)
    model, plain = Net(kind).eval(), Net("tensor").eval()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = plain(x).argmax(1)
    pgd = rc.attacks.PGD(eps=0.1, steps=3)
    assert torch.equal(pgd(model, x, y), pgd(plain, x, y))  # same attack as on the tensor-returning twin
    attacks = [rc.attacks.PGD(eps=0.1, steps=3), rc.attacks.Square(eps=0.1, n_queries=10)]
    record, ref = (rc.evaluate(m, (x, y), attacks=attacks, measure=False, sanity=False) for m in (model, plain))
    assert record["robust_accuracy"] == ref["robust_accuracy"] and record["clean_accuracy"] == 1.0
    with pytest.raises(TypeError, match="output_fn must be callable"):
        rc.evaluate(model, (x, y), output_fn="logits")


def test_evaluate_output_fn_picks_the_logits():
    class TwoHeads(Net):
        def forward(self, x):
            return {"pooled": self.body(x), "logits": torch.zeros(len(x), 4)}

    model = TwoHeads("dict").eval()
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    y = model.body(x).argmax(1)
    record = rc.evaluate(model, (x, y), measure=False, sanity=False, output_fn=lambda out: out["pooled"])
    assert record["clean_accuracy"] == 1.0


@pytest.mark.parametrize("hw", [(16, 16), (19, 13)])  # 19 x 13: rows / columns past the last patch dropped
def test_patch_conv_is_the_conv(hw):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 40, kernel_size=4, stride=4)
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = conv(x)
    rc.compress(model, rc.Sparse24(), filter_fn=lambda m, n: True)
    patch = model[0]
    assert isinstance(patch, PatchConv) and isinstance(patch.linear, CompressedLinear)
    masked = nn.Conv2d(3, 40, 4, stride=4)
    with torch.no_grad():
        masked.weight.copy_(patch.weight)
        masked.bias.copy_(patch.bias)
        y, y_ref = model(x), masked(x)
    assert y.shape == ref.shape
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_(True)
    model(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    masked(xr).sum().backward()
    assert torch.allclose(xg.grad, xr.grad, atol=1e-5, rtol=1e-5)
    assert model.compression_summary.layers[0].after_type == "PatchConv"


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_channel_prune_traces_a_dict_forward(importance):
    torch.manual_seed(0)
    model = Net("dict").eval()
    x = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    rc.compress(model, rc.ChannelPrune(0.5, importance=importance), example_inputs=x)
    assert model.body[1].out_features == 32 and model.body[3].in_features == 32
    assert model(x)["logits"].shape == (8, 4)
