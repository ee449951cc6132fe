"""Attack interface, feasible-set projections, losses and keyed randomness shared by every attack.

An attack is configured once and called as ``attack(model, x, y) -> x_adv`` with ``x`` in [0, 1].
``x_adv`` lies in the threat model's ball around ``x`` intersected with [0, 1]. The model must be
in eval mode (a randomised or training-mode forward makes robust accuracy meaningless).

Randomness is *keyed*, not drawn from a global stream: every random number an attack uses is a
hash of ``(seed, example id, stream, element)``. Example ids default to ``0..n-1``; the evaluation
loop passes global indices. An example therefore gets the same random start, the same Square
windows, whatever batch it lands in, whichever shard evaluates it, whether the run was resumed,
and whether an ensemble runs the attack on all points or only on the still-robust ones.

Gradients are taken at the iterate itself (a fresh leaf, no clamp between the leaf and the
model), and the projection is applied to the *step*, so a pixel at 0 or 1 keeps its gradient and
moves inwards whenever the gradient points inwards.
"""
from __future__ import annotations

import abc
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from robcomp.inputs import check_images, check_labels
from robcomp.outputs import with_logits

__all__ = ["Attack", "project_linf", "project_l2", "project", "input_gradient", "keyed_uniform",
           "ce_loss", "dlr_loss", "dlr_targeted_loss", "margin", "check_attack_inputs", "check_eps",
           "LOSSES", "NORMS", "NoInputGradient", "has_input_gradient", "loss_and_gradient",
           "logits_and_jacobian", "eot_samples"]

NORMS = ("Linf", "L2")


def check_attack_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("model is in training mode: call model.eval() before attacking it")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    if x.numel() == 0:
        raise ValueError("x is an empty batch")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    check_images(x)  # NaN passes the range test below
    check_labels(y, x.shape[0])
    if x.min() < 0 or x.max() > 1:
        raise ValueError("x must lie in [0, 1] (the model normalises its inputs itself)")


def check_eps(eps: float, norm: str = "Linf") -> float:
    upper = 1.0 if norm == "Linf" else float("inf")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps <= upper:
        raise ValueError(f"eps must be a number in [0, {upper:g}] for the {norm} threat model, got {eps!r}")
    return float(eps)


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


# ------------------------------------------------------------------------------- projections
def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Projection onto {|x_adv - x|_inf <= eps} intersected with [0, 1] (exact: the set is a box)."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _flat_norm(d: torch.Tensor) -> torch.Tensor:
    return d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float, iters: int = 0) -> torch.Tensor:
    """Projection onto {||x_adv - x||_2 <= eps} intersected with [0, 1].

    The intersection of a ball and a box has no closed-form projection; ``iters=0`` does the
    standard clip-then-rescale (the result is feasible: rescaling towards ``x`` keeps it inside
    the box because ``x`` is). ``iters > 0`` runs alternating projections (Dykstra) for a point
    closer to the exact projection.
    """
    d = x_adv - x
    if iters <= 0:
        d = (x + d).clamp(0.0, 1.0) - x
        n = _flat_norm(d)
        return x + d * torch.clamp(eps / (n + 1e-12), max=1.0)
    p = torch.zeros_like(d)
    q = torch.zeros_like(d)
    z = x_adv
    for _ in range(iters):
        u = (z + p).clamp(0.0, 1.0)
        p = z + p - u
        v = u + q - x
        v = x + v * torch.clamp(eps / (_flat_norm(v) + 1e-12), max=1.0)
        q = u + q - v
        z = v
    return project_l2(z, x, eps)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "Linf") -> torch.Tensor:
    return project_linf(x_adv, x, eps) if norm == "Linf" else project_l2(x_adv, x, eps)


def distance(x_adv: torch.Tensor, x: torch.Tensor, norm: str = "Linf") -> torch.Tensor:
    """Per-example distance in the threat model's norm (``"Linf"``, ``"L2"`` or ``"L1"``)."""
    d = (x_adv - x).flatten(1)
    if norm == "Linf":
        return d.abs().amax(1)
    return d.abs().sum(1) if norm == "L1" else d.norm(dim=1)


