"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020): minimal Lp adversarial
examples (L-inf, L2, L1), untargeted or targeted (FAB-T, as in AutoAttack's standard set).

Each step linearises the decision boundary at the iterate ``x_k``: untargeted, the class ``l``
whose linearised boundary ``z_l - z_y = 0`` is nearest (distance ``|f_l| / ||grad f_l||_dual``);
targeted, the boundary against the target class. It computes the minimal-norm step onto that
hyperplane inside [0, 1] from ``x_k`` (``d1``) and from the original point ``x0`` (``d2``)
(:mod:`robcomp.attacks.boundary`), and moves to the biased combination
``((x_k + eta d1) (1 - a) + (x0 + eta d2) a).clip(0, 1)`` with ``a = min(|d1| / (|d1| + |d2|), alpha_max)``
(``eta = 1.05`` overshoots the boundary). When the iterate is adversarial it is recorded if it
is the closest found so far, and pulled back towards ``x0``: ``x0 + beta (x_k - x0)``
(``beta = 0.9``). Restart 0 starts at ``x0``; further restarts at ``x0 + eps / 2 * v / ||v||``
for a keyed random ``v``. Targeted: for the ``n_target_classes`` most likely wrong classes of the
clean input in turn, each run only on the points no earlier run fooled within ``eps``.

As an :class:`Attack`, FAB returns the closest adversarial example found when it lies within
``eps`` (else the clean point, which is inside the ball); :meth:`FAB.minimal` returns the closest
adversarial example at any distance, with its distance. Only clean-correct points are attacked.
"""
from __future__ import annotations

import math

import torch

from robcomp.attacks.base import Attack, check_eps, distance, logits_and_jacobian, loss_and_gradient
from robcomp.attacks.boundary import project_onto_hyperplane
from robcomp.inputs import check_positive_int

FAB_NORMS = ("Linf", "L2", "L1")


def _dual_norm(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Dual norm over the trailing dimensions of ``g [N, K, D]``."""
    if norm == "Linf":
        return g.abs().sum(-1)
    if norm == "L2":
        return g.norm(dim=-1)
    return g.abs().amax(-1)


class FAB(Attack):
    def __init__(self, eps: float, steps: int = 100, *, norm: str = "Linf", targeted: bool = False,
                 n_target_classes: int = 9, restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, seed: int = 0) -> None:
        if norm not in FAB_NORMS:
            raise ValueError(f"norm must be one of {FAB_NORMS}, got {norm!r}")
        self.norm = norm
        self.eps = check_eps(eps, norm)
        self.steps = check_positive_int("steps", steps)
        self.targeted = bool(targeted)
        self.n_target_classes = check_positive_int("n_target_classes", n_target_classes)
        self.restarts = check_positive_int("restarts", restarts)
        if not 0.0 <= alpha_max <= 1.0:
            raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max!r}")
        if not eta >= 1.0:
            raise ValueError(f"eta (overshoot) must be >= 1, got {eta!r}")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta (backward step) must be in (0, 1], got {beta!r}")
        self.alpha_max, self.eta, self.beta = float(alpha_max), float(eta), float(beta)
        self.seed = int(seed)

    @property
    def name(self) -> str:
        restarts = f" x{self.restarts}" if self.restarts > 1 else ""
        if self.targeted:
            return f"FAB-T-{self.steps}{restarts} ({self.n_target_classes} targets) {self.norm} eps={self.eps:g}"
        return f"FAB-{self.steps}{restarts} {self.norm} eps={self.eps:g}"

    # ------------------------------------------------------------------ one run
    def _start(self, x0, ids, stream):
        """``x0 + eps/2 * v/||v||`` with ``v`` keyed: uniform in [-1, 1] (L-inf), Gaussian (L2, L1)."""
        u = self.uniform(x0, stream, ids=ids)
        if self.norm == "Linf":
            v = 2 * u - 1
        else:  # Box-Muller from two keyed uniforms
            u2 = self.uniform(x0, stream + 7919, ids=ids)
            v = torch.sqrt(-2 * torch.log(u.clamp_min(1e-12))) * torch.cos(2 * math.pi * u2)
        size = distance(v, torch.zeros_like(v), self.norm).clamp_min(1e-12).view(-1, *([1] * (x0.dim() - 1)))
        return (x0 + 0.5 * self.eps * v / size).clamp(0.0, 1.0)

    def _boundary(self, model, x1, y, target):
        """``(f, g)``: value and input gradient of the linearised boundary function to reach (< 0 now)."""
        n = x1.shape[0]
        rows = torch.arange(n, device=x1.device)
        if target is not None:
            def diff(z, yy):
                return z.gather(1, target[:, None]).squeeze(1) - z.gather(1, yy[:, None]).squeeze(1)

            g, _, f = loss_and_gradient(model, x1, y, diff)
            return f, g.flatten(1)
        logits, jac = logits_and_jacobian(model, x1)
        jac = jac.flatten(2)
        df = logits - logits[rows, y][:, None]
        dg = jac - jac[rows, y][:, None]
        df[rows, y] = float("inf")  # the true class is not a boundary
        dist = df.abs() / (_dual_norm(dg, self.norm) + 1e-12)
        nearest = dist.argmin(1)
        return df[rows, nearest], dg[rows, nearest]

    def _run(self, model, x0, y, ids, stream, random_start, target=None):
        n, shape = x0.shape[0], (-1,) + (1,) * (x0.dim() - 1)
        x1 = self._start(x0, ids, stream) if random_start else x0.clone()
        flat0 = x0.flatten(1)
        best = x0.clone()
        best_d = torch.full((n,), float("inf"), device=x0.device, dtype=x0.dtype)
        for _ in range(self.steps):
            f, w = self._boundary(model, x1, y, target)
            b = (w * x1.flatten(1)).sum(1) - f
            d = project_onto_hyperplane(torch.cat([x1.flatten(1), flat0]), torch.cat([w, w]), torch.cat([b, b]),
                                        self.norm)
            d1, d2 = d[:n].view_as(x0), d[n:].view_as(x0)
            zero = torch.zeros_like(x0)
            a1 = distance(d1, zero, self.norm).clamp_min(1e-8)
            a2 = distance(d2, zero, self.norm).clamp_min(1e-8)
            alpha = (a1 / (a1 + a2)).clamp(0.0, self.alpha_max).view(shape)
            x1 = ((x1 + self.eta * d1) * (1 - alpha) + (x0 + self.eta * d2) * alpha).clamp(0.0, 1.0)
            with torch.no_grad():
                adv = model(x1).argmax(1) != y
            dist = distance(x1, x0, self.norm)
            closer = adv & (dist < best_d)
            best = torch.where(closer.view(shape), x1, best)
            best_d = torch.where(closer, dist, best_d)
            x1 = torch.where(adv.view(shape), x0 + self.beta * (x1 - x0), x1)
        return best, best_d

    # ------------------------------------------------------------------ all runs
    def _search(self, model, x, y, stop_within: float | None):
        """Closest adversarial examples over all targets and restarts. ``stop_within``: stop
        attacking a point once it is fooled within this distance (the attack); None: never."""
        ids = getattr(self, "ids", None)
        if ids is None:
            ids = torch.arange(x.shape[0], device=x.device)
        with torch.no_grad():
            logits = model(x)
        correct = logits.argmax(1) == y
        best, best_d = x.clone(), torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
        best_d[~correct] = 0.0
        n_classes = logits.shape[1]
        if self.targeted:
            order = logits.argsort(dim=1, descending=True)
            # rank 0 is the true class for a correctly classified point: targets are ranks 1, 2, ...
            targets = [order[:, 1 + t] for t in range(min(self.n_target_classes, n_classes - 1))]
        else:
            targets = [None]
        for ti, target in enumerate(targets):
            for r in range(self.restarts):
                todo = correct & (best_d > stop_within) if stop_within is not None else correct
                idx = todo.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return best, best_d
                xb, db = self._run(model, x[idx], y[idx], ids[idx], 1000 * ti + r, r > 0,
                                   None if target is None else target[idx])
                closer = db < best_d[idx]
                sel = idx[closer]
                best[sel] = xb[closer]
                best_d[sel] = db[closer]
        return best, best_d

    def minimal(self, model, x, y, *, ids=None, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Closest adversarial example found per point at any distance, and that distance (``inf``
        where none was found, 0 where the clean point is already misclassified)."""
        best, best_d = self.run_keyed(lambda m, xx, yy: self._search(m, xx, yy, None), model, x, y,
                                      ids=ids, salt=salt)
        return best.detach(), best_d

    def perturb(self, model, x, y):
        best, best_d = self._search(model, x, y, self.eps)
        inside = (best_d <= self.eps).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(inside, best, x)
