"""Models the attacks cannot take at face value: no input gradient (flagged, black-box and transfer
attacks still scored) and randomised forwards (EOT gradients, voted scores consistent with the
ensemble's member statistics, seeded noise, repeats that differ said so)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from robcomp.attacks import EOT, FGSM, PGD, NoInputGradient, Square, Transfer, preset
from robcomp.attacks.base import ce_loss, loss_and_gradient
from robcomp.evaluation.evaluate import evaluate, merge_records
from robcomp.evaluation.randomised import Predictor
from robcomp.evaluation.sanity import probe_model
from records import strip


class NoGradPreprocess(nn.Module):
    """A 'defense' that quantises its input under torch.no_grad(): the input gradient does not exist."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.no_grad():
            x = torch.round(x * 8) / 8
        return self.inner(x)


def test_no_input_gradient_is_flagged_and_black_box_attacks_still_scored(mlp, digits):
    x, y = digits[2][:128], digits[3][:128]
    model = NoGradPreprocess(copy.deepcopy(mlp)).eval()
    with pytest.raises(NoInputGradient):
        PGD(0.1, 2)(model, x, y)
    eps = 0.15
    square = Square(eps, 60)
    transfer = Transfer(mlp, PGD(eps, 10), source_name="dense MLP")
    ens = preset("standard", eps, steps=4, n_queries=60, n_target_classes=2)
    attacks = [FGSM(eps), PGD(eps, 5), square, transfer, ens]
    r = evaluate(model, (x, y), attacks=attacks, measure=False)  # no exception
    assert r["no_input_gradient"] is True
    assert "no_input_gradient" in r["sanity_flags"]
    ra = r["robust_accuracy"]
    assert ra[FGSM(eps).name] is None and ra[PGD(eps, 5).name] is None
    assert set(r["not_applicable"]) == {FGSM(eps).name, PGD(eps, 5).name}
    # the gradient-free and transfer attacks ran and found something
    assert ra[square.name] < r["clean_accuracy"] - 0.1
    assert ra[transfer.name] < r["clean_accuracy"] - 0.1
    # inside the ensemble only Square applies; the ensemble's number is Square's
    members = r["ensembles"][ens.name]["members"]
    assert [m["applicable"] for m in members] == [False, False, False, True]
    assert [m["attacked"] for m in members[:3]] == [0, 0, 0] and members[3]["attacked"] > 0
    assert ra[ens.name] == members[-1]["robust_accuracy_after"]
    alone = ens.attacks[-1](model, x, y)  # the same Square, alone
    with torch.no_grad():
        alone_acc = float((model(alone).argmax(1) == y).float().mean())
    assert abs(ra[ens.name] - alone_acc) <= 2 / len(y)
    assert r["worst_case_robust_accuracy"] <= min(v for v in ra.values() if v is not None)
    assert r["robust_accuracy_by_eps"][f"Linf eps={eps:g}"] == r["worst_case_robust_accuracy"]
    # the sanity probes that need gradients say why they did not run
    assert r["sanity"]["zero_gradients"]["flagged"] is None
    probes = probe_model(model, x, y, eps=eps)
    assert probes["no_input_gradient"]["flagged"] is True
    assert probes["nan_gradients"]["flagged"] is None
    # sharded runs merge to the same numbers, not-applicable attacks stay None
    kw = dict(attacks=[FGSM(eps), square], batch_size=64, measure=False, sanity=False)
    merged = merge_records([evaluate(model, (x, y), rank=k, world_size=2, **kw) for k in range(2)])
    full = evaluate(model, (x, y), **kw)
    assert merged["robust_accuracy"] == full["robust_accuracy"] and merged["robust_accuracy"][FGSM(eps).name] is None
    # a transfer attack whose source has no gradient does not apply either (no crash)
    blind = Transfer(model, PGD(eps, 3), source_name="no-grad model")
    r2 = evaluate(mlp, (x, y), attacks=[blind, FGSM(eps)], measure=False, sanity=False)
    assert r2["robust_accuracy"][blind.name] is None and blind.name in r2["not_applicable"]
    assert r2["robust_accuracy"][FGSM(eps).name] is not None and r2["no_input_gradient"] is False
    # an ordinary model is not flagged
    ok = evaluate(mlp, (x, y), attacks=[FGSM(eps)], measure=False, sanity=False)
    assert ok["no_input_gradient"] is False and ok["sanity"]["no_input_gradient"]["flagged"] is False


class Noisy(nn.Module):
    """Gaussian noise on the input, drawn from torch's default generator."""

    def __init__(self, inner, sigma=0.15):
        super().__init__()
        self.inner, self.sigma = inner, sigma

    def forward(self, x):
        return self.inner(x + self.sigma * torch.randn_like(x))


class NoisyOwnGenerator(Noisy):
    """Draws from its own generator, exposed as ``generator`` so that the evaluation can seed it."""

    def __init__(self, inner, sigma=0.15):
        super().__init__(inner, sigma)
        self.generator = torch.Generator().manual_seed(1234)

    def forward(self, x):
        return self.inner(x + self.sigma * torch.randn(x.shape, generator=self.generator))


