"""Low-bit matmul benchmarks (pytest-benchmark).

GPU (CUDA available): every format's Triton forward (int8 / int4 g128 weight-only, 2:4+int4 g128,
W8A8, FP8 where the GPU has it) against dense fp16 ``F.linear`` (cuBLAS), bitsandbytes
(Linear8bitLt, Linear4bit nf4) and ``torch._int_mm`` (W8A8 baseline), for M in
{1, 4, 16, 64, 256, 2048} on K x N in {4096x4096, 4096x14336, 14336x4096, 8192x28672} in fp16
(the shapes of the 2:4 issue). Timing: ``triton.testing.do_bench`` (CUDA events, warm-up, median)
on random inputs; ``extra_info`` carries ms, achieved GB/s (weight + activations + output bytes),
TFLOP/s, the device, versions and date, and the speedup over dense measured in the same run.

CPU (no GPU): a tiny shape set comparing the torch reference of each format, the numba batch-1
GEMV and dense ``F.linear``, so that the suite stays green on any machine.

Run: ``python -m pytest bench/test_lowbit.py --benchmark-only`` (``--benchmark-disable`` for a
smoke run); ``--benchmark-json bench/results/lowbit-<device>-<date>.json`` to record.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.harness import environment, gbps, matmul_flops, time_ms, tflops
from robcomp.kernels import reference as R

CUDA = torch.cuda.is_available()
GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N)
GPU_MS = [1, 4, 16, 64, 256, 2048]
CPU_SHAPES = [(256, 256)]
CPU_MS = [1, 16]
FORMATS = ["dense", "int8_weight", "int4_g128", "sparse24_int4_g128", "int8_dynamic", "fp8_dynamic",
           "int_mm", "bnb_int8", "bnb_nf4"]


_DENSE_MS: dict = {}


def _gpu_fn(fmt, x, w, k, n):
    """A zero-argument callable for ``fmt`` and its weight bytes; None when it cannot run here."""
    from robcomp.kernels import lowbit as L
    from robcomp.kernels import sparse24_lowbit as S
    if fmt == "dense":
        return (lambda: F.linear(x, w)), w.numel() * 2
    if fmt == "int8_weight":
        q, s = R.int8_weight_pack(w)
        return (lambda: L.int8_weight_forward(x, q, s)), q.numel() + s.numel() * 2
    if fmt == "int4_g128":
        q, s, z = R.int4_pack(w, 128)
        return (lambda: L.int4_forward(x, q, s, z, 128)), q.numel() + 4 * s.numel()
    if fmt == "sparse24_int4_g128":
        q, s, z, m = R.sparse24_int4_pack(w, 128)
        return (lambda: S.sparse24_int4_forward(x, q, s, z, m, 128)), q.numel() + m.numel() + 4 * s.numel()
    if fmt == "int8_dynamic":
        q, s = R.int8_dynamic_pack(w)
        return (lambda: L.int8_dynamic_forward(x, q, s)), q.numel() + 4 * s.numel()
    if fmt == "fp8_dynamic":
        if not L.fp8_supported(x.device):
            return None
        q, s = R.fp8_dynamic_pack(w)
        return (lambda: L.fp8_dynamic_forward(x, q, s)), q.numel() + 4 * s.numel()
    if fmt == "int_mm":  # torch._int_mm needs M > 16 and K, N multiples of 8
        if x.shape[0] <= 16:
            return None
        q, s = R.int8_dynamic_pack(w)
        qt = q.t()

        def f():
            xq, xs = L.quantize_rows(x)
            return (torch._int_mm(xq, qt).float() * xs[:, None] * s[None, :]).half()
        return f, q.numel() + 4 * s.numel()
    if fmt in ("bnb_int8", "bnb_nf4"):
        try:
            import bitsandbytes as bnb
        except Exception:
            return None
        if fmt == "bnb_int8":
            mod = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0)
            mod.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
            nbytes = k * n
        else:
            mod = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float16, quant_type="nf4")
            mod.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
            nbytes = k * n // 2
        mod = mod.to(x.device)
        return (lambda: mod(x)), nbytes
    raise ValueError(fmt)


@pytest.mark.skipif(not CUDA, reason="GPU benchmarks need CUDA")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", GPU_MS)
@pytest.mark.parametrize("k,n", GPU_SHAPES)
def test_gpu_forward(benchmark, device, k, n, m, fmt):
    torch.manual_seed(0)
    w = (torch.randn(n, k, device=device) * 0.02).half()
    x = torch.randn(m, k, device=device).half()
    made = _gpu_fn(fmt, x, w, k, n)
    if made is None:
        pytest.skip(f"{fmt} cannot run here at M={m}")
    fn, wbytes = made
    fn()  # compile / autotune outside the timing
    ms = time_ms(fn, device)
    dense_ms = _DENSE_MS.get((k, n, m))
    if dense_ms is None:
        dense_ms = _DENSE_MS[(k, n, m)] = time_ms(lambda: F.linear(x, w), device)
    moved = wbytes + 2 * m * (k + n)
    benchmark.extra_info.update(environment(device), shape={"M": m, "K": k, "N": n}, dtype="float16", format=fmt,
                                ms=ms, GBps=gbps(moved, ms), TFLOPs=tflops(matmul_flops(m, n, k), ms),
                                dense_ms=dense_ms, speedup_vs_dense=dense_ms / ms)
    benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=2)


# ----------------------------------------------------------------------------------- CPU
def _cpu_fn(fmt, x, w):
    if fmt == "dense":
        return lambda: F.linear(x, w)
    if fmt == "int8_weight":
        q, s = R.int8_weight_pack(w)
        return lambda: R.int8_weight_linear(x, q, s)
    if fmt == "int4_g128":
        q, s, z = R.int4_pack(w, 128)
        return lambda: R.int4_linear(x, q, s, z, 128)
    if fmt == "sparse24_int4_g128":
        q, s, z, m = R.sparse24_int4_pack(w, 128)
        return lambda: R.sparse24_int4_linear(x, q, s, z, m, 128)
    if fmt == "int8_dynamic":
        q, s = R.int8_dynamic_pack(w)
        return lambda: R.int8_dynamic_linear(x, q, s)
    if fmt == "fp8_dynamic":
        q, s = R.fp8_dynamic_pack(w)
        return lambda: R.fp8_dynamic_linear(x, q, s)
    if fmt in ("numba_int4_gemv", "numba_int8_gemv"):
        from robcomp.kernels import numba_cpu as NB
        if not NB.available() or x.shape[0] != 1:
            return None
        if fmt == "numba_int4_gemv":
            q, s, z = R.int4_pack(w, 128)
            return lambda: NB.int4_gemv(x[0], q, s, z, 128)
        q, s = R.int8_weight_pack(w)
        return lambda: NB.int8_gemv(x[0], q, s)
    return None


@pytest.mark.skipif(CUDA, reason="the CPU set runs only where there is no GPU")
@pytest.mark.parametrize("fmt", ["dense", "int8_weight", "int4_g128", "sparse24_int4_g128", "int8_dynamic",
                                 "fp8_dynamic", "numba_int4_gemv", "numba_int8_gemv"])
@pytest.mark.parametrize("m", CPU_MS)
@pytest.mark.parametrize("k,n", CPU_SHAPES)
def test_cpu_reference(benchmark, device, k, n, m, fmt):
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    x = torch.randn(m, k)
    fn = _cpu_fn(fmt, x, w)
    if fn is None:
        pytest.skip(f"{fmt} does not run at M={m}")
    y = fn()
    ref = F.linear(x, w * R.sparse24_mask(w) if fmt.startswith("sparse24") else w)
    assert torch.isfinite(y).all()
    # every format stays close to the dense product (catches a broken benchmark target)
    assert (y.reshape(ref.shape) - ref).norm() / ref.norm() < 0.2
    dense_ms = time_ms(lambda: F.linear(x, w), device)
    ms = time_ms(fn, device)
    benchmark.extra_info.update(environment(device), shape={"M": m, "K": k, "N": n}, dtype="float32", format=fmt,
                                ms=ms, dense_ms=dense_ms, speedup_vs_dense=dense_ms / ms)
    benchmark(fn)
