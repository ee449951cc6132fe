"""Auto-PGD (Croce & Hein, ICML 2020): step-size-free PGD with momentum, CE / DLR / targeted DLR.

Per run: the first step has size ``eta = 2 eps``; afterwards
``z = P(x_k + eta * dir(grad))`` and ``x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))``
(``dir`` = sign for L-inf, L2-normalised gradient for L2; ``P`` the projection onto the ball
intersected with [0, 1]). At checkpoints (first after 22% of the iterations, then spaced by 3%
less each time, at least 6%) the step size of an example is halved, and the example restarts from
its best point so far, when (1) the loss increased in at most ``rho`` (0.75) of the steps since the
last checkpoint, or (2) the step was not halved at the last checkpoint and the best loss has not
improved since. Everything is per example.

Losses: ``"ce"`` (cross-entropy), ``"dlr"`` (difference of logits ratio, scale invariant).
:class:`APGDT` is the targeted version (APGD-T): for each of the ``n_target_classes`` most likely
wrong classes of the clean input in turn, maximise the targeted DLR loss, only on the points that
no earlier target fooled. Restarts likewise run only on points not yet fooled.

Returned per example: the strongest iterate over all steps, restarts and targets (a
misclassified one when found, else the highest loss).
"""
from __future__ import annotations

import torch

from robcomp.attacks.base import Attack, _flat_norm, ce_loss, check_eps, check_norm, dlr_loss, loss_and_gradient, project
from robcomp.attacks.pgd import keep_strongest, run_restarts
from robcomp.inputs import check_positive_int

_LOSSES = {"ce": ce_loss, "dlr": dlr_loss}


def checkpoints(steps: int) -> list[int]:
    """Iterations (1-based counts of steps taken) after which the step-size conditions are checked."""
    out, k, t = [], max(int(0.22 * steps), 1), 0
    decr, kmin = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    while t + k <= steps:
        t += k
        out.append(t)
        k = max(k - decr, kmin)
    return out