# ------------------------------------------------------------------------------- losses
def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{i != y} z_i``: positive while the example is classified correctly."""
    zy = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return zy - other


def ce_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example cross-entropy (untargeted: maximised). Targeted: minus CE towards ``target``."""
    if target is not None:
        return -F.cross_entropy(logits, target, reduction="none")
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020), to be maximised.

    Untargeted: ``-(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)``; targeted (``target`` given):
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, with ``z_pi`` the sorted logits. Invariant to
    shifting and scaling the logits, so a model cannot hide behind large or saturated logits.
    """
    if target is not None:
        return dlr_targeted_loss(logits, y, target)
    srt = logits.sort(dim=1, descending=True).values
    zy = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = srt[:, 0] == zy
    other = torch.where(top_is_y, srt[:, 1], srt[:, 0])
    return -(zy - other) / (srt[:, 0] - srt[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] < 4:
        raise ValueError("the targeted DLR loss needs at least 4 classes")
    srt = logits.sort(dim=1, descending=True).values
    zy = logits.gather(1, y[:, None]).squeeze(1)
    zt = logits.gather(1, target[:, None]).squeeze(1)
    return -(zy - zt) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)


LOSSES: dict[str, Callable] = {"ce": ce_loss, "dlr": dlr_loss}


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``loss_fn(model(x), y)`` (summed over the batch) w.r.t. ``x``, and the logits.

    ``x`` is a fresh leaf: the gradient is taken at the point itself, so a pixel at 0 or 1 still
    gets its gradient (no clamp sits between the leaf and the model).
    """
    grad, logits, _ = loss_and_gradient(model, x, y, loss_fn)
    return grad, logits


class NoInputGradient(RuntimeError):
    """The model's output does not depend differentiably on its input (e.g. preprocessing under
    ``torch.no_grad()``, ``.detach()``, a numpy round trip): white-box attacks do not apply."""


def eot_samples(model: nn.Module) -> int:
    """Forwards a gradient is averaged over: ``model.eot_samples`` (see :class:`robcomp.attacks.EOT`), else 1."""
    return int(getattr(model, "eot_samples", 1))


def _grad_or_raise(out: torch.Tensor, x: torch.Tensor, **kw) -> torch.Tensor:
    if not out.requires_grad:
        raise NoInputGradient("the model's output has no gradient with respect to its input "
                              "(is its forward, or part of it, under torch.no_grad() or detached?)")
    (grad,) = torch.autograd.grad(out, x, allow_unused=True, **kw)
    if grad is None:
        raise NoInputGradient("the model's output does not depend differentiably on its input")
    return grad


def loss_and_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input gradient of the summed per-example loss, the logits and the per-example loss.

    For a model with ``eot_samples = k > 1`` (expectation over transformation) the gradient, logits
    and loss are the means over ``k`` forwards. Raises :class:`NoInputGradient` when the loss does
    not depend differentiably on ``x``.
    """
    k = eot_samples(model)
    grad = logits_sum = loss_sum = None
    for _ in range(k):
        xl = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xl)
            loss = loss_fn(logits, y)
            g = _grad_or_raise(loss.sum(), xl)
        grad = g if grad is None else grad + g
        logits_sum = logits.detach() if logits_sum is None else logits_sum + logits.detach()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    if k == 1:
        return grad, logits_sum, loss_sum
    return grad / k, logits_sum / k, loss_sum / k


def logits_and_jacobian(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, K]`` and their input Jacobian ``[N, K, *x.shape[1:]]`` (one backward pass per
    class; EOT means as in :func:`loss_and_gradient`)."""
    k = eot_samples(model)
    logits_sum = jac_sum = None
    for _ in range(k):
        xl = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xl)
            rows = []
            for c in range(logits.shape[1]):
                rows.append(_grad_or_raise(logits[:, c].sum(), xl, retain_graph=c + 1 < logits.shape[1]))
        jac = torch.stack(rows, 1)
        logits_sum = logits.detach() if logits_sum is None else logits_sum + logits.detach()
        jac_sum = jac if jac_sum is None else jac_sum + jac
    return logits_sum / k, jac_sum / k


def has_input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the cross-entropy of ``model`` has an input gradient at ``(x, y)`` (a NaN gradient
    still counts as one; the ``nan_gradients`` sanity flag reports it)."""
    try:
        loss_and_gradient(model, x, y, ce_loss)
    except NoInputGradient:
        return False
    return True


# ------------------------------------------------------------------------------- randomness
_M = (1 << 64) - 1


def _wrap(v: int) -> int:
    v &= _M
    return v - (1 << 64) if v >> 63 else v


_C1, _C2, _C3 = _wrap(0x9E3779B97F4A7C15), _wrap(0xBF58476D1CE4E5B9), _wrap(0x94D049BB133111EB)
_MASK53 = (1 << 53) - 1


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 (wrapping arithmetic; logical shifts emulated with masks)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _C2
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _C3
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def keyed_uniform(seed: int, ids: torch.Tensor, stream: int, shape: tuple[int, ...], *,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) numbers of shape ``(len(ids), *shape)``, a pure function of
    ``(seed, id, stream, position)``: independent of batch composition, device and global RNG."""
    ids = ids.to(device=device if device is not None else ids.device, dtype=torch.int64)
    n = 1
    for s in shape:
        n *= int(s)
    key = _mix(torch.tensor(_wrap(seed * 0x2545F4914F6CDD1D + stream * 0x632BE59BD9B4E019 + 0x1234567),
                            dtype=torch.int64, device=ids.device))
    base = _mix(ids * _C1 + key)
    z = _mix(base[:, None] + torch.arange(n, device=ids.device, dtype=torch.int64)[None, :] * _C1)
    u = ((z >> 11) & _MASK53).to(torch.float64) * (1.0 / (1 << 53))
    return u.to(dtype).view(len(ids), *shape)


