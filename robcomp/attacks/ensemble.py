"""AutoAttack-style ensemble runner and the attack presets.

:class:`Ensemble` runs its member attacks in order, each only on the points that are still robust
(classified correctly clean and under every earlier member). Per example the result is the worst
case: an example counts as robust only if no member fooled it, and ``x_adv`` is the first
successful adversarial example (or the last member's output when none succeeded). The runner
records, per member, the robust accuracy after it (cumulative, as AutoAttack prints it), the
number of points it fooled that earlier members had not, the number of points it attacked, and
its time.

Presets (:func:`preset`):

* ``quick``    -- FGSM, PGD-10 (smoke tests, training-time monitoring);
* ``standard`` -- APGD-CE, APGD-T (DLR, 9 targets), Square-5000 (AutoAttack's standard set,
  without FAB);
* ``full``     -- FGSM, PGD-50 (5 restarts, cosine steps), APGD-CE (5 restarts), APGD-DLR
  (5 restarts), APGD-T, Square-5000 (5 restarts' worth of queries: 25000).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from robcomp.attacks.apgd import APGD, APGDT
from robcomp.attacks.base import Attack, check_attack_inputs
from robcomp.attacks.fgsm import FGSM
from robcomp.attacks.pgd import PGD
from robcomp.attacks.square import Square

__all__ = ["Ensemble", "EnsembleResult", "preset", "PRESETS"]

PRESETS = ("quick", "standard", "full")


@dataclass
class EnsembleResult:
    x_adv: torch.Tensor
    clean_ok: torch.Tensor
    robust: torch.Tensor  # per example: correct clean and under every member
    members: list[dict] = field(default_factory=list)  # name, attacked, fooled, robust_after, time_s


class Ensemble(Attack):
    kind = "ensemble"

    def __init__(self, attacks, name: str | None = None) -> None:
        attacks = list(attacks)
        if not attacks:
            raise ValueError("attacks: an ensemble needs at least one attack")
        for a in attacks:
            if not isinstance(a, Attack):
                raise TypeError(f"attacks must hold robcomp attacks, got {type(a).__name__}")
        if len({(a.norm, a.eps) for a in attacks}) != 1:
            raise ValueError("every member of an ensemble must share one threat model (norm and eps), got "
                             + ", ".join(f"{a.norm} eps={a.eps:g}" for a in attacks))
        self.attacks = attacks
        self.eps, self.norm = attacks[0].eps, attacks[0].norm
        self.seed = 0
        self._label = name

    @property
    def name(self) -> str:
        label = self._label or "Ensemble[" + ", ".join(a.name.rsplit(" ", 2)[0] for a in self.attacks) + "]"
        return f"{label} {self.norm} eps={self.eps:g}"

    def run(self, model, x, y, *, ids=None, salt: int = 0, clean_ok: torch.Tensor | None = None) -> EnsembleResult:
        """Run the members on the still-robust points; return adversarial examples and statistics."""
        check_attack_inputs(model, x, y)
        if ids is None:
            ids = torch.arange(x.shape[0], device=x.device)
        ids = torch.as_tensor(ids, dtype=torch.int64).to(x.device)
        if clean_ok is None:
            with torch.no_grad():
                clean_ok = model(x).argmax(1) == y
        robust = clean_ok.clone()
        x_adv = x.clone()
        members = []
        for attack in self.attacks:
            todo = robust.nonzero().squeeze(1)
            t0 = time.perf_counter()
            fooled = 0
            if todo.numel():
                xa = attack(model, x[todo], y[todo], ids=ids[todo], salt=salt)
                with torch.no_grad():
                    ok = model(xa).argmax(1) == y[todo]
                x_adv[todo] = xa  # robust points keep the latest (strongest-effort) candidate
                robust[todo[~ok]] = False
                fooled = int((~ok).sum())
            members.append({"name": attack.name, "kind": attack.kind, "attacked": int(todo.numel()),
                            "fooled": fooled, "robust": int(robust.sum()),
                            "time_s": time.perf_counter() - t0})
        return EnsembleResult(x_adv, clean_ok, robust, members)

    def perturb(self, model, x, y):
        return self.run(model, x, y, ids=self.ids, salt=self.salt).x_adv

    def to_dict(self) -> dict:
        return {"name": self.name, "type": "Ensemble", "norm": self.norm, "eps": self.eps, "kind": self.kind,
                "members": [a.to_dict() for a in self.attacks]}


def preset(name: str, eps: float, *, norm: str = "Linf", seed: int = 0, steps: int | None = None,
           n_queries: int | None = None, n_target_classes: int = 9) -> Ensemble:
    """An :class:`Ensemble` for a named preset (``quick``, ``standard``, ``full``).

    ``steps`` and ``n_queries`` override the iteration and query budgets (for smoke tests).
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    sq = [] if norm != "Linf" else None
    if name == "quick":
        attacks = [FGSM(eps, norm=norm), PGD(eps, steps=steps or 10, norm=norm, seed=seed)]
    elif name == "standard":
        attacks = [APGD(eps, "ce", steps or 100, norm=norm, seed=seed),
                   APGDT(eps, steps or 100, n_target_classes=n_target_classes, norm=norm, seed=seed)]
        if sq is None:
            attacks.append(Square(eps, n_queries or 5000, seed=seed))
    else:
        s = steps or 100
        attacks = [FGSM(eps, norm=norm),
                   PGD(eps, steps=max(s // 2, 1), norm=norm, restarts=5, schedule="cosine", seed=seed,
                       alpha=0.5 * eps if norm == "Linf" else None),
                   APGD(eps, "ce", s, norm=norm, restarts=5, seed=seed),
                   APGD(eps, "dlr", s, norm=norm, restarts=5, seed=seed),
                   APGDT(eps, s, n_target_classes=n_target_classes, norm=norm, seed=seed)]
        if sq is None:
            attacks.append(Square(eps, n_queries or 25000, seed=seed))
    return Ensemble(attacks, name=f"{name} preset")
