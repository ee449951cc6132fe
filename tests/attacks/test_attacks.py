"""Attacks: feasibility, boundary pixels, monotonicity in eps and steps, ensemble semantics,
keyed randomness, compressed models attacked through their compressed layers."""
import copy

import pytest
import torch
import torch.nn as nn

import robcomp
from robcomp.attacks import APGD, APGDT, FAB, FGSM, PGD, Ensemble, Square, Transfer, preset, project_l2
from robcomp.attacks.apgd import checkpoints
from robcomp.attacks.base import distance
from robcomp.compression.compress import compress
from robcomp.layers.linear import CompressedLinear



def robust_acc(model, x_adv, y):
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def tol(n):
    return max(0.01, 3.0 / n)


ALL = [FGSM(0.1), FGSM(0.5, norm="L2"), PGD(0.1, 5), PGD(0.8, 5, norm="L2"), PGD(0.1, 5, restarts=2, schedule="cosine"),
       PGD(0.1, 5, loss="dlr", schedule="step"), APGD(0.1, "ce", 8), APGD(0.1, "dlr", 8), APGD(0.8, "ce", 8, norm="L2"),
       APGDT(0.1, 8, n_target_classes=2), Square(0.1, 40), Square(0.8, 40, norm="L2"),
       FAB(0.1, 8), FAB(0.8, 8, norm="L2", targeted=True, n_target_classes=2), FAB(2.0, 8, norm="L1"),
       APGD(0.1, "ce", 4, eot_samples=2), preset("quick", 0.1)]


@pytest.mark.parametrize("attack", ALL, ids=lambda a: a.name)
def test_outputs_inside_ball_and_box(attack, mlp, digits):
    x, y = digits[2][:96], digits[3][:96]
    x_adv = attack(mlp, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(distance(x_adv, x, attack.norm).max()) <= attack.eps + 1e-5
    assert robust_acc(mlp, x_adv, y) <= robust_acc(mlp, x, y)


def test_pixels_at_0_and_1_are_attackable(mlp, digits):
    x, y = digits[2][:128].clone(), digits[3][:128]
    x[:, :, :, :2] = 1.0  # saturate some pixels at 1 as well (digits have many zeros already)
    xg = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(mlp(xg), y, reduction="sum").backward()
    g = xg.grad
    eps = 0.1
    for attack in (FGSM(eps), PGD(eps, steps=1, alpha=eps, random_start=False)):
        x_adv = attack(mlp, x, y)
        up = (x == 0) & (g > 0)
        down = (x == 1) & (g < 0)
        assert up.sum() > 100 and down.sum() > 10
        assert torch.allclose(x_adv[up], torch.full_like(x_adv[up], eps))
        assert torch.allclose(x_adv[down], torch.full_like(x_adv[down], 1 - eps))


def test_l2_projection_is_feasible_and_idempotent():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 8, 8, generator=gen)
    z = x + 3 * torch.randn(16, 1, 8, 8, generator=gen)
    p = project_l2(z, x, 1.0)
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    assert float((p - x).flatten(1).norm(dim=1).max()) <= 1.0 + 1e-5
    assert torch.allclose(project_l2(p, x, 1.0), p, atol=1e-6)
    q = project_l2(z, x, 1.0, iters=20)  # closer (or as close) to z than clip-then-rescale
    assert float((q - x).flatten(1).norm(dim=1).max()) <= 1.0 + 1e-5
    assert float((q - z).norm()) <= float((p - z).norm()) + 1e-4


def test_robust_accuracy_non_increasing_in_eps_and_chance_at_large_eps(mlp, digits):
    x, y = digits[2], digits[3]
    n = len(y)
    accs = [robust_acc(mlp, PGD(e, 10)(mlp, x, y), y) for e in (0.0, 0.03, 0.06, 0.1, 0.15, 0.25)]
    assert accs[0] > 0.9
    for a, b in zip(accs, accs[1:]):
        assert b <= a + tol(n), accs
    assert accs[-1] <= 0.1 + tol(n), accs  # chance is 1/10
    sq = [robust_acc(mlp, Square(e, 60)(mlp, x[:128], y[:128]), y[:128]) for e in (0.05, 0.1, 0.3)]
    assert sq[0] + tol(128) >= sq[1] >= sq[2] - tol(128)


def test_robust_accuracy_non_increasing_in_steps_and_restarts(mlp, digits):
    x, y = digits[2], digits[3]
    n = len(y)
    pgd = [robust_acc(mlp, PGD(0.08, s, alpha=0.02)(mlp, x, y), y) for s in (2, 5, 20)]
    for a, b in zip(pgd, pgd[1:]):
        assert b <= a + tol(n), pgd
    apgd = [robust_acc(mlp, APGD(0.08, "ce", s)(mlp, x, y), y) for s in (5, 25)]
    assert apgd[1] <= apgd[0] + tol(n), apgd
    # restarts run only on points not yet fooled and keep the strongest: never weaker
    r1 = PGD(0.08, 5, restarts=1)(mlp, x, y)
    r3 = PGD(0.08, 5, restarts=3)(mlp, x, y)
    with torch.no_grad():
        ok1, ok3 = mlp(r1).argmax(1) == y, mlp(r3).argmax(1) == y
    assert not (ok3 & ~ok1).any()