class APGD(Attack):
    def __init__(self, eps: float, loss: str = "ce", steps: int = 100, *, norm: str = "Linf", restarts: int = 1,
                 rho: float = 0.75, random_start: bool = True, seed: int = 0, eot_samples: int = 1) -> None:
        self.norm = check_norm(norm)
        self.eps = check_eps(eps, self.norm)
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {sorted(_LOSSES)}, got {loss!r}")
        self.loss = loss
        self.steps = check_positive_int("steps", steps)
        self.restarts = check_positive_int("restarts", restarts)
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho must be in (0, 1], got {rho!r}")
        self.rho = float(rho)
        self.random_start = bool(random_start)
        self.seed = int(seed)
        self.eot_samples = check_positive_int("eot_samples", eot_samples)

    @property
    def label(self) -> str:
        return f"APGD-{self.loss.upper()}"

    @property
    def _suffix(self) -> str:
        restarts = f" x{self.restarts}" if self.restarts > 1 else ""
        return restarts + (f" EOT-{self.eot_samples}" if self.eot_samples > 1 else "")

    @property
    def name(self) -> str:
        return f"{self.label}-{self.steps}{self._suffix} {self.norm} eps={self.eps:g}"

    def _loss_fn(self, target):
        fn = _LOSSES[self.loss]
        return (lambda z, t: fn(z, t)) if target is None else (lambda z, t: fn(z, t, target))

    def _dir(self, grad):
        return grad.sign() if self.norm == "Linf" else grad / (_flat_norm(grad) + 1e-12)

    def _run(self, model, x, y, ids, stream, target=None):
        loss_fn = self._loss_fn(target)
        n, shape = x.shape[0], (-1,) + (1,) * (x.dim() - 1)
        x_adv = self.random_init(x, stream, ids=ids) if self.random_start and self.eps > 0 else x.clone()
        eta = torch.full((n,), 2.0 * self.eps, device=x.device, dtype=x.dtype)
        grad, logits, loss = loss_and_gradient(model, x_adv, y, loss_fn)
        best = x_adv.clone()
        best_score = torch.full((n,), float("-inf"), device=x.device, dtype=x.dtype)
        fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
        # the "fooled" bookkeeping is always about the true label; for targeted runs the score is
        # the targeted loss, which is what the run maximises
        keep_strongest(x_adv, logits, loss, y, best, best_score, fooled)
        x_max, grad_max, loss_max = x_adv.clone(), grad.clone(), loss.clone()
        loss_prev, n_incr = loss.clone(), torch.zeros(n, device=x.device)
        loss_max_last = loss_max.clone()
        reduced_last = torch.zeros(n, dtype=torch.bool, device=x.device)
        checks, since = set(checkpoints(self.steps)), 0
        x_prev = x_adv
        for k in range(self.steps):
            momentum = x_adv - x_prev
            x_prev = x_adv
            z = project(x_adv + eta.view(shape) * self._dir(grad), x, self.eps, self.norm)
            if k > 0:
                z = project(x_adv + 0.75 * (z - x_adv) + 0.25 * momentum, x, self.eps, self.norm)
            x_adv = z
            grad, logits, loss = loss_and_gradient(model, x_adv, y, loss_fn)
            keep_strongest(x_adv, logits, loss, y, best, best_score, fooled)
            n_incr += (loss > loss_prev).to(n_incr.dtype)
            loss_prev = loss
            up = loss > loss_max
            x_max = torch.where(up.view(shape), x_adv, x_max)
            grad_max = torch.where(up.view(shape), grad, grad_max)
            loss_max = torch.where(up, loss, loss_max)
            since += 1
            if k + 1 in checks:
                oscillating = n_incr <= self.rho * since
                stalled = ~reduced_last & (loss_max_last >= loss_max)
                reduce = oscillating | stalled
                reduced_last, loss_max_last = reduce, loss_max.clone()
                eta = torch.where(reduce, eta / 2, eta)
                x_adv = torch.where(reduce.view(shape), x_max, x_adv)
                grad = torch.where(reduce.view(shape), grad_max, grad)
                n_incr.zero_()
                since = 0
        return best, fooled, best_score

    def perturb(self, model, x, y):
        def run_one(model, xs, ys, ids, r, idx):
            return self._run(model, xs, ys, ids, r)

        best, _, _ = run_restarts(self, model, x, y, self.restarts, run_one)
        return best


class APGDT(APGD):
    """APGD-T: targeted DLR loss against the ``n_target_classes`` most likely wrong classes."""

    def __init__(self, eps: float, steps: int = 100, *, n_target_classes: int = 9, norm: str = "Linf",
                 restarts: int = 1, rho: float = 0.75, random_start: bool = True, seed: int = 0,
                 loss: str = "dlr", eot_samples: int = 1) -> None:
        super().__init__(eps, loss, steps, norm=norm, restarts=restarts, rho=rho, random_start=random_start,
                         seed=seed, eot_samples=eot_samples)
        self.n_target_classes = check_positive_int("n_target_classes", n_target_classes)

    @property
    def label(self) -> str:
        return "APGD-T" if self.loss == "dlr" else f"APGD-T-{self.loss.upper()}"

    @property
    def name(self) -> str:
        return f"{self.label}-{self.steps}{self._suffix} ({self.n_target_classes} targets) {self.norm} eps={self.eps:g}"

    def perturb(self, model, x, y):
        with torch.no_grad():
            logits = model(x)
        n_classes = logits.shape[1]
        if self.loss == "dlr" and n_classes < 4:
            raise ValueError("APGD-T with the DLR loss needs at least 4 classes")
        if self.n_target_classes > n_classes - 1:
            raise ValueError(f"n_target_classes={self.n_target_classes}, but the model has {n_classes} classes: "
                             f"at most {n_classes - 1} wrong classes can be targeted")
        n_targets = self.n_target_classes
        order = logits.argsort(dim=1, descending=True)
        # the most likely classes other than the true one, in order
        wrong = order[order != y[:, None]].view(x.shape[0], n_classes - 1)

        def run_one(model, xs, ys, ids, r, idx):
            target = wrong[idx, r // self.restarts]
            return self._run(model, xs, ys, ids, r, target=target)

        best, _, _ = run_restarts(self, model, x, y, n_targets * self.restarts, run_one)
        return best
