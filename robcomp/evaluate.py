"""``evaluate(model, data, attacks=...)``: accuracy, robustness and speed of one model, in one record.

Robust accuracy counts an example as robust only if it is classified correctly both clean and
under the attack (a clean mistake is never "robust"). Attacks run against the model exactly as
given: compressed layers compute their input gradients from the compressed weights. The record is
plain JSON-serialisable data.
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from robcomp.attacks.base import Attack
from robcomp.compress import count_parameters, model_bytes
from robcomp.env import environment
from robcomp.nn import CompressedLinear
from robcomp.timing import measure_latency

__all__ = ["evaluate"]


def _as_batches(data, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"data: x has {len(x)} examples but y has {len(y)}")
        if len(x) == 0:
            raise ValueError("data is empty")
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    raise TypeError("data must be a DataLoader yielding (x, y) or an (x, y) pair of tensors")


def _gradient_kinds(model: nn.Module) -> dict[str, str]:
    """How each compressed layer's input gradient is computed ("exact" or "straight-through")."""
    return {name: getattr(m, "gradient", "exact") for name, m in model.named_modules()
            if isinstance(m, CompressedLinear)}


def evaluate(model: nn.Module, data, *, attacks: Sequence[Attack] = (), batch_sizes: Sequence[int] = (1, 256),
             device: torch.device | str | None = None, batch_size: int = 256, latency_repeats: int = 30,
             name: str | None = None, progress: bool = False) -> dict:
    """Evaluate ``model`` on ``data``: clean and robust accuracy, latency, size. Returns a record."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for attack in attacks:
        if not isinstance(attack, Attack):
            raise TypeError(f"attacks must hold robcomp attacks, got {type(attack).__name__}")
    if any((not isinstance(b, int)) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    total, clean_correct, worst_correct = 0, 0, 0
    robust_correct = {a.name: 0 for a in attacks}
    attack_time = {a.name: 0.0 for a in attacks}
    input_shape = None
    for x, y in tqdm(_as_batches(data, batch_size), desc=f"evaluate {name or ''}".strip(), disable=not progress,
                     leave=False):
        x, y = x.to(device), y.to(device)
        input_shape = tuple(x.shape[1:])
        with torch.no_grad():
            clean_ok = model(x).argmax(-1) == y
        total += len(y)
        clean_correct += clean_ok.sum().item()
        robust_all = clean_ok.clone()
        for attack in attacks:
            t0 = time.perf_counter()
            x_adv = attack(model, x, y)
            attack_time[attack.name] += time.perf_counter() - t0
            with torch.no_grad():
                adv_ok = model(x_adv).argmax(-1) == y
            robust_correct[attack.name] += (clean_ok & adv_ok).sum().item()
            robust_all &= adv_ok
        worst_correct += robust_all.sum().item()
    if total == 0:
        raise ValueError("data yielded no example")
    robust = {k: v / total for k, v in robust_correct.items()}
    latency = {str(b): measure_latency(model, input_shape, b, device=device, repeats=latency_repeats)
               for b in batch_sizes}
    return {
        "model": name,
        "examples": total,
        "clean_accuracy": clean_correct / total,
        "robust_accuracy": robust,
        # per example: robust only if no attack succeeded on it
        "worst_case_robust_accuracy": worst_correct / total if attacks else None,
        "attacks": [a.to_dict() for a in attacks],
        "attack_time_s": attack_time,
        "latency": latency,
        "model_bytes": model_bytes(model),
        "parameters": count_parameters(model),
        "input_gradients": _gradient_kinds(model),
        "env": environment(device),
    }
