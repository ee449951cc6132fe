"""Randomised models in an evaluation: detecting them, seeding their noise, scoring them.

A model whose forward draws random numbers (noise injection, random resizing, stochastic
quantisation, dropout left on) has no single prediction. The evaluation then follows AutoAttack's
``rand`` treatment and says so in the record:

* gradients: every white-box attack averages its input gradient over ``eot_samples`` forwards
  (expectation over transformation, :class:`robcomp.attacks.EOT`);
* scoring: a prediction is the majority vote of ``votes`` forwards (``scoring="majority"``) or
  the argmax of their mean softmax (``"expectation"``); the same predictor decides clean accuracy,
  every attack's success and every ensemble member's statistics, so they cannot disagree.

Seeding: each batch runs inside :func:`seeded_noise`, which forks torch's default generators
(CPU and the evaluation's CUDA device), seeds them from (evaluation seed, batch index), and seeds
every ``torch.Generator`` a submodule exposes as its ``generator`` attribute (the protocol for a
model drawing from its own generator). Noise drawn from those sources repeats exactly;
:func:`noise_control` checks that and otherwise reports that repeated evaluations differ.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SCORINGS", "is_randomised", "noise_control", "seeded_noise", "Predictor", "batch_seed"]

SCORINGS = ("majority", "expectation")


def batch_seed(seed: int, batch: int) -> int:
    digest = hashlib.sha256(f"robcomp-noise:{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _model_generators(model: nn.Module) -> list[torch.Generator]:
    return [m.generator for m in model.modules() if isinstance(getattr(m, "generator", None), torch.Generator)]


@contextlib.contextmanager
def seeded_noise(model: nn.Module, seed: int, device: torch.device):
    """Seed torch's default generators (restored afterwards) and the model's own generators."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i, g in enumerate(_model_generators(model)):
            g.manual_seed(seed + i)
        yield


@torch.no_grad()
def is_randomised(model: nn.Module, x: torch.Tensor) -> bool:
    """Two forward passes on the same input differ (beyond 1e-5 relative)."""
    a, b = model(x), model(x)
    return bool((a - b).abs().max() > 1e-5 * max(float(a.abs().max()), 1.0))


@torch.no_grad()
def noise_control(model: nn.Module, x: torch.Tensor, device: torch.device) -> str:
    """``"deterministic"``, ``"seeded"`` (the same seed gives the same forward) or ``"uncontrolled"``."""
    if not is_randomised(model, x):
        return "deterministic"
    outs = []
    for _ in range(2):
        with seeded_noise(model, 12345, device):
            outs.append(model(x))
    return "seeded" if torch.equal(outs[0], outs[1]) else "uncontrolled"


class Predictor:
    """``predictor(model, x) -> labels``: one forward, or a vote over ``votes`` forwards."""

    def __init__(self, randomised: bool, scoring: str = "majority", votes: int = 10) -> None:
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        if isinstance(votes, bool) or not isinstance(votes, int) or votes < 1:
            raise ValueError(f"votes must be a positive integer, got {votes!r}")
        self.randomised, self.scoring, self.votes = bool(randomised), scoring, votes

    @torch.no_grad()
    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.randomised:
            return model(x).argmax(1)
        if self.scoring == "expectation":
            probs = sum(F.softmax(model(x).float(), 1) for _ in range(self.votes))
            return probs.argmax(1)
        counts = None
        for _ in range(self.votes):
            z = model(x)
            onehot = F.one_hot(z.argmax(1), z.shape[1])
            counts = onehot if counts is None else counts + onehot
        # ties go to the lowest class index (argmax returns the first maximum)
        return counts.argmax(1)

    def describe(self) -> str:
        if not self.randomised:
            return "one forward pass"
        what = "majority vote" if self.scoring == "majority" else "argmax of the mean softmax"
        return f"{what} over {self.votes} forward passes"
