"""Logits from whatever a model's forward returns.

The attacks and :func:`robcomp.evaluate` need a ``[batch, classes]`` logits tensor. Models from
Hugging Face ``transformers`` return a ``ModelOutput`` (``.logits``), others a dict or a tuple.
:func:`logits_of` takes, in order: a tensor as is, the ``logits`` attribute or key, else the first
element of a tuple/list. ``output_fn(output) -> tensor`` overrides that choice (e.g. pooled
features, or the last position of a causal LM: ``lambda out: out.logits[:, -1]``).

:class:`LogitsModel` wraps a model so that its forward returns those logits; the attacks and the
evaluation loop wrap the model they are given, so a Hugging Face model can be passed as is.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["logits_of", "LogitsModel", "with_logits"]

OutputFn = Callable[[Any], torch.Tensor]


def logits_of(output: Any, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The logits tensor in ``output`` (see the module docstring); TypeError when there is none."""
    if output_fn is not None:
        output = output_fn(output)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"output_fn must return a tensor, got {type(output).__name__}")
        return output
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the model returned a {type(output).__name__} without logits: return a tensor, an object "
                    "or dict with a 'logits' tensor, or a tuple whose first element is the logits; or pass "
                    "output_fn=... to pick them")


class LogitsModel(nn.Module):
    """``model`` whose forward returns :func:`logits_of` its output. Keeps ``eot_samples``."""

    def __init__(self, model: nn.Module, output_fn: OutputFn | None = None) -> None:
        super().__init__()
        if output_fn is not None and not callable(output_fn):
            raise TypeError("output_fn must be callable as output_fn(model_output) -> logits tensor")
        self.model = model
        self.output_fn = output_fn
        self.eot_samples = int(getattr(model, "eot_samples", 1))
        self.train(model.training)  # a fresh module is in training mode; mirror the model's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x), self.output_fn)


def with_logits(model: nn.Module, output_fn: OutputFn | None = None, probe: torch.Tensor | None = None
                ) -> nn.Module:
    """``model`` itself when it already returns a tensor (checked on ``probe`` when given), else a
    :class:`LogitsModel` around it. Already-wrapped models are returned as they are."""
    if isinstance(model, LogitsModel) and output_fn is None:
        return model
    if output_fn is None and probe is not None:
        with torch.no_grad():
            if isinstance(model(probe), torch.Tensor):
                return model
    return LogitsModel(model, output_fn)
