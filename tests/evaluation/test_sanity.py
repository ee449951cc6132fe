"""Sanity flags: gradient masking, softmax outputs, randomised forwards, weak iterative attacks,
out-of-ball perturbations -- and a clean bill of health for an ordinary model."""
import copy

import torch
import torch.nn as nn

from robcomp.attacks import FGSM, PGD, Square, Transfer
from robcomp.attacks.base import Attack
from robcomp.evaluation.evaluate import evaluate
from robcomp.evaluation.sanity import FLAGS, check_results, probe_model
from robcomp.training.train import TrainConfig, train
from robcomp.zoo.models import build_model



class RoundNoGrad(nn.Module):
    """Quantises its input to 4 levels with a zero gradient: classic gradient masking."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class Masked(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.quant, self.inner = RoundNoGrad(), inner

    def forward(self, x):
        return self.inner(self.quant(x))


def test_gradient_masking_model_is_flagged_and_black_box_beats_pgd(mlp, digits):
    xtr, ytr, x, y = digits
    torch.manual_seed(0)
    inner = train(build_model("mlp", 64), torch.round(xtr * 4) / 4, ytr, TrainConfig(epochs=8, seed=0),
                  progress=False)
    masked = Masked(inner).eval()
    x, y = x[:256], y[:256]
    eps = 0.15
    pgd, square = PGD(eps, 10), Square(eps, 300)
    transfer = Transfer(mlp, PGD(eps, 10), source_name="dense digits MLP")
    r = evaluate(masked, (x, y), attacks=[pgd, square, transfer], measure=False)
    ra = r["robust_accuracy"]
    assert r["clean_accuracy"] > 0.85
    assert ra[square.name] < ra[pgd.name] - 0.1, ra
    assert ra[transfer.name] < ra[pgd.name] - 0.1, ra
    for flag in ("zero_gradients", "black_box_stronger", "no_chance_at_large_eps"):
        assert flag in r["sanity_flags"], (flag, r["sanity"][flag])
    # the ordinary model raises none of them
    ok = evaluate(mlp, (x, y), attacks=[FGSM(eps), pgd, square], measure=False)
    assert ok["sanity_flags"] == [], ok["sanity"]
    assert set(ok["sanity"]) == set(FLAGS)


def test_softmax_and_randomised_models_are_flagged(mlp, digits):
    x, y = digits[2][:64], digits[3][:64]
    soft = nn.Sequential(copy.deepcopy(mlp), nn.Softmax(dim=1)).eval()
    assert probe_model(soft, x, y, eps=0.1)["softmax_outputs"]["flagged"]

    class Noisy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x + 0.05 * torch.randn_like(x))

    probes = probe_model(Noisy(mlp).eval(), x, y, eps=0.1)
    assert probes["randomised_forward"]["flagged"]
    assert not probe_model(mlp, x, y, eps=0.1)["randomised_forward"]["flagged"]


def test_nan_gradients_are_flagged(mlp, digits):
    x, y = digits[2][:32], digits[3][:32]

    class Sqrt(nn.Module):
        def forward(self, x):
            return mlp(torch.sqrt(x))  # d sqrt(x)/dx is inf at the many zero pixels

    assert probe_model(Sqrt().eval(), x, y, eps=None)["nan_gradients"]["flagged"]


def test_result_based_flags():
    f, p10, p40 = FGSM(0.1), PGD(0.1, 10), PGD(0.1, 40)
    sq = Square(0.1, 100)
    checks = check_results([f, p10, p40, sq], {f.name: 0.30, p10.name: 0.50, p40.name: 0.60, sq.name: 0.20}, 400,
                           violations={f.name: 0, p10.name: 3, p40.name: 0, sq.name: 0})
    assert checks["single_step_stronger"]["flagged"]
    assert checks["more_iterations_weaker"]["flagged"]
    assert checks["black_box_stronger"]["flagged"]
    assert checks["perturbation_outside_ball"]["flagged"]
    fine = check_results([f, p10, p40, sq], {f.name: 0.60, p10.name: 0.50, p40.name: 0.49, sq.name: 0.50}, 400,
                         violations={f.name: 0, p10.name: 0, p40.name: 0, sq.name: 0})
    assert not any(v["flagged"] for v in fine.values())


class Cheating(Attack):
    """Returns points outside its own eps ball."""

    eps = 0.05

    @property
    def name(self):
        return "cheat eps=0.05"

    def perturb(self, model, x, y):
        return (x + 0.2).clamp(0, 1)


def test_out_of_ball_perturbations_are_flagged_in_evaluate(mlp, digits):
    x, y = digits[2][:64], digits[3][:64]
    r = evaluate(mlp, (x, y), attacks=[Cheating()], measure=False, sanity=False)
    assert r["sanity_flags"] == ["perturbation_outside_ball"]
    assert r["sanity"]["perturbation_outside_ball"]["value"] == {"cheat eps=0.05": 64}
