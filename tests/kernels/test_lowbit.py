"""Low-bit formats and Triton kernels (int8/int4 weight-only, int8/fp8 dynamic), run in the CPU
interpreter (TRITON_INTERPRET=1, set by conftest.py). Small shapes: the interpreter is slow."""

import pytest
import torch
import torch.nn as nn

import robcomp as rc
from robcomp.kernels import lowbit as L
from robcomp.kernels import reference as R
from robcomp.layers import linear as rnn

from numerics import N_ODD, TOL, rel_err, sqnr_db


def make(fmt, n, k, dtype, group=64):
    """(packed args without x/bias, launcher, dense dequantised weight in float64, original weight)."""
    w = torch.randn(n, k)
    if fmt == "int8":
        q, s = R.int8_weight_pack(w.to(dtype))
        return (q, s), L.int8_weight_forward, R.int8_weight_unpack(q, s, torch.float64), w
    if fmt == "int4":
        q, s, z = R.int4_pack(w.to(dtype), group)
        return (q, s, z, group), L.int4_forward, R.int4_unpack(q, s, z, group, torch.float64), w
    if fmt == "int8dyn":
        q, s = R.int8_dynamic_pack(w)
        return (q, s), L.int8_dynamic_forward, R.int8_dynamic_unpack(q, s, torch.float64), w
    raise ValueError(fmt)


