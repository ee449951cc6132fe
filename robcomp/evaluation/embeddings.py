"""Attacking a text model in embedding space.

Token ids are discrete: white-box attacks perturb the *embeddings* instead. The attacks and
:func:`robcomp.evaluate` take inputs in [0, 1], so :class:`EmbeddingInputs` maps the embedding
table's value range ``[lo, hi]`` (its smallest and largest entry) affinely onto [0, 1]:

* ``x = wrapper.encode(input_ids)`` gives each token's embedding as ``(e - lo) / (hi - lo)``;
* ``wrapper(x)`` runs ``model(inputs_embeds=lo + x * (hi - lo))`` and returns the logits.

An L-inf radius ``eps`` in x therefore is ``eps * (hi - lo)`` per embedding coordinate
(``wrapper.scale``). The model must accept ``inputs_embeds=`` (Hugging Face models do); position
and token-type embeddings are still added inside the model. For a causal LM classify with
``output_fn`` (e.g. ``lambda out: out.logits[:, -1]``, the next-token logits).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from robcomp.outputs import OutputFn, logits_of

__all__ = ["EmbeddingInputs"]


class EmbeddingInputs(nn.Module):
    """``model`` taking normalised token embeddings in [0, 1] (see the module docstring)."""

    def __init__(self, model: nn.Module, embedding: nn.Embedding | None = None, output_fn: OutputFn | None = None):
        super().__init__()
        if embedding is None:
            get = getattr(model, "get_input_embeddings", None)
            embedding = get() if callable(get) else None
        if not isinstance(embedding, nn.Embedding):
            raise TypeError("embedding must be the model's nn.Embedding (pass embedding=...; Hugging Face models "
                            "supply it through get_input_embeddings())")
        self.model = model
        # a plain reference, not a submodule: the table is already the model's (counted once in sizes)
        object.__setattr__(self, "_embedding", embedding)
        self.output_fn = output_fn
        with torch.no_grad():
            w = embedding.weight.detach()
            lo, hi = float(w.min()), float(w.max())
        if not hi > lo:
            raise ValueError("the embedding table is constant: it has no value range to normalise")
        self.lo, self.scale = lo, hi - lo
        self.train(model.training)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` -> normalised embeddings ``[B, T, D]`` in [0, 1]."""
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        with torch.no_grad():
            return ((self._embedding(input_ids) - self.lo) / self.scale).clamp_(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(inputs_embeds=self.lo + x * self.scale), self.output_fn)
