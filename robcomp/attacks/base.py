"""Attack interface and the feasible-set projection shared by every attack.

An attack is configured once and called as ``attack(model, x, y) -> x_adv`` with ``x`` in [0, 1].
``x_adv`` lies in the threat model's ball around ``x`` intersected with [0, 1]. The model must be
in eval mode (a randomised or training-mode forward makes robust accuracy meaningless).
"""
from __future__ import annotations

import abc

import torch
import torch.nn as nn


def check_attack_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("model is in training mode: call model.eval() before attacking it")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    if x.numel() == 0:
        raise ValueError("x is an empty batch")
    if x.min() < 0 or x.max() > 1:
        raise ValueError("x must lie in [0, 1] (the model normalises its inputs itself)")


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Projection onto {|x_adv - x|_inf <= eps} intersected with [0, 1] (exact: the set is a box)."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``loss_fn(model(x), y)`` (summed over the batch) w.r.t. ``x``, and the logits.

    ``x`` is a fresh leaf: the gradient is taken at the point itself, so a pixel at 0 or 1 still
    gets its gradient (no clamp sits between the leaf and the model).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = loss_fn(logits, y).sum()
        (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


class Attack(abc.ABC):
    """Base class: ``name`` labels results, ``eps`` is the threat-model radius."""

    norm: str = "Linf"
    eps: float

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Label used in records, e.g. ``PGD-10 Linf eps=0.1``."""

    @abc.abstractmethod
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return adversarial examples for a validated batch."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_attack_inputs(model, x, y)
        return self.perturb(model, x, y).detach()

    def to_dict(self) -> dict:
        return {"name": self.name, "type": type(self).__name__, "norm": self.norm, **vars(self)}


def check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be a number in [0, 1], got {eps!r}")
    return float(eps)
