"""Automatic sanity checks for adversarial evaluations: named flags that say when a robust-accuracy
figure should not be trusted (Carlini et al. 2019, "On Evaluating Adversarial Robustness";
Athalye et al. 2018, "Obfuscated Gradients Give a False Sense of Security").

Every check returns ``{"flagged": bool, "value": ..., "threshold": ..., "detail": str}``; a check
that could not run has ``flagged: None`` and says why. :data:`FLAGS` holds the one-line meaning of
each flag; docs/evaluation.md explains each in a paragraph.

* :func:`probe_model` runs small extra experiments on a subset of the data (repeat forwards,
  input gradients, PGD with more steps, PGD at a large epsilon);
* :func:`check_results` reads the results of the evaluation itself (attack against attack,
  perturbation sizes).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from robcomp.attacks.base import Attack, NoInputGradient, ce_loss, loss_and_gradient
from robcomp.attacks.pgd import PGD

__all__ = ["FLAGS", "probe_model", "check_results", "tolerance", "flagged_names", "no_input_gradient_flag"]

FLAGS = {
    "no_input_gradient": "the model's output has no input gradient: white-box attacks do not apply",
    "randomised_forward": "two forward passes on the same input give different outputs",
    "zero_gradients": "many examples have an input gradient that is exactly zero",
    "nan_gradients": "some input gradients are NaN or infinite",
    "softmax_outputs": "the model outputs probabilities (rows in [0, 1] summing to 1), not logits",
    "single_step_stronger": "FGSM finds lower robust accuracy than an iterative white-box attack at the same eps",
    "more_iterations_weaker": "more steps or restarts give a higher robust accuracy",
    "no_chance_at_large_eps": "robust accuracy does not fall to chance level at a large eps",
    "black_box_stronger": "a black-box or transfer attack beats the white-box attacks",
    "perturbation_outside_ball": "some adversarial examples lie outside the eps ball or outside [0, 1]",
}


def tolerance(n: int) -> float:
    """Noise allowance on a robust-accuracy difference measured on the same ``n`` examples."""
    return max(0.01, 3.0 / max(n, 1))


def _flag(flagged, value=None, threshold=None, detail: str = "") -> dict:
    return {"flagged": flagged, "value": value, "threshold": threshold, "detail": detail}


def _not_run(why: str) -> dict:
    return _flag(None, detail=f"not run: {why}")


def flagged_names(checks: dict) -> list[str]:
    return sorted(k for k, v in checks.items() if v.get("flagged"))


@torch.no_grad()
def _accuracy(model, x, y, predict=None) -> float:
    pred = predict(model, x) if predict is not None else model(x).argmax(1)
    return float((pred == y).float().mean())


def no_input_gradient_flag(gradient: bool | None, not_applicable: Sequence[str] = ()) -> dict:
    if gradient is None:
        return _not_run("the model was not probed")
    detail = ("the cross-entropy has no gradient with respect to the input (torch.no_grad, detach or a "
              "non-torch step in the forward)" if not gradient else "the input gradient exists")
    if not_applicable:
        detail += "; not applicable: " + ", ".join(not_applicable)
    return _flag(not gradient, None, None, detail)


def probe_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | None, norm: str = "Linf",
                steps: int = 10, large_eps: float | None = None, salt: int = 0, eot_samples: int = 1,
                predict=None) -> dict:
    """Experiments on ``(x, y)`` (keep it small: a hundred examples is plenty).

    For a randomised model the evaluation passes its treatment: the PGD probes average their
    gradients over ``eot_samples`` forwards and ``predict(model, x) -> labels`` scores them."""
    out: dict = {}
    n = x.shape[0]
    tol = tolerance(n)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    diff = float((a - b).abs().max())
    scale = float(a.abs().max()) + 1e-12
    out["randomised_forward"] = _flag(diff > 1e-5 * max(scale, 1.0), diff, 1e-5,
                                      "max |f(x) - f(x)| over two forward passes")
    probs = (a.min() >= 0) & (a.max() <= 1) & ((a.sum(1) - 1).abs().max() < 1e-3)
    out["softmax_outputs"] = _flag(bool(probs), None, None,
                                   "outputs are non-negative, at most 1 and sum to 1 per row" if bool(probs)
                                   else "outputs look like logits")
    try:
        grad, _, _ = loss_and_gradient(model, x, y, ce_loss)
    except NoInputGradient:
        out["no_input_gradient"] = no_input_gradient_flag(False)
        why = "the model has no input gradient"
        for k in ("nan_gradients", "zero_gradients", "more_iterations_weaker", "no_chance_at_large_eps"):
            out[k] = _not_run(why)
        return out
    out["no_input_gradient"] = no_input_gradient_flag(True)
    flat = grad.flatten(1)
    bad = ~torch.isfinite(flat).all(1)
    zero = (flat == 0).all(1)
    out["nan_gradients"] = _flag(bool(bad.any()), float(bad.float().mean()), 0.0,
                                 "fraction of examples with a NaN/inf input gradient")
    out["zero_gradients"] = _flag(bool(zero.float().mean() >= 0.05), float(zero.float().mean()), 0.05,
                                  "fraction of examples whose cross-entropy input gradient is exactly zero")
    if eps is None or eps <= 0:
        out["more_iterations_weaker"] = _not_run("no white-box attack with eps > 0 to probe")
        out["no_chance_at_large_eps"] = _not_run("no attack epsilon given")
        return out
    short = PGD(eps, steps=steps, norm=norm, seed=1, eot_samples=eot_samples)
    long = PGD(eps, steps=4 * steps, norm=norm, seed=1, eot_samples=eot_samples)
    acc_short = _accuracy(model, short(model, x, y, salt=salt), y, predict)
    acc_long = _accuracy(model, long(model, x, y, salt=salt), y, predict)
    out["more_iterations_weaker"] = _flag(acc_long > acc_short + tol, {short.name: acc_short, long.name: acc_long},
                                          tol, f"probe: {long.name} vs {short.name} on {n} examples")
    if large_eps is None:
        large_eps = 0.5 if norm == "Linf" else 0.5 * math.sqrt(x[0].numel())
    big = PGD(large_eps, steps=2 * steps, norm=norm, random_start=False, seed=1, eot_samples=eot_samples)
    acc_big = _accuracy(model, big(model, x, y, salt=salt), y, predict)
    chance = 1.0 / a.shape[1]
    out["no_chance_at_large_eps"] = _flag(acc_big > chance + tol, acc_big, chance + tol,
                                          f"{big.name} (no random start) accuracy vs chance 1/{a.shape[1]}")
    return out


def _family(attack: Attack) -> tuple:
    return (type(attack).__name__, attack.norm, attack.eps, getattr(attack, "loss", None),
            getattr(attack, "schedule", None), getattr(attack, "n_target_classes", None))


def check_results(attacks: Sequence[Attack], robust_accuracy: dict, n: int, *,
                  violations: dict | None = None, ensembles: dict | None = None) -> dict:
    """Flags read off the evaluation's own results (robust accuracy per attack name)."""
    from robcomp.attacks.ensemble import Ensemble

    tol = tolerance(n)
    out: dict = {}
    # attacks that did not apply (None: e.g. white-box on a model without input gradients) are left out
    plain = [a for a in attacks if not isinstance(a, Ensemble) and robust_accuracy.get(a.name) is not None]
    # single step vs iterative, same threat model
    hits, compared = [], 0
    for f in (a for a in plain if type(a).__name__ == "FGSM"):
        for it in (a for a in plain if a.kind == "white-box" and type(a).__name__ != "FGSM"
                   and (a.norm, a.eps) == (f.norm, f.eps)):
            compared += 1
            if robust_accuracy[f.name] < robust_accuracy[it.name] - tol:
                hits.append(f"{f.name}: {robust_accuracy[f.name]:.4f} < {it.name}: {robust_accuracy[it.name]:.4f}")
    out["single_step_stronger"] = (_flag(bool(hits), hits or None, tol, f"{compared} FGSM/iterative pairs compared")
                                   if compared else _not_run("needs FGSM and an iterative white-box attack "
                                                             "at the same eps"))
    # more steps / restarts weaker, among attacks of one family
    hits, compared = [], 0
    for a in plain:
        for b in plain:
            if a is b or _family(a) != _family(b) or not hasattr(a, "steps"):
                continue
            more = (b.steps >= a.steps and getattr(b, "restarts", 1) >= getattr(a, "restarts", 1)
                    and (b.steps, getattr(b, "restarts", 1)) != (a.steps, getattr(a, "restarts", 1)))
            if more:
                compared += 1
                if robust_accuracy[b.name] > robust_accuracy[a.name] + tol:
                    hits.append(f"{b.name}: {robust_accuracy[b.name]:.4f} > {a.name}: {robust_accuracy[a.name]:.4f}")
    out["more_iterations_weaker"] = _flag(bool(hits), hits or None, tol, f"{compared} pairs compared") \
        if compared else _not_run("no two attacks of one family differing only in steps or restarts")
    # black-box / transfer vs white-box
    hits, compared = [], 0
    for bb in (a for a in plain if a.kind in ("black-box", "transfer")):
        wb = [a for a in plain if a.kind == "white-box" and (a.norm, a.eps) == (bb.norm, bb.eps)]
        if not wb:
            continue
        compared += 1
        best_wb = min(robust_accuracy[a.name] for a in wb)
        if robust_accuracy[bb.name] < best_wb - tol:
            hits.append(f"{bb.name}: {robust_accuracy[bb.name]:.4f} < best white-box {best_wb:.4f}")
    for ens_name, stats in (ensembles or {}).items():
        wb_seen = False
        for m in stats["members"]:
            if m["kind"] == "white-box" and m.get("applicable", True):
                wb_seen = True
            elif m["kind"] in ("black-box", "transfer") and wb_seen:
                compared += 1
                if m["fooled"] / max(n, 1) > tol:
                    hits.append(f"{ens_name}: {m['name']} fooled {m['fooled']} points the white-box members missed")
    out["black_box_stronger"] = _flag(bool(hits), hits or None, tol, f"{compared} comparisons") if compared \
        else _not_run("needs a black-box or transfer attack next to a white-box one at the same eps")
    if violations is None:
        out["perturbation_outside_ball"] = _not_run("perturbations were not checked")
    else:
        bad = {k: v for k, v in violations.items() if v}
        out["perturbation_outside_ball"] = _flag(bool(bad), bad or None, 0,
                                                 "examples outside the eps ball (tolerance 1e-5) or [0, 1], per attack")
    return out
