"""Bad inputs to the layers, attacks and evaluate: clear errors naming the argument, and the
caller's model left in the mode it was in."""
import pytest
import torch

from robcomp.attacks import APGDT, FGSM
from robcomp.compression.compress import compress
from robcomp.evaluation.evaluate import evaluate
from robcomp.layers.linear import CompressedLinear
from robcomp.recipes import Int8WeightOnly
from robcomp.zoo.models import build_model


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = compress(build_model("mlp", 64).eval(), Int8WeightOnly())
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    return model, x, y


def test_integer_input_to_a_compressed_forward(small):
    model, x, _ = small
    layer = next(m for m in model.modules() if isinstance(m, CompressedLinear))
    with pytest.raises(TypeError, match=r"forward: input must be a floating-point tensor .* got torch.int64"):
        layer(torch.randint(0, 255, (4, layer.in_features)))
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        model((x * 255).long())


def test_evaluate_refuses_integer_images(small):
    model, x, y = small
    with pytest.raises(TypeError, match=r"data x must be a floating-point tensor .* got torch.int64"):
        evaluate(model, ((x * 255).long(), y), sanity=False, measure=False)


def test_fgsm_refuses_nan_input(small):
    model, x, y = small
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x holds 1 NaN or infinite values"):
        FGSM(0.1)(model, bad, y)


@pytest.mark.parametrize("labels, error, message", [
    ("float", TypeError, r"data y must hold integer class indices .* got torch.float32"),
    ("range", ValueError, r"data y holds class index 10, but the model has 10 outputs"),
    ("negative", ValueError, r"data y holds a negative class index"),
    ("swapped", TypeError, r"data x must be a floating-point tensor .*did you pass \(y, x\)"),
])
def test_evaluate_refuses_bad_labels(small, labels, error, message):
    model, x, y = small
    data = {"float": (x, y.float()), "range": (x, torch.full_like(y, 10)), "negative": (x, y - 11),
            "swapped": (y, x)}[labels]
    with pytest.raises(error, match=message):
        evaluate(model, data, sanity=False, measure=False)


def test_evaluate_restores_the_callers_training_mode(small):
    model, x, y = small
    model.train()
    model.body[0].eval()  # a mixed state is restored as it was
    try:
        evaluate(model, (x, y), sanity=False, measure=False)
        assert model.training and not model.body[0].training and model.body[2].training
    finally:
        model.eval()


def test_apgdt_more_targets_than_wrong_classes(small):
    model, x, y = small
    with pytest.raises(ValueError, match=r"n_target_classes=20, but the model has 10 classes"):
        APGDT(0.1, 2, n_target_classes=20)(model, x, y)


def test_evaluate_on_cuda_without_cuda(small, monkeypatch):
    model, x, y = small
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also meaningful on a GPU machine
    with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available"):
        evaluate(model, (x, y), device="cuda", sanity=False, measure=False)


def test_evaluate_state_file_has_umask_permissions(small, tmp_path):
    import os
    import stat

    model, x, y = small
    old = os.umask(0o022)
    try:
        evaluate(model, (x, y), sanity=False, measure=False, state_path=tmp_path / "state.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o644
