"""Expectation over transformation (Athalye et al. 2018) for randomised models.

``EOT(model, samples=20)`` is the model itself (its forward is one random forward of ``model``),
marked so that every white-box attack averages its input gradient -- and the logits and loss it
keeps the strongest iterate by -- over ``samples`` independent forwards
(:func:`robcomp.attacks.base.loss_and_gradient`). This is AutoAttack's ``eot_iter`` (20 in its
``rand`` version), available to every gradient attack (FGSM, PGD, APGD, APGD-T, FAB) at once.
"""
from __future__ import annotations

import torch.nn as nn

from robcomp.inputs import check_positive_int

__all__ = ["EOT"]


class EOT(nn.Module):
    def __init__(self, model: nn.Module, samples: int = 20) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.eot_samples = check_positive_int("samples", samples)
        self.train(model.training)

    def forward(self, x):
        return self.model(x)
