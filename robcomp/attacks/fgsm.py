"""Fast Gradient Sign Method (Goodfellow et al., 2015): one step of size eps.

L-inf: ``x + eps * sign(grad)``; L2 (the "fast gradient method"): ``x + eps * grad / ||grad||``.
Then the projection onto the ball intersected with [0, 1]. Deterministic (no random start).
"""
from __future__ import annotations

from robcomp.attacks.base import Attack, _flat_norm, ce_loss, check_eps, check_norm, input_gradient, project


class FGSM(Attack):
    def __init__(self, eps: float, norm: str = "Linf") -> None:
        self.norm = check_norm(norm)
        self.eps = check_eps(eps, self.norm)

    @property
    def name(self) -> str:
        return f"FGSM {self.norm} eps={self.eps:g}"

    def perturb(self, model, x, y):
        grad, _ = input_gradient(model, x, y, ce_loss)
        step = grad.sign() if self.norm == "Linf" else grad / (_flat_norm(grad) + 1e-12)
        return project(x + self.eps * step, x, self.eps, self.norm)
