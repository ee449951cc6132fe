"""2:4 sparse matmul benchmarks (pytest-benchmark + bench/harness.py).

GPU: Triton 2:4 forward vs dense fp16 ``F.linear`` (cuBLAS) and vs PyTorch semi-structured sparse
(``to_sparse_semi_structured``) where it runs, for M in {1, 4, 16, 64, 256, 2048} on K x N in
{4096x4096, 4096x14336, 14336x4096, 8192x28672}, fp16; plus the input-gradient kernel
(``dX = dY · W``) vs dense ``dY @ W`` and the Sparse24 layer with its dispatch vs dense. Each
record has ms, achieved GB/s, TFLOP/s, roofline % and the speedup over dense measured in the same
run; the session writes them to ``bench/results/sparse24-<device>-<date>.json``.
Targets (H100): M <= 16 forward >= 1.5x dense; the layer >= 0.98x dense at every M;
input gradient at M <= 16 >= 1.4x dense.

CPU: a tiny shape set, the Triton kernels in the interpreter against the torch reference, so that
the suite stays green (and fast) anywhere.

Run: ``python -m pytest bench/test_sparse24.py --benchmark-only`` (``--benchmark-disable`` for a
smoke run that checks results without timing).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.harness import Measurement, matmul_flops, nbytes, randn, time_ms
from robcomp.kernels import reference as ref

CUDA = torch.cuda.is_available()
GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N)
GPU_MS = [1, 4, 16, 64, 256, 2048]
CPU_SHAPES = [(64, 48)]
CPU_MS = [1, 16]
SHAPES = GPU_SHAPES if CUDA else CPU_SHAPES
MS = GPU_MS if CUDA else CPU_MS
DTYPE = torch.float16 if CUDA else torch.float32
SUITE = "sparse24"


@pytest.fixture(scope="module")
def weights(device):
    """Packed 2:4 weights per (K, N), built once (packing an 8192x28672 weight takes a while)."""
    cache = {}

    def get(k, n):
        if (k, n) not in cache:
            w = randn(n, k, dtype=DTYPE, device=device, scale=0.02)
            values, meta = ref.sparse24_pack(w)
            dense = ref.sparse24_unpack(values, meta, k)
            cache.clear()  # keep one shape resident: the big ones are hundreds of MB
            cache[(k, n)] = (values, meta, dense)
        return cache[(k, n)]
    return get


def _sync(fn):
    if not CUDA:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def _semi_structured(dense):
    try:
        from torch.sparse import to_sparse_semi_structured
        return to_sparse_semi_structured(dense)
    except Exception:
        return None


def _record(recorder, benchmark, case, impl, shape, ms, nbytes_, flops):
    m = recorder.add(Measurement(SUITE, case, impl, str(DTYPE).replace("torch.", ""), shape, ms, nbytes_, flops))
    return m


@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("k,n", SHAPES, ids=lambda s: str(s))
def test_forward(benchmark, recorder, device, weights, k, n, m):
    from robcomp.kernels import sparse24 as s24
    values, meta, dense = weights(k, n)
    x = randn(m, k, dtype=DTYPE, device=device)
    triton_fn = lambda: s24.sparse24_forward(x, values, meta)  # noqa: E731
    y = triton_fn()
    expected = F.linear(x.double(), dense.double())
    tol = 2e-2 if DTYPE == torch.float16 else 1e-4
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    if benchmark.disabled:
        benchmark(triton_fn)
        return

    case = f"forward M={m} K={k} N={n}"
    shape = {"M": m, "K": k, "N": n}
    flops = matmul_flops(m, n, k)
    act = nbytes(x, m * n * x.element_size())
    baseline = (lambda: F.linear(x, dense)) if CUDA else (lambda: ref.sparse24_linear(x, values, meta))
    base_name = "dense" if CUDA else "reference"
    base = _record(recorder, benchmark, case, base_name, shape, time_ms(baseline, device),
                   act + nbytes(dense), flops)
    tri = _record(recorder, benchmark, case, "triton", shape, time_ms(triton_fn, device, cpu_repeats=2),
                  act + nbytes(values, meta), flops)
    info = tri.as_dict(recorder.env)
    info["speedup_vs_" + base_name] = round(recorder.ratio(tri, base_name), 4)
    info[base_name + "_ms"] = base.ms
    if CUDA:
        semi = _semi_structured(dense)
        if semi is not None:
            try:
                ss = _record(recorder, benchmark, case, "semi_structured", shape,
                             time_ms(lambda: F.linear(x, semi), device), act + nbytes(values, meta), flops)
                info["semi_structured_ms"] = ss.ms
            except Exception as e:  # shape/M constraints of cuSPARSELt/CUTLASS
                info["semi_structured_error"] = str(e)[:200]
    benchmark.extra_info.update(info)
    benchmark.pedantic(_sync(triton_fn), rounds=20 if CUDA else 2, warmup_rounds=2 if CUDA else 0)


@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("k,n", SHAPES, ids=lambda s: str(s))
def test_backward_input(benchmark, recorder, device, weights, k, n, m):
    from robcomp.kernels import sparse24 as s24
    values, meta, dense = weights(k, n)
    dy = randn(m, n, dtype=DTYPE, device=device)
    triton_fn = lambda: s24.sparse24_backward_input(dy, values, meta)  # noqa: E731
    dx = triton_fn()
    tol = 2e-2 if DTYPE == torch.float16 else 1e-4
    torch.testing.assert_close(dx.double(), dy.double() @ dense.double(), rtol=tol, atol=tol)
    if benchmark.disabled:
        benchmark(triton_fn)
        return

    case = f"backward_input M={m} K={k} N={n}"
    shape = {"M": m, "K": k, "N": n}
    flops = matmul_flops(m, k, n)
    act = nbytes(dy, m * k * dy.element_size())
    base_name = "dense" if CUDA else "reference"
    base = _record(recorder, benchmark, case, base_name, shape, time_ms(lambda: dy @ dense, device),
                   act + nbytes(dense), flops)
    tri = _record(recorder, benchmark, case, "triton", shape, time_ms(triton_fn, device, cpu_repeats=2),
                  act + nbytes(values, meta), flops)
    info = tri.as_dict(recorder.env)
    info["speedup_vs_" + base_name] = round(recorder.ratio(tri, base_name), 4)
    info[base_name + "_ms"] = base.ms
    benchmark.extra_info.update(info)
    benchmark.pedantic(_sync(triton_fn), rounds=20 if CUDA else 2, warmup_rounds=2 if CUDA else 0)


@pytest.mark.skipif(not CUDA, reason="the CUDA candidates (Triton, semi-structured, cuBLAS) need a GPU")
@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("k,n", SHAPES[:1], ids=lambda s: str(s))
def test_layer_with_dispatch(benchmark, recorder, device, k, n, m):
    """The Sparse24 layer (Triton / semi-structured / dense chosen per shape) vs the dense layer."""
    from robcomp.layers.linear import Sparse24Linear
    linear = torch.nn.Linear(k, n, bias=True, device=device, dtype=DTYPE)
    layer = Sparse24Linear.from_linear(linear, backend="auto")
    x = randn(m, k, dtype=DTYPE, device=device)
    import robcomp
    robcomp.tune(torch.nn.Sequential(layer), x)  # measures and records the path for this shape
    with torch.no_grad():
        y = layer(x)
        dense_w = layer.dequantize()
        # whichever path the dispatch picked, it computes the 2:4 product (fp32 reference)
        ref = F.linear(x.float(), dense_w.float(), layer.bias.float())
        assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
        case = f"layer M={m} K={k} N={n}"
        shape = {"M": m, "K": k, "N": n}
        flops = matmul_flops(m, n, k)
        base = _record(recorder, benchmark, case, "dense", shape,
                       time_ms(lambda: F.linear(x, dense_w, layer.bias), device), nbytes(x, dense_w), flops)
        lay = _record(recorder, benchmark, case, "sparse24_layer", shape, time_ms(lambda: layer(x), device),
                      nbytes(x, layer.values, layer.meta), flops)
    benchmark.extra_info.update(lay.as_dict(recorder.env), speedup_vs_dense=recorder.ratio(lay, "dense"),
                                dense_ms=base.ms, path=layer.last_path)
    benchmark.pedantic(_sync(lambda: layer(x)), rounds=20, warmup_rounds=2)