def test_ensemble_at_least_as_strong_as_each_member_per_example(mlp, digits):
    x, y = digits[2], digits[3]
    ens = preset("standard", 0.08, steps=10, n_queries=50, n_target_classes=3)
    ens.attacks.insert(0, PGD(0.08, 10))
    res = ens.run(mlp, x, y)
    assert (res.robust <= res.clean_ok).all()
    for member in ens.attacks:
        with torch.no_grad():
            alone = (mlp(member(mlp, x, y)).argmax(1) == y) & res.clean_ok
        # every example a member breaks on its own is broken by the ensemble
        assert not (res.robust & ~alone).any(), member.name
    with torch.no_grad():  # x_adv realises the worst case: it fools exactly the non-robust points
        assert torch.equal((mlp(res.x_adv).argmax(1) == y) & res.clean_ok, res.robust)
    stats = res.members
    assert [m["name"] for m in stats] == [a.name for a in ens.attacks]
    assert stats[0]["attacked"] == int(res.clean_ok.sum())
    assert stats[-1]["robust"] == int(res.robust.sum())
    assert sum(m["fooled"] for m in stats) == int(res.clean_ok.sum() - res.robust.sum())


def test_randomness_is_keyed_by_example_not_batch(mlp, digits):
    x, y = digits[2][:100], digits[3][:100]
    for attack in (PGD(0.1, 5), APGD(0.1, "ce", 6), Square(0.1, 30)):
        full = attack(mlp, x, y)
        a = attack(mlp, x[:37], y[:37], ids=torch.arange(37))
        b = attack(mlp, x[37:], y[37:], ids=torch.arange(37, 100))
        part = torch.cat([a, b])
        same = (full - part).flatten(1).abs().amax(1) < 1e-5
        assert same.float().mean() >= 0.97, attack.name  # float noise of batched matmuls aside
        assert torch.equal(attack(mlp, x, y), full)  # deterministic
    salted = PGD(0.1, 5)(mlp, x, y, salt=1)
    assert not torch.equal(salted, PGD(0.1, 5)(mlp, x, y))


def test_transfer_crafts_on_source(mlp, digits):
    x, y = digits[2][:128], digits[3][:128]
    target = copy.deepcopy(mlp)
    with torch.no_grad():
        target.head.bias.add_(0.01)
    inner = PGD(0.1, 10)
    t = Transfer(mlp, inner, source_name="dense")
    assert t.kind == "transfer" and t.eps == 0.1 and "dense" in t.name
    assert torch.equal(t(target, x, y), inner(mlp, x, y))
    assert t.to_dict()["attack"]["type"] == "PGD"


def test_apgd_checkpoints_follow_the_paper():
    c = checkpoints(100)
    assert c[0] == 22 and c[1] == 22 + 19 and all(b - a >= 6 for a, b in zip(c, c[1:])) and c[-1] <= 100


def test_input_validation(mlp, digits):
    x, y = digits[2][:8], digits[3][:8]
    with pytest.raises(ValueError, match="eps"):
        PGD(1.5)
    with pytest.raises(ValueError, match="steps"):
        PGD(0.1, 0)
    with pytest.raises(ValueError, match="schedule"):
        PGD(0.1, schedule="linear")
    with pytest.raises(ValueError, match="loss"):
        APGD(0.1, "hinge")
    with pytest.raises(ValueError, match="Linf"):
        Square(0.1, norm="L1")
    with pytest.raises(ValueError, match="norm"):
        FAB(0.1, norm="L3")
    with pytest.raises(ValueError, match="eot_samples"):
        APGD(0.1, eot_samples=0)
    with pytest.raises(ValueError, match="threat model"):
        Ensemble([FGSM(0.1), FGSM(0.2)])
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        FGSM(0.1)(mlp, x * 2 + 0.5, y)
    with pytest.raises(ValueError, match="examples"):
        FGSM(0.1)(mlp, x, y[:3])
    mlp.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            FGSM(0.1)(mlp, x, y)
    finally:
        mlp.eval()
    with pytest.raises(ValueError, match="preset"):
        preset("huge", 0.1)


