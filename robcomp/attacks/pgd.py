"""Projected Gradient Descent (Madry et al., 2018) under the L-inf threat model.

Random start in the eps ball, ``steps`` signed-gradient steps of size ``alpha`` (default
2.5 * eps / steps), projection onto the ball intersected with [0, 1] after every step. Per example
the attack keeps the first point found that is misclassified (the strongest iterate is returned,
not merely the last one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robcomp.attacks.base import Attack, check_eps, input_gradient, project_linf


class PGD(Attack):
    def __init__(self, eps: float, steps: int = 10, alpha: float | None = None,
                 random_start: bool = True, seed: int = 0) -> None:
        self.eps = check_eps(eps)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.steps = steps
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / steps
        if self.alpha <= 0 and self.eps > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        self.random_start = bool(random_start)
        self.seed = int(seed)

    @property
    def name(self) -> str:
        return f"PGD-{self.steps} Linf eps={self.eps:g}"

    def perturb(self, model, x, y):
        loss = lambda z, t: F.cross_entropy(z, t, reduction="none")  # noqa: E731
        x_adv = x.clone()
        if self.random_start and self.eps > 0:
            gen = torch.Generator(device=x.device).manual_seed(self.seed)
            noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1
            x_adv = project_linf(x + self.eps * noise, x, self.eps)
        best = x_adv.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            grad, logits = input_gradient(model, x_adv, y, loss)
            newly = (logits.argmax(-1) != y) & ~fooled
            best[newly] = x_adv[newly]
            fooled |= newly
            x_adv = project_linf(x_adv + self.alpha * grad.sign(), x, self.eps)
        with torch.no_grad():
            last_fooled = model(x_adv).argmax(-1) != y
        keep_last = ~fooled | last_fooled
        best[keep_last] = x_adv[keep_last]
        return best
