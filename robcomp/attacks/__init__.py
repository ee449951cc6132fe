"""Adversarial attacks: configured once, called as ``attack(model, x, y) -> x_adv``.

``x`` in [0, 1]; ``x_adv`` inside the threat model's ball intersected with [0, 1]; model in eval
mode. See ``docs/evaluation.md`` for the attacks, the ensemble runner and its presets.
"""
from robcomp.attacks.apgd import APGD, APGDT
from robcomp.attacks.base import (Attack, NoInputGradient, has_input_gradient, keyed_uniform, project, project_l2,
                                  project_linf)
from robcomp.attacks.ensemble import AUTOATTACK_RAND, AUTOATTACK_STANDARD, PRESETS, Ensemble, EnsembleResult, preset
from robcomp.attacks.eot import EOT
from robcomp.attacks.fab import FAB
from robcomp.attacks.fgsm import FGSM
from robcomp.attacks.pgd import PGD
from robcomp.attacks.square import Square
from robcomp.attacks.transfer import Transfer

__all__ = ["Attack", "FGSM", "PGD", "APGD", "APGDT", "FAB", "Square", "Transfer", "Ensemble", "EnsembleResult",
           "EOT", "preset", "PRESETS", "AUTOATTACK_STANDARD", "AUTOATTACK_RAND", "NoInputGradient",
           "has_input_gradient", "project", "project_linf", "project_l2", "keyed_uniform"]
