"""Eager call plans of the compressed layers: what ``forward`` decided for an input signature,
kept so that the next call with the same signature runs at once.

Choosing a path (backend, tuned choice, static default, inference-only fallback) and preparing its
kernel cost ~10-30 us per call in Python, more than the kernel of a 256-wide layer. A plan caches
the result per *signature*: input shape, dtype and device, whether a gradient is recorded, the
thread count and ``$ROBCOMP_BACKEND``. It is dropped when anything it depends on changes: an
attribute or buffer is set (``CompressedLinear.__setattr__``), the module is moved or converted
(``_apply``), ``robcomp.tune`` records a choice, or a buffer the plan reads is modified in place
(its ``_version``). Plans are per-process state, never saved or copied.

Traced calls (``torch.compile``) and tensor subclasses take the unplanned path.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from robcomp.layers.backend import ENV_VAR

__all__ = ["Plan", "signature", "MAX_PLANS"]

#: plans kept per layer (distinct input shapes); beyond, the oldest is dropped
MAX_PLANS = 64


class Plan:
    """One signature's decision: the path recorded in ``paths_run`` under ``run_key``, the path
    that runs (``last_path``; differs after an inference-only fallback) and ``run(layer, x)``."""

    __slots__ = ("path", "ran", "run_key", "run", "tensors", "versions")

    def __init__(self, path: str, ran: str, run_key: str, run: Callable, tensors: tuple[torch.Tensor, ...] = ()):
        self.path, self.ran, self.run_key, self.run = path, ran, run_key, run
        self.tensors = tensors  # the buffers the plan holds views or copies of
        self.versions = tuple(t._version for t in tensors)

    def current(self) -> bool:
        """False once a buffer the plan reads was modified in place."""
        return not self.tensors or tuple(t._version for t in self.tensors) == self.versions


def signature(x: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """What a plan is keyed on (see the module docstring)."""
    # x's own flag apart: an inference-only path falls back only where x needs a gradient
    grad = torch.is_grad_enabled()
    return (x.shape, x.dtype, x.device, grad and x.requires_grad, grad and bias is not None and bias.requires_grad,
            torch.get_num_threads(), os.environ.get(ENV_VAR))


def store(plans: dict, key: tuple, plan: Plan) -> None:
    if len(plans) >= MAX_PLANS:
        plans.pop(next(iter(plans)))
    plans[key] = plan