def dense_twin(model):
    """The dense model holding exactly the compressed layers' (masked / dequantised) weights."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, CompressedLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, lin)
    return twin.eval()


@pytest.mark.parametrize("recipe", [robcomp.Sparse24(), robcomp.Int4WeightOnly(group_size=32)],
                         ids=lambda r: type(r).__name__)
def test_compressed_model_attacked_through_compressed_layers(recipe, mlp, digits):
    x, y = digits[2], digits[3]
    comp = compress(copy.deepcopy(mlp), recipe, backend="torch").eval()
    layers = [m for m in comp.modules() if isinstance(m, CompressedLinear)]
    assert layers, "the recipe compressed no layer"
    # the gradient flows through the compressed layer (its forward is part of the graph)
    xg = x[:4].clone().requires_grad_(True)
    comp(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    twin = dense_twin(comp)
    with torch.no_grad():
        assert torch.allclose(comp(x), twin(x), atol=1e-4)
    n = len(y)
    for attack in (FGSM(0.1), PGD(0.1, 10), APGD(0.1, "ce", 10)):
        xa, xb = attack(comp, x, y), attack(twin, x, y)
        close = (xa - xb).flatten(1).abs().amax(1) < 1e-4
        assert close.float().mean() >= 0.97, attack.name
        assert abs(robust_acc(comp, xa, y) - robust_acc(twin, xb, y)) <= 2 / n, attack.name


# AutoAttack's standard version, read off fra31/auto-attack (autoattack/autoattack.py: the
# attacks' constructors in AutoAttack.__init__, then set_version("standard") for Linf and L2;
# square.py and fab_base.py for the defaults they keep). Written out here, not imported, so the
# preset is checked against the reference and not against itself.
REFERENCE_STANDARD = [
    ("APGD", {"loss": "ce", "steps": 100, "restarts": 1, "rho": 0.75, "eot_samples": 1, "random_start": True}),
    ("APGDT", {"loss": "dlr", "steps": 100, "restarts": 1, "rho": 0.75, "n_target_classes": 9, "eot_samples": 1}),
    ("FAB", {"targeted": True, "steps": 100, "restarts": 1, "n_target_classes": 9, "alpha_max": 0.1, "eta": 1.05,
             "beta": 0.9}),
    ("Square", {"n_queries": 5000, "p_init": 0.8, "rescale_schedule": False}),
]
REFERENCE_RAND = [
    ("APGD", {"loss": "ce", "steps": 100, "restarts": 1, "rho": 0.75, "eot_samples": 20}),
    ("APGD", {"loss": "dlr", "steps": 100, "restarts": 1, "rho": 0.75, "eot_samples": 20}),
]


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_standard_and_rand_presets_are_autoattack_exactly(norm, eps):
    from robcomp.attacks import AUTOATTACK_RAND, AUTOATTACK_STANDARD

    for name, reference in (("standard", REFERENCE_STANDARD), ("rand", REFERENCE_RAND)):
        ens = preset(name, eps, norm=norm, seed=3)
        assert [type(a).__name__ for a in ens.attacks] == [t for t, _ in reference], name
        for attack, (_, params) in zip(ens.attacks, reference):
            assert (attack.norm, attack.eps, attack.seed) == (norm, eps, 3)
            for key, value in params.items():
                assert getattr(attack, key) == value, (name, attack.name, key)
    # the documented tables say the same
    assert AUTOATTACK_STANDARD["order"] == ("apgd-ce", "apgd-t", "fab-t", "square")
    for key, (_, params) in zip(AUTOATTACK_STANDARD["order"], REFERENCE_STANDARD):
        for k, v in params.items():
            if k in AUTOATTACK_STANDARD[key]:
                assert AUTOATTACK_STANDARD[key][k] == v, (key, k)
    assert AUTOATTACK_RAND["apgd-ce"]["eot_samples"] == AUTOATTACK_RAND["apgd-dlr"]["eot_samples"] == 20
    assert [type(a).__name__ for a in preset("quick", eps, norm=norm).attacks] == ["FGSM", "PGD"]
    full = preset("full", eps, norm=norm)
    assert {"FAB", "Square", "APGDT"} <= {type(a).__name__ for a in full.attacks}


def test_square_schedule_with_and_without_rescaling():
    from robcomp.attacks.square import p_selection

    # AutoAttack (rescale off): halved after 10, 50, 200, 500, 1000, 2000, 4000 queries
    got = [p_selection(0.8, it, 5000, rescale=False) for it in (0, 10, 11, 50, 51, 200, 201, 4000, 4001)]
    assert got == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.8 / 64, 0.8 / 128]
    # rescaled: the same fractions of a 10000-query run
    assert p_selection(0.8, 2, 1000) == 0.4 and p_selection(0.8, 801, 1000) == 0.8 / 512


def test_l2_square_keeps_the_norm_and_finds_adversarials(mlp, digits):
    x, y = digits[2][:96], digits[3][:96]
    eps = 1.0
    x_adv = Square(eps, 200, norm="L2", rescale_schedule=False)(mlp, x, y)
    d = distance(x_adv, x, "L2")
    assert float(d.max()) <= eps + 1e-5
    assert robust_acc(mlp, x_adv, y) < robust_acc(mlp, x, y) - 0.2
    # a perturbation of norm eps is used in full wherever the box allows it
    assert float(d.median()) > 0.9 * eps
