"""AutoAttack-style ensemble runner and the attack presets.

:class:`Ensemble` runs its member attacks in order, each only on the points that are still robust
(classified correctly clean and under every earlier member). Per example the result is the worst
case: an example counts as robust only if no member fooled it, and ``x_adv`` is the first
successful adversarial example (or the last member's output when none succeeded). The runner
records, per member, the robust accuracy after it (cumulative, as AutoAttack prints it), the
number of points it fooled that earlier members had not, the number of points it attacked, and
its time.

Scoring goes through ``predict(model, x) -> labels`` (default: the argmax of one forward); the
evaluation passes a majority vote for randomised models, so that the member statistics and the
ensemble's verdict are one and the same count. With ``white_box=False`` (a model without input
gradients) white-box members are skipped and marked ``applicable: False``.

Presets (:func:`preset`, documented against AutoAttack in docs/evaluation.md):

* ``quick``    -- FGSM, PGD-10 (smoke tests, training-time monitoring);
* ``standard`` -- AutoAttack's ``standard`` version exactly: APGD-CE (100 iterations, 1 restart),
  APGD-T (100 iterations, 9 targets, 1 restart), FAB-T (100 iterations, 9 targets, 1 restart),
  Square (5000 queries, p_init 0.8, un-rescaled schedule); L-inf and L2;
* ``rand``     -- AutoAttack's ``rand`` version for randomised defenses: APGD-CE and APGD-DLR,
  100 iterations, 1 restart, the gradient averaged over 20 forwards (EOT);
* ``full``     -- FGSM, PGD-50 (5 restarts, cosine steps), APGD-CE (5 restarts), APGD-DLR
  (5 restarts), APGD-T, FAB-T, Square-5000 with 5 restarts' worth of queries (25000).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from robcomp.attacks.apgd import APGD, APGDT
from robcomp.attacks.base import Attack, check_attack_inputs
from robcomp.attacks.fab import FAB
from robcomp.attacks.fgsm import FGSM
from robcomp.attacks.pgd import PGD
from robcomp.attacks.square import Square
from robcomp.outputs import with_logits

__all__ = ["Ensemble", "EnsembleResult", "preset", "PRESETS", "AUTOATTACK_STANDARD", "AUTOATTACK_RAND"]

PRESETS = ("quick", "standard", "rand", "full")

#: AutoAttack's ``standard`` version (fra31/auto-attack, ``AutoAttack.__init__`` and
#: ``set_version("standard")``, L-inf and L2): the reference values the ``standard`` preset uses.
AUTOATTACK_STANDARD = {
    "order": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "apgd-ce": {"steps": 100, "restarts": 1, "rho": 0.75, "loss": "ce", "eot_samples": 1},
    "apgd-t": {"steps": 100, "restarts": 1, "rho": 0.75, "loss": "dlr", "n_target_classes": 9, "eot_samples": 1},
    "fab-t": {"steps": 100, "restarts": 1, "n_target_classes": 9, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9},
    "square": {"n_queries": 5000, "p_init": 0.8, "restarts": 1, "rescale_schedule": False, "loss": "margin"},
}
#: AutoAttack's ``rand`` version (``set_version("rand")``).
AUTOATTACK_RAND = {
    "order": ("apgd-ce", "apgd-dlr"),
    "apgd-ce": {"steps": 100, "restarts": 1, "rho": 0.75, "loss": "ce", "eot_samples": 20},
    "apgd-dlr": {"steps": 100, "restarts": 1, "rho": 0.75, "loss": "dlr", "eot_samples": 20},
}


@dataclass
class EnsembleResult:
    x_adv: torch.Tensor
    clean_ok: torch.Tensor
    robust: torch.Tensor  # per example: correct clean and under every member
    members: list[dict] = field(default_factory=list)  # name, kind, applicable, attacked, fooled, robust, time_s


@torch.no_grad()
def argmax_predict(model, x):
    return model(x).argmax(1)


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

    def run(self, model, x, y, *, ids=None, salt: int = 0, clean_ok: torch.Tensor | None = None,
            predict=None, white_box: bool = True) -> EnsembleResult:
        """Run the members on the still-robust points; return adversarial examples and statistics.

        ``predict(model, x) -> labels`` scores every candidate (default: argmax of one forward);
        ``white_box=False`` skips the white-box members (a model without input gradients)."""
        check_attack_inputs(model, x, y)
        model = with_logits(model)  # a ModelOutput / dict / tuple forward: attack its logits
        predict = predict or argmax_predict
        if ids is None:
            ids = torch.arange(x.shape[0], device=x.device)
        ids = torch.as_tensor(ids, dtype=torch.int64).to(x.device)
        if clean_ok is None:
            clean_ok = predict(model, x) == y
        robust = clean_ok.clone()
        x_adv = x.clone()
        members = []
        for attack in self.attacks:
            applicable = white_box or attack.kind != "white-box"
            todo = robust.nonzero().squeeze(1) if applicable else robust.nonzero()[:0, 0]
            t0 = time.perf_counter()
            fooled = 0
            if todo.numel():
                xa = attack(model, x[todo], y[todo], ids=ids[todo], salt=salt)
                ok = predict(model, xa) == y[todo]
                x_adv[todo] = xa  # robust points keep the latest (strongest-effort) candidate
                robust[todo[~ok]] = False
                fooled = int((~ok).sum())
            members.append({"name": attack.name, "kind": attack.kind, "applicable": applicable,
                            "attacked": int(todo.numel()), "fooled": fooled, "robust": int(robust.sum()),
                            "time_s": time.perf_counter() - t0})
        return EnsembleResult(x_adv, clean_ok, robust, members)

    def perturb(self, model, x, y):
        return self.run(model, x, y, ids=self.ids, salt=self.salt).x_adv

    def to_dict(self) -> dict:
        return {"name": self.name, "type": "Ensemble", "norm": self.norm, "eps": self.eps, "kind": self.kind,
                "members": [a.to_dict() for a in self.attacks]}


def preset(name: str, eps: float, *, norm: str = "Linf", seed: int = 0, steps: int | None = None,
           n_queries: int | None = None, n_target_classes: int = 9) -> Ensemble:
    """An :class:`Ensemble` for a named preset (``quick``, ``standard``, ``rand``, ``full``).

    ``steps`` and ``n_queries`` override the iteration and query budgets (for smoke tests);
    ``n_target_classes`` the targets of APGD-T and FAB-T. Without overrides ``standard`` and
    ``rand`` are AutoAttack's versions of the same name (:data:`AUTOATTACK_STANDARD`,
    :data:`AUTOATTACK_RAND`).
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    if name == "quick":
        attacks = [FGSM(eps, norm=norm), PGD(eps, steps=steps or 10, norm=norm, seed=seed)]
    elif name == "standard":
        ref = AUTOATTACK_STANDARD
        ce, apt, fab, sq = ref["apgd-ce"], ref["apgd-t"], ref["fab-t"], ref["square"]
        attacks = [APGD(eps, ce["loss"], steps or ce["steps"], norm=norm, restarts=ce["restarts"], rho=ce["rho"],
                        seed=seed),
                   APGDT(eps, steps or apt["steps"], n_target_classes=n_target_classes, norm=norm,
                         restarts=apt["restarts"], rho=apt["rho"], seed=seed),
                   FAB(eps, steps or fab["steps"], norm=norm, targeted=True, n_target_classes=n_target_classes,
                       restarts=fab["restarts"], alpha_max=fab["alpha_max"], eta=fab["eta"], beta=fab["beta"],
                       seed=seed),
                   Square(eps, n_queries or sq["n_queries"], sq["p_init"], norm=norm,
                          rescale_schedule=sq["rescale_schedule"], seed=seed)]
    elif name == "rand":
        attacks = [APGD(eps, spec["loss"], steps or spec["steps"], norm=norm, restarts=spec["restarts"],
                        rho=spec["rho"], eot_samples=spec["eot_samples"], seed=seed)
                   for spec in (AUTOATTACK_RAND["apgd-ce"], AUTOATTACK_RAND["apgd-dlr"])]
    else:
        s = steps or 100
        attacks = [FGSM(eps, norm=norm),
                   PGD(eps, steps=max(s // 2, 1), norm=norm, restarts=5, schedule="cosine", seed=seed,
                       alpha=0.5 * eps if norm == "Linf" else None),
                   APGD(eps, "ce", s, norm=norm, restarts=5, seed=seed),
                   APGD(eps, "dlr", s, norm=norm, restarts=5, seed=seed),
                   APGDT(eps, s, n_target_classes=n_target_classes, norm=norm, seed=seed),
                   FAB(eps, s, norm=norm, targeted=True, n_target_classes=n_target_classes, seed=seed),
                   Square(eps, n_queries or 25000, norm=norm, rescale_schedule=False, seed=seed)]
    return Ensemble(attacks, name=f"{name} preset")
