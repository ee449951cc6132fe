"""Training: standard and PGD adversarial training (Madry et al., 2018), seeded and deterministic
on CPU, with an on-disk cache of trained checkpoints (see ``robcomp.study.checkpoints``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from robcomp.attacks.pgd import PGD

__all__ = ["TrainConfig", "train", "accuracy"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``adversarial`` trains on PGD examples of radius ``eps`` (L-inf)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    adversarial: bool = False
    eps: float = 0.1
    pgd_steps: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "pgd_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.eps <= 1:
            raise ValueError(f"eps must be in [0, 1], got {self.eps!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def scaled(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += (model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(len(x), 1)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig = TrainConfig(), *,
          desc: str = "train", progress: bool = True, loss_fn=None, step_hook=None) -> nn.Module:
    """Train ``model`` in place with Adam and a cosine schedule; returns it in eval mode.

    ``loss_fn(model, xb, yb) -> loss`` replaces cross-entropy (``xb`` is the PGD batch when
    ``config.adversarial``; called in train mode), e.g. TRADES in ``robcomp.training.adversarial``.
    ``step_hook(model)`` runs after every optimiser step (e.g. to re-project masks).

    Only parameters that require gradients are updated (compressed layers' packed weights are
    buffers, so fine-tuning a compressed model updates biases, norms and uncompressed layers).
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameter")
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (len(x) + config.batch_size - 1) // config.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.epochs * steps_per_epoch)
    attack = PGD(config.eps, steps=config.pgd_steps, seed=config.seed) if config.adversarial else None
    for epoch in tqdm(range(config.epochs), desc=desc, disable=not progress, leave=False):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), config.batch_size):
            idx = order[i:i + config.batch_size]
            xb, yb = x[idx].to(next(model.parameters()).device), y[idx].to(next(model.parameters()).device)
            if attack is not None:
                model.eval()  # craft examples with fixed normalisation statistics
                attack.seed = config.seed * 100003 + epoch * 1009 + i
                xb = attack(model, xb, yb)
            model.train()
            loss = F.cross_entropy(model(xb), yb) if loss_fn is None else loss_fn(model, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step_hook is not None:
                step_hook(model)
    return model.eval()
