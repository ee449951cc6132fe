"""``robcomp.tune``: measure each compressed layer's paths at the shapes a model sees, and record
the fastest (per device key, layer format, dtype, M bucket, N, K) in the layers and on disk.

    table = robcomp.tune(model, example_inputs, batch_sizes=(1, 256))

After it, ``model(x)`` runs the recorded path of each layer for inputs of those shapes; shapes
that were not tuned use the layer's static default (``CompressedLinear.default_path``). Only
layers with ``backend="auto"`` are tuned (an explicit backend fixes the path). The table
(``{layer name: {"<dtype>|M<bucket>": {"choice", "timings_ms", "key", "cached", "candidates"}}}``)
is JSON-serialisable; measurements are stored in ``dispatch.json`` under ``$ROBCOMP_CACHE_DIR``
(see ``robcomp.layers.dispatch``) so tuning again on the same machine and software measures nothing.
Timing: CPU round-robin over the candidates with medians (``dispatch.measure_interleaved``),
CUDA ``triton.testing.do_bench``; inputs are fresh random tensors of the recorded shape.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn as nn

from robcomp.layers import dispatch
from robcomp.layers.backend import resolve_backend
from robcomp.layers.linear import CompressedLinear

__all__ = ["tune", "layer_op"]


def layer_op(layer: CompressedLinear) -> str:
    """The format part of a dispatch key, e.g. ``"Int4WeightOnlyLinear(g128)"``."""
    group = getattr(layer, "group_size", None)
    return type(layer).__name__ + (f"(g{group})" if group is not None else "")


def _resize_batch(x, b: int):
    """``x`` with its leading (batch) dimension repeated or cut to ``b``."""
    if isinstance(x, torch.Tensor):
        reps = -(-b // x.shape[0])
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:b]
    if isinstance(x, (tuple, list)):
        return type(x)(_resize_batch(t, b) for t in x)
    return x


def _run(model: nn.Module, inputs) -> None:
    with torch.no_grad():
        model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def tune(model: nn.Module, example_inputs, *, batch_sizes: Sequence[int] | None = None,
         cache: dispatch.DispatchCache | None = None,
         measure: Callable[[Callable[[], object]], float] | None = None) -> dict:
    """Measure and record the fastest path of every compressed ``backend="auto"`` layer of
    ``model`` at the shapes ``model(example_inputs)`` gives it (each batch size in
    ``batch_sizes``, the example's own batch when None). ``example_inputs`` is a tensor or a
    tuple of positional arguments with the batch first. ``measure`` (one zero-argument callable
    -> milliseconds) replaces the timer, e.g. in tests. Returns the table described above."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if batch_sizes is not None:
        batch_sizes = [int(b) for b in batch_sizes]
        if not batch_sizes or any(b <= 0 for b in batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    seen: dict[str, set] = {name: set() for name in layers}
    hooks = []
    for name, layer in layers.items():
        def hook(mod, args, name=name):
            x = args[0]
            seen[name].add((x.numel() // max(x.shape[-1], 1), x.dtype, x.device))
        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        for b in batch_sizes or [None]:
            _run(model, example_inputs if b is None else _resize_batch(example_inputs, b))
    finally:
        for h in hooks:
            h.remove()

    table: dict = {}
    for name, layer in layers.items():
        rows = table.setdefault(name, {})
        for m, dtype, device in sorted(seen[name], key=lambda s: (str(s[1]), s[0], str(s[2]))):
            label = f"{str(dtype).replace('torch.', '')}|M{dispatch.m_bucket(m)}"
            if resolve_backend(layer.backend, device) != "auto":
                xs = torch.empty(m, layer.in_features, dtype=dtype, device=device)
                rows[label] = {"choice": layer.select_path(xs), "fixed_by_backend": layer.backend}
                continue
            candidates = layer.paths(device, dtype)
            preferred = layer.default_path(device, dtype, m)

            def fns(layer=layer, m=m, dtype=dtype, device=device, candidates=candidates):
                x = torch.randn(m, layer.in_features, device=device).to(dtype)
                # partials, so an injected ``measure`` can see the layer and path (fn.func.__self__, fn.args[0])
                return {p: functools.partial(layer.run_path, p, x) for p in candidates}

            entry = dispatch.choose_entry(layer_op(layer), device, (m, layer.out_features, layer.in_features),
                                          dtype, fns, measure=measure, cache=cache, preferred=preferred)
            if entry["choice"] not in candidates:  # a cached choice this installation cannot run
                entry["choice"] = preferred
            entry["candidates"] = list(candidates)
            layer.tuned_paths[(device.type, dtype, dispatch.m_bucket(m))] = entry["choice"]
            layer.forget_plans()
            rows[label] = entry
    return table
