"""Adversarial attacks: configured once, called as ``attack(model, x, y) -> x_adv``."""
from robcomp.attacks.base import Attack, project_linf
from robcomp.attacks.fgsm import FGSM
from robcomp.attacks.pgd import PGD

__all__ = ["Attack", "FGSM", "PGD", "project_linf"]