# ----------------------------------------------------------------------------- formats
def test_int8_round_trip():
    w = torch.randn(N_ODD, 70)
    q, s = R.int8_weight_pack(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (N_ODD,)
    assert q.abs().max() <= 127
    err = (R.int8_weight_unpack(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()
    q2, s2 = R.int8_weight_pack(R.int8_weight_unpack(q, s, torch.float64))
    assert torch.equal(q2, q)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip(group):
    w = torch.randn(N_ODD, 256)
    q, s, z = R.int4_pack(w, group)
    assert q.dtype == torch.uint8 and q.shape == (N_ODD, 128) and s.shape == z.shape == (N_ODD, 256 // group)
    codes = torch.stack([q & 0xF, q >> 4], -1).reshape(N_ODD, 256)
    # low nibble = even k: code of column 0 and 1 sit in byte 0
    deq = R.int4_unpack(q, s, z, group)
    ss = s.repeat_interleave(group, 1)
    assert ((deq - w).abs() <= ss / 2 + 1e-5).all()
    zz = z.repeat_interleave(group, 1)
    assert torch.allclose(deq, (codes.float() - zz) * ss)
    q2, _, _ = R.int4_pack(deq, group)
    assert torch.equal(q2, q)


def test_dynamic_round_trip():
    w = torch.randn(N_ODD, 96)
    q, s = R.int8_dynamic_pack(w)
    assert s.dtype == torch.float32
    assert ((R.int8_dynamic_unpack(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()
    q8, s8 = R.fp8_dynamic_pack(w)
    assert q8.dtype == torch.float8_e4m3fn
    deq = R.fp8_dynamic_unpack(q8, s8)
    assert ((deq - w).abs() <= w.abs() * 2 ** -4 + s8[:, None] * 2 ** -9).all()  # 3 mantissa bits
    x = torch.randn(5, 96)
    xq, xs = R.quantize_rows_int8(x)
    assert ((xq.float() * xs[:, None] - x).abs() <= xs[:, None] / 2 + 1e-6).all()


# ----------------------------------------------------------------------------- forward kernels
@pytest.mark.parametrize("m", [1, 3, 16, 33, 128])
@pytest.mark.parametrize("fmt,k", [("int8", 200), ("int4", 256), ("int8dyn", 200)])
def test_forward_fp16_all_m(fmt, k, m):
    args, fwd, wd, w = make(fmt, N_ODD, k, torch.float16)
    x = torch.randn(m, k).half()
    b = torch.randn(N_ODD).half()
    y = fwd(x, *args, b)
    assert y.shape == (m, N_ODD) and y.dtype == torch.float16
    if fmt == "int8dyn":  # exact integer dot vs the reference's, then scales
        ref = R.int8_dynamic_linear(x, *args, b).double()
    else:
        ref = x.double() @ wd.T + b.double()
    assert rel_err(y, ref) < TOL[torch.float16]
    # against the original weight: fails if scales or zeros were wrong
    bound = {"int8": 35, "int4": 17, "int8dyn": 30}[fmt]
    assert sqnr_db(y, x.double() @ w.double().T + b.double()) > bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("fmt,k", [("int8", 200), ("int4", 256), ("int8dyn", 200)])
def test_forward_dtypes(fmt, k, m, dtype):
    args, fwd, wd, w = make(fmt, N_ODD, k, dtype)
    x = torch.randn(2, m, k).to(dtype)  # leading batch dimensions are flattened
    y = fwd(x, *args)
    assert y.shape == (2, m, N_ODD) and y.dtype == dtype
    ref = R.int8_dynamic_linear(x, *args).double() if fmt == "int8dyn" else x.double() @ wd.T
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("group", [32, 128])
def test_int4_groups(group):
    args, fwd, wd, w = make("int4", N_ODD, 256, torch.float16, group)
    for m in (2, 20):
        x = torch.randn(m, 256).half()
        assert rel_err(fwd(x, *args), x.double() @ wd.T) < TOL[torch.float16]


@pytest.mark.parametrize("k,group,dtype", [(1536, 128, torch.float32), (384, 64, torch.float16),
                                            (640, 32, torch.bfloat16)])
def test_int4_word_gemv_at_m1(k, group, dtype):
    """M = 1 runs the word GEMV (tiles of whole groups dividing K: 512, 128 and 128 columns here),
    also from codes whose storage starts off a 4-byte boundary, with bias and split-K."""
    q, s, z = R.int4_pack(torch.randn(N_ODD, k).to(dtype), group)
    wd = R.int4_unpack(q, s, z, group, torch.float64)
    buf = torch.zeros(q.numel() + 1, dtype=torch.uint8)
    q_odd = buf[1:].view(q.shape)
    q_odd.copy_(q)
    assert q_odd.is_contiguous() and q_odd.data_ptr() % 4
    x = torch.randn(1, k).to(dtype)
    b = torch.randn(N_ODD).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    ref = x.double() @ wd.T + b.double()
    for codes, split in ((q, None), (q_odd, None), (q, 3)):
        assert rel_err(L.int4_forward(x, codes, s, z, group, b, split_k=split), ref) < tol


@pytest.mark.parametrize("fmt,k", [("int8", 1100), ("int4", 1024)])
def test_split_k(fmt, k):
    args, fwd, wd, w = make(fmt, 19, k, torch.float32)
    x = torch.randn(2, k)
    for split in (2, 3):
        assert rel_err(fwd(x, *args, None, split_k=split), x.double() @ wd.T) < 1e-5


def test_quantize_rows_matches_reference():
    x = torch.randn(7, 300).half()
    x[3] = 0  # all-zero row
    q, s = L.quantize_rows(x)
    rq, rs = R.quantize_rows_int8(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)


def _poisoned_empty(real_empty):
    def empty(*shape, dtype=None, **kw):
        t = real_empty(*shape, dtype=dtype, **kw)
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(77)
    return empty


@pytest.mark.parametrize("fmt,k,m", [("int8", 200, 3), ("int4", 256, 3), ("int4", 256, 20), ("int8dyn", 200, 20)])
def test_poisoned_outputs(fmt, k, m, monkeypatch):
    """Every output (and split-K partial) is written: buffers start as NaN / garbage."""
    args, fwd, wd, w = make(fmt, N_ODD, k, torch.float32)
    x = torch.randn(m, k)
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    kw = {"split_k": 2} if fmt != "int8dyn" and m <= L.SMALL_M else {}
    y = fwd(x, *args, None, **kw)
    monkeypatch.undo()
    ref = R.int8_dynamic_linear(x, *args).double() if fmt == "int8dyn" else x.double() @ wd.T
    assert torch.isfinite(y).all() and rel_err(y, ref) < 1e-5


def test_fp8_kernel_in_interpreter(monkeypatch):
    """The public path refuses CPU; the kernels themselves are checked in the interpreter. The
    interpreter's fp32 -> e4m3 cast is not the GPU's round-to-nearest (it fails to carry into the
    next binade: 124.3 -> 64), so the quantiser is checked loosely and the GEMM exactly."""
    monkeypatch.setattr(L, "_FP8_INTERPRETER_OK", True)
    w = torch.randn(N_ODD, 128)
    q, s = R.fp8_dynamic_pack(w)
    x = torch.randn(20, 128).half()
    xq, xs = L.quantize_rows(x, fp8=True)
    rq, rs = R.quantize_rows_fp8(x)
    assert torch.equal(xs, rs)
    assert (xq.float() != rq.float()).float().mean() < 0.05
    b = torch.randn(N_ODD).half()
    y = L.fp8_dynamic_forward(x, q, s, b)
    exact = (xq.double() @ q.double().T) * xs.double()[:, None] * s.double()[None, :] + b.double()
    assert rel_err(y, exact) < TOL[torch.float16]
    assert sqnr_db(y, x.double() @ w.double().T + b.double()) > 15
    xg = torch.randn(3, 128, requires_grad=True)
    yg = L.fp8_dynamic_linear(xg, q, s)
    gy = torch.randn_like(yg)  # random upstream gradient: a ones vector only checks W's column sums
    yg.backward(gy)
    assert rel_err(xg.grad, gy.double() @ R.fp8_dynamic_unpack(q, s, torch.float64)) < TOL[torch.float32]


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt,k", [("int8", 200), ("int4", 256), ("int8dyn", 200)])
def test_input_gradient(fmt, k, dtype):
    wargs, _, wd, w = make(fmt, N_ODD, k, dtype)
    fn = {"int8": L.int8_weight_linear, "int4": L.int4_linear, "int8dyn": L.int8_dynamic_linear}[fmt]
    x = torch.randn(2, 9, k).to(dtype).requires_grad_()
    b = torch.randn(N_ODD).to(dtype).requires_grad_()
    y = fn(x, *wargs, b)
    gy = torch.randn_like(y)
    y.backward(gy)
    # weight-only: exact gradient; dynamic: straight-through (dY @ dequant(W))
    assert rel_err(x.grad, gy.double() @ wd) < 4 * TOL[dtype]
    assert rel_err(b.grad, gy.double().sum((0, 1))) < 4 * TOL[dtype]


def test_weight_gradient_refused():
    q, s, z = R.int4_pack(torch.randn(8, 64), 32)
    x = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        L.int4_linear(x, q, s.requires_grad_(), z, 32)
    q8, s8 = R.int8_weight_pack(torch.randn(8, 64))
    with pytest.raises(ValueError, match="frozen"):
        L.int8_weight_linear(x, q8, s8.requires_grad_())


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    k = 128
    q8, s8 = R.int8_weight_pack(torch.randn(N_ODD, k))
    q4, s4, z4 = R.int4_pack(torch.randn(N_ODD, k), 64)
    qd, sd = R.int8_dynamic_pack(torch.randn(N_ODD, k))
    b = torch.randn(N_ODD)

    def f(x):
        return (L.int8_weight_linear(x, q8, s8, b) + L.int4_linear(x, q4, s4, z4, 64, None)
                + L.int8_dynamic_linear(x, qd, sd, b)).square().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1 = torch.randn(3, k, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    out = cf(x1)
    out.backward()
    f(x2).backward()
    assert torch.allclose(out, f(x2.detach()), rtol=1e-5)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    w = torch.randn(8, 96)
    with pytest.raises(ValueError, match="group_size=64 does not divide in_features=96"):
        R.int4_pack(w, 64)
    with pytest.raises(ValueError, match="does not divide"):
        R.int4_pack(torch.randn(8, 33), 32)  # odd K
    bad = w.clone()
    bad[1, 2] = float("nan")
    for pack in (R.int8_weight_pack, R.int8_dynamic_pack, R.fp8_dynamic_pack, lambda t: R.int4_pack(t, 32)):
        with pytest.raises(ValueError, match="NaN"):
            pack(bad)
    q, s, z = R.int4_pack(w, 32)
    x = torch.randn(2, 96)
    with pytest.raises(ValueError, match="group_size=64 does not divide"):
        L.int4_forward(x, q, s, z, 64)
    with pytest.raises(ValueError, match="in_features"):
        L.int4_forward(torch.randn(2, 95), q, s, z, 32)
    with pytest.raises(TypeError, match="dtype"):
        L.int4_forward(x.to(torch.int32), q, s, z, 32)
    with pytest.raises(ValueError, match="empty"):
        L.int4_forward(torch.randn(0, 96), q, s, z, 32)
    with pytest.raises(TypeError, match="qweight"):
        L.int8_weight_forward(x, q, s[:, 0])
    q8, s8 = R.int8_weight_pack(w)
    with pytest.raises(ValueError, match="bias"):
        L.int8_weight_forward(x, q8, s8, torch.randn(9))


def test_fp8_unsupported_device():
    assert not L.fp8_supported("cpu")
    q, s = R.fp8_dynamic_pack(torch.randn(8, 64))
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        L.fp8_dynamic_linear(torch.randn(2, 64), q, s)
    layer = rnn.FP8DynamicLinear.from_linear(nn.Linear(64, 8), rc.FP8Dynamic(), backend="triton")
    with pytest.raises(ValueError, match="8.9"):
        layer(torch.randn(2, 64))


# ----------------------------------------------------------------------------- layers
@pytest.mark.parametrize("recipe,cls,grad", [
    (rc.Int8WeightOnly(), rnn.Int8WeightOnlyLinear, "exact"),
    (rc.Int4WeightOnly(group_size=32), rnn.Int4WeightOnlyLinear, "exact"),
    (rc.Int8Dynamic(), rnn.Int8DynamicLinear, "straight-through"),
    (rc.FP8Dynamic(), rnn.FP8DynamicLinear, "straight-through"),
])
def test_layers_torch_vs_triton(recipe, cls, grad):
    lin = nn.Linear(64, N_ODD)
    torch_layer = cls.from_linear(lin, recipe, backend="torch")
    assert type(torch_layer).gradient == grad
    assert torch_layer.in_features == 64 and torch_layer.out_features == N_ODD
    x = torch.randn(3, 64, requires_grad=True)
    y = torch_layer(x)
    gy = torch.randn_like(y)  # random upstream gradient: a ones vector only checks W's column sums
    y.backward(gy)
    # the layer's weight and forward against kernels/reference.py (not against its own dequantize())
    w, b = lin.weight.detach(), lin.bias.detach()
    if isinstance(recipe, rc.Int4WeightOnly):
        q4, s4, z4 = R.int4_pack(w, recipe.group_size)
        wd = R.int4_unpack(q4, s4, z4, recipe.group_size, torch.float64)
        y_ref = x.detach().double() @ wd.T + b.double()
    else:
        pack, unpack, linear = {rnn.Int8WeightOnlyLinear: (R.int8_weight_pack, R.int8_weight_unpack, None),
                                rnn.Int8DynamicLinear: (R.int8_dynamic_pack, R.int8_dynamic_unpack,
                                                        R.int8_dynamic_linear),
                                rnn.FP8DynamicLinear: (R.fp8_dynamic_pack, R.fp8_dynamic_unpack,
                                                       R.fp8_dynamic_linear)}[cls]
        qw, sw = pack(w)
        wd = unpack(qw, sw, torch.float64)
        y_ref = (x.detach().double() @ wd.T + b.double() if linear is None
                 else linear(x.detach(), qw, sw, b).double())
    assert rel_err(y.detach(), y_ref) < TOL[torch.float32]
    assert rel_err(x.grad, gy.double() @ wd) < TOL[torch.float32]
    assert sqnr_db(y.detach(), lin(x).detach().double()) > 15
    if cls is rnn.FP8DynamicLinear:
        assert torch_layer.qweight.dtype == torch.float8_e4m3fn
        torch_layer.half()  # the codes survive (stored as raw bits)
        assert torch_layer.qweight_bits.dtype == torch.uint8
        return
    tri = cls.from_linear(lin, recipe, backend="triton")
    xt = x.detach().clone().requires_grad_()
    yt = tri(xt)
    yt.backward(gy)
    assert torch.allclose(yt, y, rtol=1e-4, atol=1e-4)
    assert torch.allclose(xt.grad, x.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe,cls", [(rc.Int8WeightOnly(), rnn.Int8WeightOnlyLinear),
                                        (rc.Int4WeightOnly(group_size=32), rnn.Int4WeightOnlyLinear)])
def test_bitsandbytes_backend_needs_cuda(recipe, cls):
    layer = cls.from_linear(nn.Linear(64, 8), recipe, backend="bitsandbytes")
    with pytest.raises(ValueError, match="bitsandbytes.*CUDA"):
        layer(torch.randn(2, 64))


def test_aot_specs_well_formed():
    specs = L.aot_specs() + L.aot_specs_fp8()
    names = [s[0] for s in specs]
    assert len(names) == len(set(names))
    for name, fn, sig, consts, opts in specs:
        assert list(sig) == list(fn.arg_names), name
        assert {a for a, t in sig.items() if t == "constexpr"} == set(consts), name
        assert {"num_warps", "num_stages", "expect_mma"} <= set(opts)
