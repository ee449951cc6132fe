"""Latency and throughput measurement, following DESIGN.md's rules.

CPU: ``time.perf_counter`` around each call, after warm-up, median over repeats. CUDA: CUDA events
after warm-up, median over repeats. Inputs are fresh random values in [0, 1], never zeros.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn

__all__ = ["measure_latency"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, *,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    warmup: int = 5, repeats: int = 30, seed: int = 0) -> dict:
    """Time ``model`` on a batch of ``batch_size`` random inputs; return milliseconds and samples/s."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand((batch_size, *input_shape), generator=gen).to(device=device, dtype=dtype)
    model.eval()
    for _ in range(warmup):
        model(x)
    times_ms = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times_ms.append((time.perf_counter() - t0) * 1e3)
    median = statistics.median(times_ms)
    return {
        "batch_size": batch_size,
        "median_ms": median,
        "p90_ms": _percentile(times_ms, 0.9),
        "p99_ms": _percentile(times_ms, 0.99),
        "throughput_per_s": batch_size / (median / 1e3),
        "repeats": repeats,
    }
