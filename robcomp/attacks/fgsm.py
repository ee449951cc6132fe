"""Fast Gradient Sign Method (Goodfellow et al., 2015): one L-inf step of size eps."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robcomp.attacks.base import Attack, check_eps, input_gradient, project_linf


class FGSM(Attack):
    def __init__(self, eps: float) -> None:
        self.eps = check_eps(eps)

    @property
    def name(self) -> str:
        return f"FGSM Linf eps={self.eps:g}"

    def perturb(self, model, x, y):
        grad, _ = input_gradient(model, x, y, lambda z, t: F.cross_entropy(z, t, reduction="none"))
        return project_linf(x + self.eps * grad.sign(), x, self.eps)