class NoisyNumpy(Noisy):
    """Noise from a numpy generator the evaluation cannot reach."""

    def __init__(self, inner, sigma=0.15):
        super().__init__(inner, sigma)
        self.rng = np.random.default_rng()

    def forward(self, x):
        noise = torch.from_numpy(self.rng.standard_normal(x.shape).astype(np.float32))
        return self.inner(x + self.sigma * noise)


def test_eot_gradient_is_the_mean_of_single_sample_gradients(mlp, digits):
    x, y = digits[2][:16], digits[3][:16]
    model = Noisy(mlp).eval()
    torch.manual_seed(5)
    g_eot, logits, loss = loss_and_gradient(EOT(model, 4), x, y, ce_loss)
    torch.manual_seed(5)
    singles = [loss_and_gradient(model, x, y, ce_loss) for _ in range(4)]
    assert torch.allclose(g_eot, sum(s[0] for s in singles) / 4, atol=1e-6)
    assert torch.allclose(loss, sum(s[2] for s in singles) / 4, atol=1e-6)
    assert not torch.allclose(singles[0][0], singles[1][0])  # the samples really differ


def test_randomised_model_record_is_consistent_with_its_member_statistics(mlp, digits):
    x, y = digits[2][:96], digits[3][:96]
    model = Noisy(mlp).eval()
    eps = 0.1
    ens = preset("standard", eps, steps=5, n_queries=40, n_target_classes=2)
    pgd = PGD(eps, 5)
    kw = dict(attacks=[ens, pgd], measure=False, eot_samples=4, votes=5, batch_size=48)
    r = evaluate(model, (x, y), **kw)
    assert r["randomised"] == {"forward": True, "treated": True, "eot_samples": 4,
                               "scoring": "majority vote over 5 forward passes", "noise": "seeded"}
    assert "randomised_forward" in r["sanity_flags"]  # the flag is kept
    # the sanity probes get the same treatment (EOT gradients, voted scores)
    assert set(r["sanity"]["more_iterations_weaker"]["value"]["probe"]) == {"PGD-10 EOT-4 Linf eps=0.1",
                                                                            "PGD-40 EOT-4 Linf eps=0.1"}
    members = r["ensembles"][ens.name]["members"]
    after = [m["robust_accuracy_after"] for m in members]
    assert after == sorted(after, reverse=True)
    assert r["robust_accuracy"][ens.name] == after[-1]  # the record is the ensemble's own verdict
    assert sum(m["fooled"] for m in members) == r["counts"]["clean_correct"] - r["counts"]["robust_correct"][ens.name]
    assert r["worst_case_robust_accuracy"] <= min(r["robust_accuracy"].values())
    # the noise is seeded per batch from the evaluation seed: the same call gives the same record
    assert r["randomness"]["repeatable"] is True
    assert strip(evaluate(model, (x, y), **kw)) == strip(r)
    # the EOT attack is not weaker than the same attack on single noisy gradients
    single = evaluate(model, (x, y), attacks=[pgd], measure=False, sanity=False, eot_samples=1, votes=5)
    assert r["robust_accuracy"][pgd.name] <= single["robust_accuracy"][pgd.name] + 3 / len(y)


def test_model_generators_are_seeded_and_unreachable_noise_is_reported(mlp, digits):
    x, y = digits[2][:48], digits[3][:48]
    kw = dict(attacks=[PGD(0.1, 3)], measure=False, sanity=False, eot_samples=2, votes=3)
    own = NoisyOwnGenerator(mlp).eval()
    a, b = evaluate(own, (x, y), **kw), evaluate(own, (x, y), **kw)
    assert a["randomised"]["noise"] == "seeded" and strip(a) == strip(b)
    r = evaluate(NoisyNumpy(mlp).eval(), (x, y), **kw)
    assert r["randomised"]["noise"] == "uncontrolled" and r["randomness"]["repeatable"] is False
    assert "differ" in r["randomness"]["model"]
    det = evaluate(mlp, (x, y), **kw)
    assert det["randomised"]["forward"] is False and det["randomised"]["scoring"] == "one forward pass"
    assert det["randomness"]["repeatable"] is True


def test_vote_predictor(mlp, digits):
    x = digits[2][:64]
    model = Noisy(mlp, sigma=0.05).eval()
    with torch.no_grad():
        clean = mlp(x).argmax(1)
    for scoring in ("majority", "expectation"):
        pred = Predictor(True, scoring, votes=15)(model, x)
        assert float((pred == clean).float().mean()) >= 0.9  # small noise: the vote recovers the clean label
    with pytest.raises(ValueError, match="scoring"):
        Predictor(True, "mean")
    with pytest.raises(ValueError, match="votes"):
        Predictor(True, votes=0)
    with pytest.raises(ValueError, match="eot_samples"):
        evaluate(mlp, (x, digits[3][:64]), eot_samples=0)
