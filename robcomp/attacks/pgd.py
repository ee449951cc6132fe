"""Projected Gradient Descent (Madry et al., 2018) under the L-inf or L2 threat model.

Per restart: a random start in the feasible set (or the clean point), ``steps`` gradient steps of
size ``alpha_t`` (signed gradient for L-inf, L2-normalised gradient for L2), each followed by the
projection onto the ball intersected with [0, 1]. ``schedule`` shapes ``alpha_t``: ``"constant"``,
``"cosine"`` (``alpha * (1 + cos(pi t / steps)) / 2``) or ``"step"`` (halved at 50% and 75% of the
steps). Restarts run only on the examples no earlier restart fooled.

Per example the attack returns the *strongest iterate* over all steps and restarts: a
misclassified iterate if any was found (the one with the highest loss among them), otherwise
the iterate with the highest loss -- not merely the last one. Every iterate, including the last,
is scored, at the cost of one extra forward pass per restart.
"""
from __future__ import annotations

import math

import torch

from robcomp.attacks.base import LOSSES, Attack, _flat_norm, check_eps, check_norm, loss_and_gradient, project
from robcomp.inputs import check_positive_int

SCHEDULES = ("constant", "cosine", "step")


def run_restarts(attack: Attack, model, x, y, runs: int, run_one):
    """Run ``run_one(model, x, y, ids, run, idx) -> (x_best, fooled, loss)`` ``runs`` times, each
    time only on the examples no earlier run fooled (``idx``: their positions in the batch); keep
    per example the strongest result (fooled beats not fooled, then the higher loss)."""
    ids = getattr(attack, "ids", None)
    if ids is None:
        ids = torch.arange(x.shape[0], device=x.device)
    everyone = torch.arange(x.shape[0], device=x.device)
    best, fooled, best_loss = run_one(model, x, y, ids, 0, everyone)
    for r in range(1, runs):
        todo = (~fooled).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        xb, fb, lb = run_one(model, x[todo], y[todo], ids[todo], r, todo)
        better = fb | (lb > best_loss[todo])
        sel = todo[better]
        best[sel] = xb[better]
        best_loss[sel] = lb[better]
        fooled[sel] = fb[better]
    return best, fooled, best_loss


def keep_strongest(x_cur, logits, loss, y, best, best_loss, fooled):
    """Update the per-example strongest iterate in place: fooled beats not fooled, then loss."""
    is_fool = logits.argmax(1) != y
    improve = (is_fool & ~fooled) | ((is_fool == fooled) & (loss > best_loss))
    shape = (-1,) + (1,) * (x_cur.dim() - 1)
    best.copy_(torch.where(improve.view(shape), x_cur, best))
    best_loss.copy_(torch.where(improve, loss, best_loss))
    fooled |= is_fool


class PGD(Attack):
    def __init__(self, eps: float, steps: int = 10, alpha: float | None = None, random_start: bool = True,
                 seed: int = 0, *, norm: str = "Linf", loss: str = "ce", restarts: int = 1,
                 schedule: str = "constant", eot_samples: int = 1) -> None:
        self.norm = check_norm(norm)
        self.eps = check_eps(eps, self.norm)
        self.steps = check_positive_int("steps", steps)
        # default: 2.5 eps / steps (Madry et al.); decaying schedules start twice as large
        self.alpha = float(alpha) if alpha is not None else (2.5 if schedule == "constant" else 5.0) * self.eps / steps
        if self.alpha <= 0 and self.eps > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        self.random_start = bool(random_start)
        self.seed = int(seed)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
        self.loss = loss
        self.restarts = check_positive_int("restarts", restarts)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.schedule = schedule
        self.eot_samples = check_positive_int("eot_samples", eot_samples)

    @property
    def name(self) -> str:
        parts = [f"PGD{'-' + self.loss.upper() if self.loss != 'ce' else ''}-{self.steps}"]
        if self.restarts > 1:
            parts.append(f"x{self.restarts}")
        if self.schedule != "constant":
            parts.append(self.schedule)
        if self.eot_samples > 1:
            parts.append(f"EOT-{self.eot_samples}")
        return " ".join(parts + [self.norm, f"eps={self.eps:g}"])

    def step_size(self, t: int) -> float:
        if self.schedule == "cosine":
            return self.alpha * 0.5 * (1 + math.cos(math.pi * t / self.steps))
        if self.schedule == "step":
            return self.alpha * (0.25 if t >= 0.75 * self.steps else 0.5 if t >= 0.5 * self.steps else 1.0)
        return self.alpha

    def _run_one(self, model, x, y, ids, restart, idx=None):
        loss_fn = LOSSES[self.loss]
        x_adv = self.random_init(x, restart, ids=ids) if self.random_start and self.eps > 0 else x.clone()
        best = x_adv.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=x.dtype)
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for t in range(self.steps):
            grad, logits, loss = loss_and_gradient(model, x_adv, y, loss_fn)
            keep_strongest(x_adv, logits, loss, y, best, best_loss, fooled)
            step = grad.sign() if self.norm == "Linf" else grad / (_flat_norm(grad) + 1e-12)
            x_adv = project(x_adv + self.step_size(t) * step, x, self.eps, self.norm)
        with torch.no_grad():
            logits = model(x_adv)
            keep_strongest(x_adv, logits, loss_fn(logits, y), y, best, best_loss, fooled)
        return best, fooled, best_loss

    def perturb(self, model, x, y):
        best, _, _ = run_restarts(self, model, x, y, self.restarts, self._run_one)
        return best
