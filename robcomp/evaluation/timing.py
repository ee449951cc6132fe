"""Latency, throughput, peak memory, energy and MAC counts, following DESIGN.md's rules.

CPU: ``time.perf_counter`` around each call, after warm-up, median over repeats. CUDA: CUDA events
after warm-up, median over repeats. Inputs are fresh random values in [0, 1], never zeros.
"""
from __future__ import annotations

import os
import statistics
import threading
import time

import torch
import torch.nn as nn

__all__ = ["measure_latency", "measure_peak_memory", "measure_energy", "count_macs"]


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


# ----------------------------------------------------------------------------------- memory
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def measure_peak_memory(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        repeats: int = 3, seed: int = 0) -> dict:
    """Peak memory of inference on one batch, with the method named in the result.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (exact, bytes held by
    tensors, model included). CPU: the process's resident set size sampled every millisecond by a
    background thread while the forward passes run (``/proc/self/statm``); reported as the peak
    and as the increase over the RSS before the first pass. RSS includes the allocator's cached
    pages and everything else in the process, so on CPU this is an upper-bound style estimate.
    """
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand((batch_size, *input_shape), generator=gen).to(device=device, dtype=dtype)
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            for _ in range(repeats):
                model(x)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"batch_size": batch_size, "peak_bytes": int(peak), "increase_bytes": int(peak - before),
                "method": "torch.cuda.max_memory_allocated"}
    if _rss_bytes() is None:
        return {"batch_size": batch_size, "peak_bytes": None, "increase_bytes": None,
                "method": "unavailable (/proc/self/statm not readable)"}
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_rss_bytes() or 0)
            time.sleep(0.001)

    before = _rss_bytes() or 0
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        with torch.no_grad():
            for _ in range(repeats):
                model(x)
    finally:
        stop.set()
        thread.join()
    peak = max(samples + [_rss_bytes() or 0, before])
    return {"batch_size": batch_size, "peak_bytes": int(peak), "increase_bytes": int(peak - before),
            "method": "process RSS sampled every 1 ms (/proc/self/statm)"}


# ----------------------------------------------------------------------------------- energy
def measure_energy(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, *,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   min_seconds: float = 1.0, seed: int = 0) -> dict:
    """Energy per sample through NVML's total-energy counter (NVIDIA GPUs, Volta and newer).

    Runs the model for at least ``min_seconds`` and divides the counter's increase by the samples
    processed. Anywhere else the figure is omitted and the reason given.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return {"joules_per_sample": None, "omitted": f"energy needs an NVIDIA GPU with NVML; device is {device}"}
    try:
        import pynvml  # type: ignore
    except ImportError:
        return {"joules_per_sample": None, "omitted": "pynvml is not installed (pip install nvidia-ml-py)"}
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.rand((batch_size, *input_shape), generator=gen).to(device=device, dtype=dtype)
        with torch.no_grad():
            for _ in range(5):
                model(x)
            torch.cuda.synchronize(device)
            start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            t0, runs = time.perf_counter(), 0
            while time.perf_counter() - t0 < min_seconds:
                model(x)
                runs += 1
                if runs % 10 == 0:
                    torch.cuda.synchronize(device)
            torch.cuda.synchronize(device)
            end_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        seconds = time.perf_counter() - t0
        joules = (end_mj - start_mj) / 1e3
        return {"joules_per_sample": joules / (runs * batch_size), "batch_size": batch_size, "seconds": seconds,
                "average_watts": joules / seconds, "method": "nvmlDeviceGetTotalEnergyConsumption"}
    except Exception as e:  # NVML missing on the driver, unsupported GPU, permissions
        return {"joules_per_sample": None, "omitted": f"NVML energy counter unavailable: {e}"}


# ----------------------------------------------------------------------------------- MACs
def count_macs(model: nn.Module, input_shape: tuple[int, ...], *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> dict:
    """Multiply-accumulates per example, counted with forward hooks on ``nn.Linear``,
    ``nn.Conv2d`` and the compressed layers of ``robcomp.layers.linear`` (one forward of a single example).

    ``macs`` counts the dense layer shapes; ``macs_nonzero`` scales each layer by the fraction of
    its (dequantised) weights that are non-zero, i.e. the work a sparse kernel must do. Other
    operations (attention's matmuls, norms, activations) are not counted.
    """
    from robcomp.layers.linear import CompressedLinear

    totals = {"macs": 0, "macs_nonzero": 0.0}
    layers: dict[str, int] = {}

    def hook(name):
        def fn(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                per_out = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
                weight = module.weight
            else:
                per_out = module.in_features
                weight = module.weight  # CompressedLinear.weight is the dequantised dense weight
            macs = int(output.numel()) * per_out
            density = float((weight != 0).float().mean()) if weight.numel() else 0.0
            totals["macs"] += macs
            totals["macs_nonzero"] += macs * density
            layers[name] = layers.get(name, 0) + macs
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, CompressedLinear))]
    try:
        x = torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return {"macs": totals["macs"], "macs_nonzero": int(round(totals["macs_nonzero"])), "per_layer": layers,
            "method": "forward hooks on Linear, Conv2d and compressed layers, batch of 1"}
