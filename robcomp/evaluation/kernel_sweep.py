"""The kernel sweep: each compressed layer format against dense ``F.linear`` over layer size and
batch, on the machine and in the process ``robcomp run`` runs on (the hardware section's "where
does compression pay here?").

For every square layer size K = N and batch M, a random dense ``nn.Linear`` and each format's
compressed layer built from it (``robcomp.nn``, ``backend="auto"``: the path a study's model runs,
i.e. the tuned choice if any, else the layer's static default) are called round-robin
(``robcomp.layers.dispatch.measure_interleaved``: one call of each per round, medians), so a slow spell
on a shared machine slows all of them alike. fp32 activations, forward only, no gradient. The
record names the device, versions, dtype, threads and date, the path each format ran, and the
dense time, so every speedup is a ratio within one round-robin.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["KERNEL_SWEEP_RECORD", "DEFAULT_FORMATS", "run_kernel_sweep"]

#: ``type`` of the record that holds a sweep in results.jsonl
KERNEL_SWEEP_RECORD = "kernel_sweep"
#: format label -> recipe text (``robcomp.recipes.parse_recipe``)
DEFAULT_FORMATS = {
    "int8_weight_only": "int8_weight_only",
    "int4_weight_only(g128)": "int4_weight_only:group_size=128",
    "int8_dynamic": "int8_dynamic",
    "fp8_dynamic": "fp8_dynamic",
    "sparse24": "sparse24",
    "sparse24_int4(g128)": "sparse24_int4:group_size=128",
}


def _check_sizes(name: str, values: Sequence[int]) -> list[int]:
    out = [int(v) for v in values]
    if not out or any(isinstance(v, bool) or v < 1 for v in values):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {list(values)!r}")
    return out


def run_kernel_sweep(sizes: Sequence[int] = (256, 1024, 4096), batches: Sequence[int] = (1, 16, 256), *,
                     formats: dict[str, str] | None = None, budget_s: float = 0.3, seed: int = 0) -> dict:
    """Measure the sweep on CPU with torch's current thread count; return its record.

    ``budget_s``: timing budget of one (size, batch) cell, shared by its candidates (at least 3
    rounds). A format that cannot take a size (e.g. a group size that does not divide K) gets a
    row with ``status`` "skipped" and the reason."""
    from robcomp.layers.dispatch import measure_interleaved
    from robcomp.evaluation.env import environment
    from robcomp.compression.handlers import layer_type_for
    from robcomp.layers.linear import tensor_bytes
    from robcomp.recipes import parse_recipe

    sizes, batches = _check_sizes("sizes", sizes), _check_sizes("batches", batches)
    if not budget_s > 0:
        raise ValueError(f"budget_s must be positive, got {budget_s!r}")
    formats = dict(DEFAULT_FORMATS if formats is None else formats)
    recipes = {label: parse_recipe(text) for label, text in formats.items()}
    device = torch.device("cpu")
    t_start = time.perf_counter()
    rows = []
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for size in sizes:
            dense = nn.Linear(size, size, bias=True)
            dense.weight.copy_(torch.randn(size, size, generator=gen) / size ** 0.5)
            dense.bias.copy_(torch.randn(size, generator=gen) * 0.1)
            layers, skipped = {}, {}
            for label, recipe in recipes.items():
                try:
                    layers[label] = layer_type_for(recipe).from_linear(dense, recipe)
                except (ValueError, TypeError, KeyError) as e:
                    skipped[label] = f"{type(e).__name__}: {e}"
            for m in batches:
                x = torch.rand(m, size, generator=gen) * 2 - 1  # fresh values, never zeros
                fns = {"dense": lambda: dense(x)}
                fns.update({label: (lambda layer=layer: layer(x)) for label, layer in layers.items()})
                ms = measure_interleaved(fns, device, budget_s=budget_s, max_rounds=25, min_rounds=3)
                base = ms.get("dense")
                for label in formats:
                    row = {"format": label, "recipe": formats[label], "K": size, "N": size, "M": m,
                           "dense_ms": base}
                    if label in skipped:
                        rows.append({**row, "status": "skipped", "reason": skipped[label]})
                        continue
                    t = ms.get(label)
                    if t is None or base is None:
                        rows.append({**row, "status": "failed", "reason": "the call raised"})
                        continue
                    rows.append({**row, "status": "ok", "ms": t, "speedup": base / t,
                                 "path": layers[label].last_path, "layer_bytes": tensor_bytes(layers[label]),
                                 "dense_layer_bytes": tensor_bytes(dense)})
    env = environment(device)
    return {"type": KERNEL_SWEEP_RECORD, "env": env, "device": f"cpu ({env['cpu']})",
            "dtype": "float32", "threads": torch.get_num_threads(), "direction": "forward",
            "sizes": sizes, "batches": batches, "formats": formats, "budget_s": budget_s,
            "timing": "round-robin medians (robcomp.layers.dispatch.measure_interleaved), dense F.linear in the same rounds",
            "rows": rows, "time_s": time.perf_counter() - t_start}