class Attack(abc.ABC):
    """Base class: ``name`` labels results, ``eps`` is the threat-model radius, ``norm`` its norm.

    Subclasses implement :meth:`perturb`; inside it :attr:`ids` (the examples' ids) and
    :attr:`active_seed` key the randomness (:meth:`uniform`).
    """

    norm: str = "Linf"
    eps: float
    seed: int = 0
    #: "white-box" (uses input gradients of the attacked model), "black-box" (scores only) or
    #: "transfer" (gradients of another model)
    kind: str = "white-box"
    #: forwards each input gradient is averaged over (expectation over transformation, for
    #: randomised models); > 1 wraps the model in :class:`robcomp.attacks.EOT` for the call
    eot_samples: int = 1

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Label used in records, e.g. ``PGD-10 Linf eps=0.1``."""

    @abc.abstractmethod
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return adversarial examples for a validated batch."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 ids: torch.Tensor | None = None, salt: int = 0) -> torch.Tensor:
        """Attack ``model`` at ``(x, y)``. ``ids`` (one int per example), ``self.seed`` and
        ``salt`` (the evaluation's seed) key the randomness; by default ids are ``0..n-1``."""
        return self.run_keyed(self.perturb, model, x, y, ids=ids, salt=salt).detach()

    def run_keyed(self, fn, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                  ids: torch.Tensor | None = None, salt: int = 0):
        """Validate the inputs and call ``fn(model, x, y)`` with :attr:`ids` and :attr:`active_seed` set."""
        check_attack_inputs(model, x, y)
        if ids is None:
            ids = torch.arange(x.shape[0])
        elif len(ids) != x.shape[0]:
            raise ValueError(f"ids has {len(ids)} entries for {x.shape[0]} examples")
        self.ids = torch.as_tensor(ids, dtype=torch.int64).to(x.device)
        self.salt = int(salt)
        self.active_seed = int(self.seed) + 1_000_003 * self.salt
        if self.eot_samples > eot_samples(model):
            from robcomp.attacks.eot import EOT

            model = EOT(model, self.eot_samples)
        model = with_logits(model)  # a ModelOutput / dict / tuple forward: attack its logits
        try:
            return fn(model, x, y)
        finally:
            del self.ids, self.active_seed, self.salt

    # keyed random numbers for the examples being attacked
    def uniform(self, x: torch.Tensor, stream: int, shape: tuple[int, ...] | None = None,
                ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = getattr(self, "ids", None) if ids is None else ids
        if ids is None:
            ids = torch.arange(x.shape[0], device=x.device)
        seed = getattr(self, "active_seed", self.seed)
        return keyed_uniform(seed, ids, stream, tuple(x.shape[1:]) if shape is None else shape,
                             device=x.device, dtype=x.dtype)

    def random_init(self, x: torch.Tensor, stream: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """A random point of the feasible set around ``x`` (uniform in the L-inf box; for L2 a
        Gaussian direction scaled to a radius uniform in [0, eps])."""
        u = self.uniform(x, stream, ids=ids)
        if self.norm == "Linf":
            return project_linf(x + self.eps * (2 * u - 1), x, self.eps)
        # Box-Muller from two keyed uniforms
        u2 = self.uniform(x, stream + 7919, ids=ids)
        g = torch.sqrt(-2 * torch.log(u.clamp_min(1e-12))) * torch.cos(2 * torch.pi * u2)
        r = self.uniform(x, stream + 104729, shape=(1,), ids=ids).view(-1, *([1] * (x.dim() - 1)))
        d = g / (_flat_norm(g) + 1e-12) * r * self.eps
        return project_l2(x + d, x, self.eps)

    def to_dict(self) -> dict:
        out = {"name": self.name, "type": type(self).__name__, "norm": self.norm, "kind": self.kind}
        for k, v in vars(self).items():
            if k.startswith("_") or k in ("ids", "active_seed", "salt"):
                continue
            if isinstance(v, (int, float, str, bool)) or v is None:
                out[k] = v
            elif isinstance(v, (list, tuple)) and all(isinstance(e, (int, float, str, bool)) for e in v):
                out[k] = list(v)
            elif isinstance(v, Attack):
                out[k] = v.to_dict()
            elif isinstance(v, nn.Module):
                out[k] = type(v).__name__
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
