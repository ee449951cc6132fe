"""robcomp's CPU paths (kernels/cpu.py, kernels/numba_cpu.py) against a float64 computation from
the stored format (kernels/reference.py): forward, input gradient, bias gradient, every path of
every layer, odd shapes, M from 1, fresh random inputs; bytes accounting of derived weights."""
import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

from robcomp.kernels import bf16_tiles as T
from robcomp.kernels import cpu as C
from robcomp.kernels import cpu_int8_gemm as G
from robcomp.kernels import numba_cpu as NB
from robcomp.kernels import reference as R
from robcomp.layers.linear import (FP8DynamicLinear, Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear,
                        Sparse24Int4Linear, Sparse24Linear, tensor_bytes)
from robcomp.recipes import FP8Dynamic, Int4WeightOnly, Int8Dynamic, Int8WeightOnly, Sparse24, Sparse24Int4
from numerics import PoisonedNumpy

pytestmark = pytest.mark.skipif(not C.available(), reason="numba is a declared dependency; absent here")

K_ODD, N_ODD = 200, 52  # not multiples of 8/16 where the format allows it
# float32 paths: fp32 accumulation of exact products; bf16 paths: 8-bit activation mantissa
F32_TOL, BF16_TOL = 2e-5, 1.2e-2


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _layer(cls, recipe, n, k, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    lin.weight.data = torch.randn(n, k) * 0.05
    if bias:
        lin.bias.data = torch.randn(n) * 0.1
    return cls.from_linear(lin, recipe, backend="auto")


# (layer class, recipe, N, K, bf16 activations on the native path, straight-through gradient)
CASES = [
    (Sparse24Linear, Sparse24(), N_ODD, K_ODD, False, False),
    (Sparse24Int4Linear, Sparse24Int4(group_size=32), N_ODD, 224, False, False),
    (Int8WeightOnlyLinear, Int8WeightOnly(), N_ODD, 208, True, False),
    (Int8WeightOnlyLinear, Int8WeightOnly(), N_ODD, K_ODD, True, False),  # torch's kernel refuses K: dense
    (Int4WeightOnlyLinear, Int4WeightOnly(group_size=32), N_ODD, 224, True, False),  # tinygemm refuses N: dense
    (Int4WeightOnlyLinear, Int4WeightOnly(group_size=64), 48, 192, True, False),       # tinygemm
    (Int8DynamicLinear, Int8Dynamic(), N_ODD, K_ODD, False, True),
    (FP8DynamicLinear, FP8Dynamic(), N_ODD, K_ODD, False, True),
]


def _expected(layer, x, dy):
    """float64 forward and dX = dY @ W of the stored weight; the dynamic formats' forward is the
    reference's (activation rounding), their dX the straight-through dY @ dequant(W)."""
    w = layer.dequantize().double()
    b = layer.bias.double()
    if layer.gradient == "straight-through":
        y = layer.forward_reference(x).double()
    else:
        y = x.double() @ w.T + b
    return y, dy.double() @ w, dy.double().reshape(-1, w.shape[0]).sum(0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1].label()}-{c[2]}x{c[3]}")
@pytest.mark.parametrize("m", [1, 2, 5, 33])
def test_every_cpu_path_matches_the_stored_format(case, m, poisoned_buffers):
    cls, recipe, n, k, bf16, _ = case
    layer = _layer(cls, recipe, n, k)
    paths = layer.paths(torch.device("cpu"), torch.float32)
    assert paths[-1] == "reference" and len(paths) >= 2, paths
    x = torch.randn(1, m, k)  # M = m rows behind a leading dimension
    dy = torch.randn(1, m, n)
    y_exp, gx_exp, gb_exp = _expected(layer, x, dy)
    for path in paths:
        xr = x.clone().requires_grad_()
        layer.bias.grad = None
        y = layer.run_path(path, xr)
        assert y.dtype == torch.float32 and y.shape == (1, m, n)
        (gx,) = torch.autograd.grad(y, xr, dy, retain_graph=True)
        y.backward(dy)
        low = path == "bf16_tiles" or (bf16 and path in ("native", "dense"))
        tol = BF16_TOL if low else F32_TOL
        # the int8/int4 formats' dX for M > 1 runs in bf16 tiles where bf16 is fast (kernels/cpu.py)
        tiled_dx = m > 1 and T.fast_bf16() and cls in (Int8DynamicLinear, Int8WeightOnlyLinear, Int4WeightOnlyLinear)
        assert _rel(y, y_exp) < tol, (path, _rel(y, y_exp))
        assert _rel(gx, gx_exp) < (BF16_TOL if tiled_dx else tol), (path, _rel(gx, gx_exp))
        assert _rel(layer.bias.grad, gb_exp) < 1e-5
        if low:  # the bf16 rounding is visible: the bound is not vacuous
            assert _rel(y, y_exp) > 1e-5


