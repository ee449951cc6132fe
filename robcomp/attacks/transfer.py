"""Transfer attack: craft adversarial examples on a *source* model (e.g. the dense parent of a
compressed model, or a differentiable twin) and evaluate them on the target.

The target's gradients are never used, so gradient masking in the target cannot hide it: when a
transfer attack beats a white-box attack on the target, the white-box number is not trustworthy
(see the ``black_box_stronger`` sanity flag).
"""
from __future__ import annotations

import torch.nn as nn

from robcomp.attacks.base import Attack


class Transfer(Attack):
    kind = "transfer"

    def __init__(self, source: nn.Module, attack: Attack, source_name: str | None = None) -> None:
        if not isinstance(source, nn.Module):
            raise TypeError(f"source must be an nn.Module, got {type(source).__name__}")
        if not isinstance(attack, Attack):
            raise TypeError(f"attack must be a robcomp Attack, got {type(attack).__name__}")
        self.source = source.eval()
        self.attack = attack
        self.source_name = source_name or type(source).__name__
        self.eps, self.norm, self.seed = attack.eps, attack.norm, attack.seed

    @property
    def name(self) -> str:
        return f"Transfer[{self.attack.name}] from {self.source_name}"

    def perturb(self, model, x, y):
        try:
            device = next(self.source.parameters()).device
        except StopIteration:
            device = x.device
        if device != x.device:
            raise ValueError(f"the transfer source model is on {device} but the data is on {x.device}: "
                             "move the source model to the evaluation device")
        return self.attack(self.source, x, y, ids=self.ids, salt=self.salt)
