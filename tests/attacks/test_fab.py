"""FAB: the hyperplane-and-box projection against linear programs, minimal perturbations of
FAB-T on a linear model against the exact minimum (one LP or QP per wrong class), and FAB-T
against PGD on a small CNN."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.optimize import linprog, minimize

from robcomp.attacks import FAB, PGD
from robcomp.attacks.base import distance
from robcomp.attacks.boundary import project_onto_hyperplane
from robcomp.training.train import TrainConfig, train
from robcomp.zoo.models import build_model


def lp_min_norm(A_ub, b_ub, A_eq, b_eq, lo, hi, norm):
    """min ||d||_inf or ||d||_1 subject to A_ub d <= b_ub, A_eq d = b_eq, lo <= d <= hi (None: infeasible)."""
    D = len(lo)
    bounds = list(zip(lo, hi))
    if norm == "Linf":  # variables (d, s)
        c = np.r_[np.zeros(D), 1.0]
        box = np.vstack([np.c_[np.eye(D), -np.ones(D)], np.c_[-np.eye(D), -np.ones(D)]])
        pad = lambda A: np.c_[A, np.zeros(len(A))]  # noqa: E731
        bounds += [(0, None)]
    else:  # variables (d, s) with |d_i| <= s_i
        c = np.r_[np.zeros(D), np.ones(D)]
        box = np.vstack([np.c_[np.eye(D), -np.eye(D)], np.c_[-np.eye(D), -np.eye(D)]])
        pad = lambda A: np.c_[A, np.zeros((len(A), D))]  # noqa: E731
        bounds += [(0, None)] * D
    A = box if A_ub is None else np.vstack([pad(A_ub), box])
    b = np.zeros(len(box)) if b_ub is None else np.r_[b_ub, np.zeros(len(box))]
    res = linprog(c, A_ub=A, b_ub=b, A_eq=None if A_eq is None else pad(A_eq), b_eq=b_eq, bounds=bounds)
    return res.fun if res.status == 0 else None


def qp_min_l2(A_ub, b_ub, lo, hi):
    """min ||d||_2 subject to A_ub d <= b_ub, lo <= d <= hi: a convex QP, solved by SLSQP (None: no solution)."""
    res = minimize(lambda d: d @ d, np.zeros(len(lo)), jac=lambda d: 2 * d, method="SLSQP",
                   constraints=[{"type": "ineq", "fun": lambda d: b_ub - A_ub @ d, "jac": lambda d: -A_ub}],
                   bounds=list(zip(lo, hi)), options={"ftol": 1e-14, "maxiter": 500})
    ok = res.success and (b_ub - A_ub @ res.x).min() > -1e-9
    return float(np.sqrt(res.fun)) if ok else None


def l2_min_norm(t, w, r):
    """min ||d||_2 s.t. w.d = r, -t <= d <= 1 - t: d = clip(lam w), lam by bisection (None: infeasible)."""
    lo, hi = -t, 1 - t
    f = lambda lam: np.clip(lam * w, lo, hi) @ w - r  # noqa: E731  (monotone in lam)
    a, b = -1e6, 1e6
    if f(a) > 0 or f(b) < 0:
        return None
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (a, mid) if f(mid) > 0 else (mid, b)
    return float(np.linalg.norm(np.clip(a * w, lo, hi)))


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
@pytest.mark.parametrize("dim", [1, 13, 64])
def test_projection_is_the_minimal_step_onto_the_plane_in_the_box(norm, dim):
    g = torch.Generator().manual_seed(dim)
    B = 24
    t = torch.rand(B, dim, generator=g, dtype=torch.float64)
    t[:, : dim // 4] = torch.randint(0, 2, (B, dim // 4), generator=g).double()  # points on the box faces
    w = torch.randn(B, dim, generator=g, dtype=torch.float64)
    w[0, : max(dim // 3, 1) - (dim == 1)] = 0.0  # some zero weights
    b = (w * t).sum(1) + 0.6 * torch.randn(B, generator=g, dtype=torch.float64) * w.abs().sum(1).sqrt()
    d = project_onto_hyperplane(t, w, b, norm)
    assert torch.isfinite(d).all()
    z = t + d
    assert float(z.min()) >= -1e-12 and float(z.max()) <= 1 + 1e-12
    checked = 0
    for i in range(B):
        ti, wi, ri = t[i].numpy(), w[i].numpy(), float(b[i] - w[i] @ t[i])
        if norm == "L2":
            ref = l2_min_norm(ti, wi, ri)
        else:
            ref = lp_min_norm(None, None, wi[None], [ri], -ti, 1 - ti, norm)
        if ref is None:  # the box does not reach the plane: go as far towards it as the box allows
            toward = np.sign(ri) * np.sign(wi)
            corner = np.where(toward > 0, 1 - ti, np.where(toward < 0, -ti, 0.0))
            np.testing.assert_allclose(d[i].numpy(), corner, atol=1e-12)
            continue
        checked += 1
        assert abs(float(w[i] @ z[i] - b[i])) <= 1e-9 * (1 + abs(float(b[i])))
        got = float(distance(d[i:i + 1], torch.zeros_like(d[i:i + 1]), norm))
        assert got == pytest.approx(ref, rel=1e-7, abs=1e-10), (i, norm)
    assert checked >= B // 3


@pytest.fixture(scope="module")
def linear(digits):
    xtr, ytr, x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    model = model.double().eval()
    x = x.double()
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return model, x[ok][:12], y[ok][:12]


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_fab_t_finds_the_exact_minimal_perturbation_of_a_linear_model(linear, norm):
    model, x, y = linear
    if norm == "L2":  # the QPs are the slow part: fewer points
        x, y = x[:6], y[:6]
    W, c = model[1].weight.detach().numpy(), model[1].bias.detach().numpy()
    exact = []
    for xi, yi in zip(x.flatten(1).numpy(), y.tolist()):
        best = np.inf
        for t in range(10):  # the region where class t wins is a polytope: one LP (QP for L2) per wrong class
            if t == yi:
                continue
            others = [k for k in range(10) if k != t]
            A = np.stack([W[k] - W[t] for k in others])
            bb = np.array([(W[t] - W[k]) @ xi + c[t] - c[k] for k in others])
            v = qp_min_l2(A, bb, -xi, 1 - xi) if norm == "L2" else lp_min_norm(A, bb, None, None, -xi, 1 - xi, norm)
            best = min(best, v if v is not None else np.inf)
        exact.append(best)
    exact = torch.tensor(exact, dtype=torch.float64)
    x_min, dist = FAB({"Linf": 0.3, "L2": 1.0, "L1": 5.0}[norm], 10, norm=norm, targeted=True).minimal(model, x, y)
    with torch.no_grad():
        assert (model(x_min).argmax(1) != y).all()  # every point is fooled
    assert torch.allclose(distance(x_min, x, norm), dist)
    ratio = dist / exact
    assert float(ratio.min()) >= 1 - 1e-6, ratio  # never below the true minimum (a wrong check would be)
    assert float(ratio.max()) <= 1.02, ratio  # and within 2% of it (FAB overshoots by eta = 1.05, then backs off)


@pytest.fixture(scope="module")
def cnn(digits):
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    return train(build_model("cnn", 8), xtr, ytr, TrainConfig(epochs=4, seed=0), progress=False).eval()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_fab_t_perturbations_no_larger_than_pgd_at_the_same_success_rate(cnn, digits, norm):
    x, y = digits[2][:128], digits[3][:128]
    with torch.no_grad():
        ok = cnn(x).argmax(1) == y
    fab = FAB(0.1 if norm == "Linf" else 1.0, 10, norm=norm, targeted=True, n_target_classes=9)
    _, dist = fab.minimal(cnn, x, y)
    d = dist[ok]
    assert torch.isfinite(d).all()
    n = int(ok.sum())
    for q in (0.25, 0.5, 0.75):
        eps = float(d.quantile(q))
        fab_rate = float((d <= eps).float().mean())
        x_pgd = PGD(eps, 20, norm=norm)(cnn, x, y)
        with torch.no_grad():
            pgd_rate = float((cnn(x_pgd[ok]).argmax(1) != y[ok]).float().mean())
        # at the radius where FAB-T fools a fraction q, PGD-20 does not fool more
        assert fab_rate >= pgd_rate - max(0.01, 3 / n), (q, eps, fab_rate, pgd_rate)
    # as an attack, FAB-T returns its examples inside the ball, the clean point elsewhere
    eps = float(d.median())
    x_adv = FAB(eps, 10, norm=norm, targeted=True)(cnn, x, y)
    assert float(distance(x_adv, x, norm).max()) <= eps + 1e-6
    with torch.no_grad():
        fooled = (cnn(x_adv).argmax(1) != y) & ok
    assert abs(float(fooled.sum()) - float((d <= eps).sum())) <= 2