@pytest.fixture
def poisoned_buffers(monkeypatch):
    monkeypatch.setattr(C, "np", PoisonedNumpy())
    monkeypatch.setattr(T, "np", PoisonedNumpy())


def _recording_kernels(monkeypatch) -> list:
    ran = []
    compiled = NB.kernel
    monkeypatch.setattr(NB, "kernel", lambda name, *a: ran.append(name) or compiled(name, *a))
    return ran


def _few_rows_case(kind, w, group=32):
    """``(forward x -> y, dX dY -> dX, dense weight)`` of ``w`` packed as ``kind``, through the
    CPU launchers (fp8's per-channel scale folded as its callers fold it)."""
    k = w.shape[1]
    if kind == "sp24":
        values, meta = R.sparse24_pack(w)
        return (lambda x: C.sparse24_linear(x, values, meta, None), lambda dy: C.sp24_bwd(dy, values, meta),
                R.sparse24_unpack(values, meta, k))
    if kind == "fp8":
        codes, scale = R.fp8_dynamic_pack(w)
        bits, s32 = codes.view(torch.uint8), scale.float()
        return (lambda x: C.fp8_fwd(x, bits, s32), lambda dy: C.fp8_bwd(dy * s32, bits),
                R.fp8_dynamic_unpack(codes, scale))
    q, s, z, qm = R.sparse24_int4_pack(w, group)
    return (lambda x: C.sparse24_int4_linear(x, q, s, z, qm, group, None), lambda dy: C.s24i4_bwd(dy, q, s, z, qm, group),
            R.sparse24_int4_unpack(q, s, z, qm, group))


def _few_rows_names(kind, m, direction="fwd"):
    # 4 rows per weight pass, the rest in one more (one row: the one-row kernel)
    return [f"{kind}_{direction}1" if r == 1 else f"{kind}_{direction}m{r}" for r in [min(4, m - i) for i in range(0, m, 4)]]


@pytest.mark.parametrize("kind", ["sp24", "s24i4", "fp8"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 9])
def test_few_rows_2to4_kernels_take_any_weight_row_count(kind, n, m, poisoned_buffers, monkeypatch):
    """The 2:4, 2:4+int4 and fp8 GEMVs for 1 to 8 rows of x (up to 4 per pass over the weight,
    2:4 over several weight rows a fixed distance apart): weight row counts below that and not
    divisible by it must still give every output once, exactly; and those kernels (not the
    blocked ones, not BLAS on a decoded weight) must be what ran."""
    fwd, _, dense = _few_rows_case(kind, torch.randn(n, 64))
    x = torch.randn(m, 64)
    ran = _recording_kernels(monkeypatch)
    y = fwd(x)
    assert ran == _few_rows_names(kind, m)
    assert y.shape == (m, n)
    assert _rel(y, x.double() @ dense.double().T) < F32_TOL


@pytest.mark.parametrize("kind", ["sp24", "s24i4", "fp8"])
@pytest.mark.parametrize("m", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 3, 9])
def test_few_rows_input_gradient_kernels(kind, m, n, poisoned_buffers, monkeypatch):
    """dX = dY W for 2 to 8 rows of dY through the few-rows dX kernels (4 rows per weight pass;
    a single leftover row through the one-row kernel), against float64 of the stored weight."""
    _, bwd, dense = _few_rows_case(kind, torch.randn(n, 64))
    dy = torch.randn(m, n)
    ran = _recording_kernels(monkeypatch)
    gx = bwd(dy)
    assert ran == _few_rows_names(kind, m, "bwd")
    assert gx.shape == (m, 64)
    assert _rel(gx, dy.double() @ dense.double()) < F32_TOL


def test_2to4_takes_the_blocked_kernel_where_x_outgrows_l1(monkeypatch):
    k = 8 * (NB.FEW_ROWS_MAX_MK // 16 + 1)  # two rows of x just beyond the bound
    values, meta = R.sparse24_pack(torch.randn(12, k))
    ran = _recording_kernels(monkeypatch)
    x = torch.randn(2, k)
    y = C.sparse24_linear(x, values, meta, None)
    assert ran == ["sp24_fwdb4"]
    x9 = torch.randn(NB.FEW_ROWS_UP_TO + 1, 64)  # more rows than the few-rows kernels take
    v9, m9 = R.sparse24_pack(torch.randn(12, 64))
    C.sparse24_linear(x9, v9, m9, None)
    assert ran[-1] == "sp24_fwdb16"
    assert _rel(y, x.double() @ R.sparse24_unpack(values, meta, k).double().T) < F32_TOL


@pytest.mark.parametrize("m", sorted({1, 2, 5, 33} | {w + d for w in NB.BLOCK_WIDTHS for d in (-1, 1)}))
@pytest.mark.parametrize("group", [4, 8, 32])
def test_blocked_2to4_kernels_match_float64_at_every_block_width(m, group, poisoned_buffers):
    """The 2:4 and 2:4+int4 forward and dX kernels at row counts just below and above each block
    width (padding), group sizes that take the batch-1 uint16 kernel (8, 32) or not (4)."""
    n, k = 37, 8 * group if group > 4 else 100  # 100: K % 8 == 4, the batch-1 2:4 kernel falls back
    w = torch.randn(n, k)
    values, meta = R.sparse24_pack(w)
    q, s, z, qm = R.sparse24_int4_pack(w, group)
    cases = [(lambda x: C.sparse24_linear(x, values, meta, None), R.sparse24_unpack(values, meta, k)),
             (lambda x: C.sparse24_int4_linear(x, q, s, z, qm, group, None), R.sparse24_int4_unpack(q, s, z, qm, group))]
    for fn, dense in cases:
        x = torch.randn(m, k, requires_grad=True)
        dy = torch.randn(m, n)
        y = fn(x)
        (gx,) = torch.autograd.grad(y, x, dy)
        assert _rel(y, x.detach().double() @ dense.double().T) < F32_TOL
        assert _rel(gx, dy.double() @ dense.double()) < F32_TOL


@pytest.mark.parametrize("m", [1, 2, 5, 33])
def test_int8_gemv_paths_match_float64(m, poisoned_buffers):
    n, k = N_ODD, K_ODD
    q, s = R.int8_weight_pack(torch.randn(n, k))
    x = torch.randn(m, k)
    w = q.double() * s.double()[:, None]
    assert _rel(C.int8_weight_linear_fp32(x, q, s, None), x.double() @ w.T) < F32_TOL
    qd, sd = R.int8_dynamic_pack(torch.randn(n, k))
    y_ref = R.int8_dynamic_linear(x, qd, sd.float(), None)
    assert _rel(C.int8_dynamic_linear_gemv(x, qd, sd, None), y_ref) < F32_TOL
    # the tolerance sees a wrong product: dropping one code's contribution is caught
    q2 = q.clone()
    q2[:, 0] = 0
    assert _rel(C.int8_weight_linear_fp32(x, q2, s, None), x.double() @ w.T) > F32_TOL


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_default_paths_by_batch_and_bf16_speed(fast_bf16, monkeypatch):
    monkeypatch.setattr(T, "fast_bf16", lambda: fast_bf16)
    i8 = _layer(Int8WeightOnlyLinear, Int8WeightOnly(), 32, 64)
    dyn = _layer(Int8DynamicLinear, Int8Dynamic(), 32, 64)
    fp8 = _layer(FP8DynamicLinear, FP8Dynamic(), 32, 64)
    sp = _layer(Sparse24Linear, Sparse24(), 32, 64)
    cpu = torch.device("cpu")
    tiles = "bf16_tiles" if fast_bf16 else "native"
    assert i8.default_path(cpu, torch.float32, 1) == "numba_fp32" and i8.default_path(cpu, torch.float32, 16) == tiles
    assert dyn.default_path(cpu, torch.float32, 1) == "numba_int8" and dyn.default_path(cpu, torch.float32, 4) == "native"
    big = _layer(Int8DynamicLinear, Int8Dynamic(), 2048, 2048, bias=False)  # 4 MB of codes: beyond L2
    assert big.default_path(cpu, torch.float32, 1) == "numba_int8"
    assert big.default_path(cpu, torch.float32, 8) == ("fbgemm" if G.fbgemm_int8() else
                                                       "onednn" if G.onednn_int8() else "native")
    assert big.default_path(cpu, torch.float32, 16) == ("onednn" if G.onednn_int8() else "native")
    assert fp8.default_path(cpu, torch.float32, 1) == "native" and fp8.default_path(cpu, torch.float32, 16) == tiles
    assert fp8.default_path(cpu, torch.float32, 8) == "native"  # the few-rows GEMV: x in L1
    wide = _layer(FP8DynamicLinear, FP8Dynamic(), 16, 8 * C.NB.FEW_ROWS_MAX_MK // 16)
    assert wide.default_path(cpu, torch.float32, 4) == tiles  # x beyond L1: the few-rows GEMV is off
    assert sp.default_path(cpu, torch.float32, 16) == "native"
    # float32 2:4 keeps float32 on every path; stored in bf16 it takes the tiles
    assert "bf16_tiles" not in sp.paths(cpu, torch.float32) and sp.default_path(cpu, torch.float32, 256) == "dense"
    sp16 = _layer(Sparse24Linear, Sparse24(), 32, 64).to(torch.bfloat16)
    assert sp16.default_path(cpu, torch.bfloat16, 256) == ("bf16_tiles" if fast_bf16 else "dense")


def test_bf16_error_bound_fails_when_the_int4_conversion_is_wrong():
    """tinygemm's zero point is (8 - z) * s; using z * s would be caught by the tolerance."""
    layer = _layer(Int4WeightOnlyLinear, Int4WeightOnly(group_size=64), 48, 192)
    d = C.derived_int4(layer.qweight, layer.scales, layer.zeros, 64)
    wrong = dict(d, scales_zeros=torch.stack([layer.scales.float(), layer.zeros.float() * layer.scales.float()],
                                             -1).transpose(0, 1).contiguous().bfloat16())
    x = torch.randn(5, 192)
    y_exp = x.double() @ layer.dequantize().double().T + layer.bias.double()
    good = C.int4_linear(x, layer.qweight, layer.scales, layer.zeros, 64, layer.bias, d)
    bad = C.int4_linear(x, layer.qweight, layer.scales, layer.zeros, 64, layer.bias, wrong)
    assert _rel(good, y_exp) < BF16_TOL < _rel(bad, y_exp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_paths_by_activation_dtype(dtype):
    layer = _layer(Sparse24Linear, Sparse24(), 32, 64)
    paths = layer.paths(torch.device("cpu"), dtype)
    x = torch.randn(3, 64).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    if dtype == torch.float16:  # no native fp16 CPU kernel: the reference runs
        assert paths == ("reference",) and layer.last_path == "reference"
    else:
        assert "native" in paths
        y_exp = x.double() @ layer.dequantize().double().T + layer.bias.double()
        assert _rel(y, y_exp) < 1e-2


def test_outputs_are_fully_written_and_nan_propagates():
    layer = _layer(Sparse24Linear, Sparse24(), N_ODD, K_ODD)
    x = torch.randn(1, K_ODD)
    assert torch.isfinite(layer.run_path("native", x)).all()
    x[0, :] = float("nan")
    assert torch.isnan(layer.run_path("native", x)).all()  # fastmath keeps NaN semantics
    y = C.sparse24_linear(torch.randn(4, K_ODD), layer.values, layer.meta, None)
    assert torch.isfinite(y).all()


def test_derived_weights_are_counted_in_bytes():
    layer = _layer(Int4WeightOnlyLinear, Int4WeightOnly(group_size=64), 48, 192)
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert tensor_bytes(layer) == layer.compressed_bytes() == stored
    layer(torch.randn(2, 192))
    assert layer.last_path == "native"
    d = layer.derived_bytes()
    # tinygemm codes [48, 96] uint8 + [3, 48, 2] bf16 scales/zeros
    assert d == 48 * 96 + 3 * 48 * 2 * 2
    assert tensor_bytes(layer) == layer.compressed_bytes() == stored + d
    assert tensor_bytes(nn.Sequential(layer)) == stored + d
    # a changed packed weight drops and rebuilds the derived copy
    layer.qweight.add_(0)
    assert layer.derived_bytes() == 0


ONEDNN = pytest.mark.skipif(not G.onednn_int8(), reason="oneDNN's u8 x s8 GEMM is not exact on this CPU "
                            "(no VNNI dot products): the 'onednn' path is not offered")


@ONEDNN
def test_onednn_int8_copy_is_counted_in_bytes():
    layer = _layer(Int8DynamicLinear, Int8Dynamic(), 48, 96)
    stored = tensor_bytes(layer)
    layer.run_path("onednn", torch.randn(3, 96))
    assert layer.derived_bytes() == 48 * 96 + 48 * 8  # the prepacked codes and int64 zero points
    assert tensor_bytes(layer) == stored + layer.derived_bytes()
    # the opaque prepacked tensor stays behind in copies and pickles; they rebuild it on use
    x = torch.randn(2, 96)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.derived_bytes() == 0
        torch.testing.assert_close(clone.run_path("onednn", x), layer.run_path("onednn", x), rtol=0, atol=0)
        assert clone.derived_bytes() == layer.derived_bytes()


def test_onednn_int8_probe_rejects_a_saturating_gemm(monkeypatch):
    """Without VNNI a u8 x s8 GEMM sums the unsigned bytes' products in int16 pairs, with
    saturation, and removes the zero point after (128 * column sums); the probe must see it."""
    def saturating(xu, d, s32):
        w = torch.full((16, 64), 127, dtype=torch.int32)
        w[1::2] = -127
        pairs = (xu.to(torch.int32).reshape(xu.shape[0], 1, -1, 2) * w.reshape(1, 16, -1, 2)).sum(-1)
        acc = pairs.clamp(-32768, 32767).sum(-1) - 128 * w.sum(1)
        return acc.to(torch.float32) * s32

    monkeypatch.setattr(G, "_onednn_mm", saturating)
    assert G.onednn_int8.__wrapped__() is False
    monkeypatch.setattr(G, "_fbgemm_mm", lambda codes, d: saturating((codes + 128).to(torch.uint8), d, torch.ones(16)))
    assert G.fbgemm_int8.__wrapped__() is False


FBGEMM = pytest.mark.skipif(not G.fbgemm_int8(), reason="fbgemm's u8 x s8 GEMM is not exact on this CPU "
                            "(no VNNI dot products): the 'fbgemm' path is not offered")


@FBGEMM
@ONEDNN
@pytest.mark.parametrize("m", [1, 3, 17])
def test_fbgemm_and_onednn_give_the_same_exact_product(m):
    """Same codes, exact int32 sums, the same two float32 roundings: bit-identical outputs."""
    layer = _layer(Int8DynamicLinear, Int8Dynamic(), N_ODD, K_ODD)
    x = torch.randn(m, K_ODD) * 3
    with torch.no_grad():
        y_fb, y_dn = layer.run_path("fbgemm", x), layer.run_path("onednn", x)
        xq, xs = R.quantize_rows_int8(x)
        acc = xq.to(torch.int64) @ layer.qweight.to(torch.int64).t()
    torch.testing.assert_close(y_fb, y_dn, rtol=0, atol=0)
    want = (acc.to(torch.float32) * layer.scale.float()) * xs[:, None] + layer.bias
    torch.testing.assert_close(y_fb, want, rtol=0, atol=0)


@FBGEMM
def test_fbgemm_copy_is_counted_and_the_engine_restored():
    layer = _layer(Int8DynamicLinear, Int8Dynamic(), 48, 96)
    stored = tensor_bytes(layer)
    engine = torch.backends.quantized.engine
    layer.run_path("fbgemm", torch.randn(3, 96))
    assert torch.backends.quantized.engine == engine
    # fbgemm's quantized copy of the codes, its packed matrix, per-channel offsets/scales/zero points
    assert layer.derived_bytes() == 2 * 48 * 96 + 12 * 48
    assert tensor_bytes(layer) == stored + layer.derived_bytes()
    x = torch.randn(2, 96)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.derived_bytes() == 0
        torch.testing.assert_close(clone.run_path("fbgemm", x), layer.run_path("fbgemm", x), rtol=0, atol=0)
    layer.scale.mul_(2)  # the scales are baked into the packed params: an edit rebuilds them
    with torch.no_grad():
        torch.testing.assert_close(layer.run_path("fbgemm", x), layer.run_path("onednn" if G.onednn_int8() else "native", x),
                                   rtol=1e-6, atol=1e-6)


@FBGEMM
def test_torch_compile_runs_int_mm_where_fbgemm_was_chosen():
    torch.manual_seed(0)
    model = nn.Sequential(Int8DynamicLinear.from_linear(nn.Linear(64, 32)), nn.ReLU())
    model[0].tuned_paths[("cpu", torch.float32, 8)] = "fbgemm"
    x = torch.randn(5, 64, requires_grad=True)
    expected = model(x)
    assert model[0].last_path == "fbgemm"
    y = torch.compile(model, fullgraph=True)(x)  # fbgemm's packed params cannot be traced
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_ref,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_backend_cpu_and_errors():
    layer = _layer(Int8DynamicLinear, Int8Dynamic(), 16, 32)
    layer.backend = "cpu"
    layer(torch.randn(2, 32))
    assert layer.last_path == "native"
    with pytest.raises(ValueError, match="in_features"):
        C.int8_dynamic_linear(torch.randn(2, 31), layer.qweight, layer.scale, None)
    with pytest.raises(ValueError, match="empty"):
        C.sparse24_linear(torch.randn(0, 32), *R.sparse24_pack(torch.randn(8, 32)), None)
    with pytest.raises(TypeError, match="floating-point"):
        C.sparse24_linear(torch.ones(2, 32, dtype=torch.int32), *R.sparse24_pack(torch.randn(8, 32)), None)
    with pytest.raises(ValueError, match="path"):
        layer.run_path("semi_structured", torch.randn(2, 32))


@pytest.mark.parametrize("kind", ["int8", "int4", "sparse24", "sparse24_int4", "fp8"])
def test_dense_unpack_matches_reference(kind):
    w = torch.randn(24, 128)
    if kind == "int8":
        t, exp, g = R.int8_weight_pack(w), None, None
        exp = R.int8_weight_unpack(*t)
    elif kind == "int4":
        g = 32
        t = R.int4_pack(w, g)
        exp = R.int4_unpack(*t, g)
    elif kind == "sparse24":
        t, g = R.sparse24_pack(w), None
        exp = R.sparse24_unpack(*t, 128)
    elif kind == "fp8":
        t, g = R.fp8_dynamic_pack(w), None
        exp = R.fp8_dynamic_unpack(*t)
    else:
        g = 32
        t = R.sparse24_int4_pack(w, g)
        exp = R.sparse24_int4_unpack(*t, g)
    got = C.dense_weight(kind, *t, group_size=g)
    if kind in ("int8", "int4"):  # bf16, round to nearest even
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, exp.to(torch.bfloat16), rtol=0, atol=0)
    else:
        torch.testing.assert_close(got, exp.float(), rtol=0, atol=0)


def test_torch_compile_traces_the_cpu_paths():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    model = nn.Sequential(Sparse24Linear.from_linear(dense[0]), nn.ReLU(),
                          Int4WeightOnlyLinear.from_linear(dense[2], Int4WeightOnly(group_size=32)), nn.ReLU(),
                          Int8DynamicLinear.from_linear(dense[4]))
    x = torch.randn(1, 64, requires_grad=True)
    expected = model(x)  # eager call first: builds the derived weights (never built while tracing)
    assert [model[i].last_path for i in (0, 2, 4)] == ["native", "native", "numba_int8"]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_ref,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


@ONEDNN
def test_torch_compile_traces_the_onednn_int8_path():
    torch.manual_seed(0)
    model = nn.Sequential(Int8DynamicLinear.from_linear(nn.Linear(64, 32)), nn.ReLU())
    model[0].onednn_from_weights = 0  # the default for this small layer would be torch._int_mm
    x = torch.randn(5, 64, requires_grad=True)
    expected = model(x)
    assert model[0].last_path == "onednn"
    y = torch.compile(model, fullgraph=True)(x)  # inductor: robcomp's op wraps oneDNN's
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_ref,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_int8_row_quantiser_matches_the_reference_bit_for_bit():
    x = torch.randn(7, 131) * torch.logspace(-3, 3, 7)[:, None]
    x[0, :4] = torch.tensor([127.0, 63.5, -0.5 * 127 / 127, 0.0])  # exact ties round away from zero
    x[1] = 0.0  # an all-zero row uses the 1e-12 floor
    q, s = C.quantize_int8_rows(x)
    q_ref, s_ref = R.quantize_rows_int8(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    qu, su = C.quantize_uint8_rows(x)  # oneDNN's input: the same codes shifted by 128
    assert qu.dtype == torch.uint8 and torch.equal(qu.to(torch.int16) - 128, q_ref.to(torch.int16))
    assert torch.equal(su, s_ref)
    x[2, 5] = float("nan")
    _, s_nan = C.quantize_int8_rows(x)
    assert torch.isnan(s_nan[2]) and torch.isfinite(s_nan[3:]).all()


@pytest.mark.parametrize("m", [1, 6])
def test_inplace_op_after_a_cpu_layer_keeps_gradients(m):
    """The CPU kernels return buffers they own; an in-place ReLU after them must stay legal."""
    layer = _layer(Sparse24Linear, Sparse24(), 32, 64, bias=False)
    x = torch.randn(m, 64, requires_grad=True)
    y = torch.relu_(layer.run_path("native", x))
    y.sum().backward()
    w = layer.dequantize().double()
    mask = (x.double() @ w.T > 0).double()
    assert _rel(x.grad, mask @ w) < F32_TOL


@pytest.mark.parametrize("m", [1, 2, 5, 16, 33])
@pytest.mark.parametrize("cls,recipe,n,k,_bias,_dyn", CASES + [(Sparse24Linear, Sparse24(), 128, 64, False, False),
                                                          (Sparse24Int4Linear, Sparse24Int4(group_size=32), 128, 64,
                                                           False, False)],
                         ids=lambda v: getattr(v, "__name__", None))
def test_cpu_outputs_are_contiguous_tensors_of_their_own(cls, recipe, n, k, _bias, _dyn, m):
    """Every CPU path's output is a contiguous [M, N] tensor owning its storage, never a strided
    view of a padded buffer: compiled graphs (aot_eager, inductor) replay outputs with the fake's
    strides, so a view read back that way returns another layer's memory (NaN logits in a compiled
    BERT)."""
    for bias in (False, True):  # a bias add keeps its operand's strides
        layer = _layer(cls, recipe, n, k, bias=bias)
        paths = layer.paths(torch.device("cpu"), torch.float32)
        for path in paths:
            for x in (torch.randn(m, k), torch.randn(m, k, requires_grad=True)):
                y = layer.run_path(path, x)
                assert y.shape == (m, n) and y.is_contiguous(), (path, y.stride())
                assert y.untyped_storage().nbytes() == y.numel() * y.element_size(), f"{path}: a view of a larger buffer"



@pytest.mark.parametrize("case", [c for c in CASES if c[0] is not Int8DynamicLinear], ids=lambda c: f"{c[1].label()}-{c[3]}")
@pytest.mark.parametrize("m", [1, 3, 17])
def test_bf16_tiles_with_a_partial_last_tile(case, m, monkeypatch, poisoned_buffers):
    """Several tiles of 16 rows and a last one of 4 (N = 52): every row decoded, none left over
    (2:4 in bf16 storage, where it offers the path)."""
    cls, recipe, _, k, _, _ = case
    n = N_ODD
    for name in ("TILE_BYTES", "MID_M_TILE_BYTES", "DX_TILE_BYTES"):  # forward (every M) and dX tiles
        monkeypatch.setattr(T, name, 16 * 2 * k)
    assert T.tile_rows(n, k) == 16 and n % 16 == 4
    layer = _layer(cls, recipe, n, k)
    if cls is Sparse24Linear:
        layer.values.data = layer.values.data.bfloat16()
        assert "bf16_tiles" in layer.paths(torch.device("cpu"), torch.float32)
    x, dy = torch.randn(m, k), torch.randn(m, n)
    y_exp, gx_exp, _ = _expected(layer, x, dy)
    xr = x.clone().requires_grad_()
    y = layer.run_path("bf16_tiles", xr)
    y.backward(dy)
    assert 1e-5 < _rel(y, y_exp) < BF16_TOL and _rel(xr.grad, gx_exp) < BF16_TOL


def test_fp8_bit_decoders_are_exact_for_every_code():
    """The bit-arithmetic e4m3 decoders (numba GEMV/unpack, bf16 tiles) against torch's float8
    conversion, all 254 non-NaN codes, subnormals and both zeros included."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F].reshape(2, 127).repeat(1, 2)[:, :248].contiguous()
    exact = codes.view(torch.float8_e4m3fn).to(torch.float32)
    scale = torch.rand(2) + 0.5
    w = C.dense_weight("fp8", codes.view(torch.float8_e4m3fn), scale)  # numba unpack, scale folded in
    assert torch.equal(w, exact * scale[:, None])
    x = torch.randn(1, 248, dtype=torch.float64)
    y = C._fp8_fwd(x.float(), codes, torch.ones(2))
    assert _rel(y, x @ exact.double().T) < F32_TOL
    tiles = T._Tiles("fp8", 2, 248, (codes.numpy(),))
    ((_, _, tile),) = list(tiles)
    assert torch.equal(tile.float(), exact) and T.fp8_has_nan(codes) is False


def test_fp8_nan_codes_propagate_on_every_cpu_path():
    layer = _layer(FP8DynamicLinear, FP8Dynamic(), 32, 64)
    layer.qweight_bits[3, 5] = 0x7F  # a NaN code in output feature 3
    x = torch.randn(4, 64)
    for path in layer.paths(torch.device("cpu"), torch.float32):
        y = layer.run_path(path, x)
        assert torch.isnan(y[:, 3]).all() and torch.isfinite(y[:, :3]).all(), path


@pytest.mark.parametrize("cls,recipe,k", [(Sparse24Linear, Sparse24(), 196), (Sparse24Linear, Sparse24(), 200),
                                          (Sparse24Int4Linear, Sparse24Int4(group_size=32), 224)])
def test_batch1_2to4_input_gradient(cls, recipe, k, poisoned_buffers):
    """M = 1 dX: the lane kernels where K % 8 == 0, the blocked kernel otherwise."""
    layer = _layer(cls, recipe, N_ODD, k)
    x, dy = torch.randn(1, k), torch.randn(1, N_ODD)
    _, gx_exp, _ = _expected(layer, x, dy)
    xr = x.clone().requires_grad_()
    layer.run_path("native", xr).backward(dy)
    assert _rel(xr.grad, gx_exp) < F32_TOL


@pytest.mark.parametrize("m", [C.SP24_DX_TILES_FROM_M, C.SP24_DX_TILES_FROM_M + 3])
def test_2to4_large_batch_input_gradient_in_float32_tiles(m, monkeypatch, poisoned_buffers):
    """From SP24_DX_TILES_FROM_M rows the 2:4 dX runs BLAS on exact float32 tiles (three tiles of
    16 rows and one of 4 here): float32 accuracy, every row of W used."""
    monkeypatch.setattr(T, "F32_DX_TILE_BYTES", 16 * 4 * K_ODD)
    layer = _layer(Sparse24Linear, Sparse24(), N_ODD, K_ODD)
    x, dy = torch.randn(m, K_ODD), torch.randn(m, N_ODD)
    _, gx_exp, _ = _expected(layer, x, dy)
    xr = x.clone().requires_grad_()
    layer.run_path("native", xr).backward(dy)
    assert _rel(xr.grad, gx_exp) < F32_TOL
