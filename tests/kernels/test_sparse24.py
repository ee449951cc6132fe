"""Triton 2:4 kernels (run in the interpreter on CPU) against kernels/reference.py."""
import math

import pytest
import torch
import torch.nn as nn

from robcomp.kernels import reference as ref
from robcomp.kernels import sparse24 as s24
from robcomp.layers.linear import Sparse24Linear

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# output rounding dominates; fp32 accumulation over K=68 adds far less. bf16 gets a whole ulp
# (2^-7): triton 3.9's interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest).
TOL = {torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
       torch.float32: dict(rtol=1e-5, atol=1e-5)}
N, K = 37, 68  # not multiples of any tile; K/4 = 17 groups (odd: the last meta byte is half used)
LEAD = {1: (1,), 3: (3,), 16: (2, 8), 33: (33,), 128: (2, 4, 16)}


def _packed(n=N, k=K, dtype=torch.float32):
    w = torch.randn(n, k, dtype=torch.float64)
    values, meta = s24.sparse24_pack(w.to(dtype))
    return values, meta


def _close(actual, expected64, dtype, what):
    tol = TOL[dtype]
    err = (actual.double() - expected64).abs()
    bound = tol["atol"] + tol["rtol"] * expected64.abs()
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g} over tolerance {tol} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("m", sorted(LEAD))
def test_forward_and_input_grad_match_reference(m, dtype):
    values, meta = _packed(dtype=dtype)
    bias = torch.randn(N, dtype=dtype, requires_grad=True)
    x = torch.randn(*LEAD[m], K, dtype=dtype, requires_grad=True)
    y = s24.sparse24_linear(x, values, meta, bias)
    assert y.shape == (*LEAD[m], N)

    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    y64 = ref.sparse24_linear(x64, values.double(), meta, b64)
    _close(y, y64, dtype, "forward")

    gy = torch.randn_like(y)
    y.backward(gy)
    y64.backward(gy.double())
    _close(x.grad, x64.grad, dtype, "input gradient")
    _close(bias.grad, b64.grad, dtype, "bias gradient")


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float16)])
def test_mixed_dtypes_cast_values_to_activation_dtype(x_dtype, w_dtype):
    values, meta = _packed(dtype=w_dtype)
    bias = torch.randn(N, dtype=w_dtype)
    if x_dtype == torch.bfloat16:
        # values exactly representable in bf16, so the in-kernel downcast is exact whatever its
        # rounding mode (the interpreter truncates, see TOL)
        values, bias = values.to(torch.bfloat16).to(w_dtype), bias.to(torch.bfloat16).to(w_dtype)
    for m in (2, 20):  # GEMV and tiled paths
        x = torch.randn(m, K, dtype=x_dtype)
        y = s24.sparse24_linear(x, values, meta, bias)
        expected = ref.sparse24_linear(x.double(), values.to(x_dtype).double(), meta, bias.to(x_dtype).double())
        _close(y, expected, x_dtype, f"mixed forward m={m}")


def test_tolerance_can_fail():
    """The checks above would catch a kernel that drops one kept value per group."""
    values, meta = _packed(dtype=torch.float16)
    x = torch.randn(5, K, dtype=torch.float16)
    broken = values.clone()
    broken[:, 1::2] = 0
    with pytest.raises(AssertionError):
        _close(s24.sparse24_linear(x, broken, meta), ref.sparse24_linear(x.double(), values.double(), meta),
               torch.float16, "broken")


def test_pack_unpack_round_trip_is_exact():
    w = torch.randn(N, K, dtype=torch.float16)
    mask = ref.sparse24_mask(w)
    values, meta = s24.sparse24_pack(w)
    assert values.shape == (N, K // 2) and meta.shape == (N, math.ceil(K / 8)) and meta.dtype == torch.uint8
    assert torch.equal(s24.sparse24_unpack(values, meta, K), w * mask)
    # a given 2:4 mask is honoured, even when it keeps the smaller magnitudes
    other = torch.zeros(N, K // 4, 4, dtype=torch.bool)
    other[..., 0] = other[..., 3] = True
    other = other.reshape(N, K)
    v2, m2 = s24.sparse24_pack(w, other)
    assert torch.equal(s24.sparse24_unpack(v2, m2, K), w * other)
    # the kernel computes with exactly the unpacked weight
    x = torch.eye(K, dtype=torch.float32)
    y = s24.sparse24_linear(x, v2.float(), m2)
    assert torch.equal(y.t(), (w * other).float())


def test_pack_rejects_bad_weights():
    with pytest.raises(ValueError, match="divisible by 4"):
        s24.sparse24_pack(torch.randn(4, 6))
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        s24.sparse24_pack(w)
    with pytest.raises(ValueError, match="2:4"):
        s24.sparse24_pack(torch.randn(4, 8), torch.ones(4, 8, dtype=torch.bool))


def test_poisoned_outputs_are_fully_overwritten():
    values, meta = _packed(dtype=torch.float16)
    bias = torch.randn(N, dtype=torch.float16)
    for m in (3, 33):
        x = torch.randn(m, K, dtype=torch.float16)
        out = torch.full((m, N), float("nan"), dtype=torch.float16)
        y = s24.sparse24_forward(x, values, meta, bias, out=out)
        assert y.data_ptr() == out.data_ptr()
        _close(out, ref.sparse24_linear(x.double(), values.double(), meta, bias.double()), torch.float16, "fwd out")
        dy = torch.randn(m, N, dtype=torch.float16)
        dx = torch.full((m, K), float("nan"), dtype=torch.float16)
        s24.sparse24_backward_input(dy, values, meta, out=dx)
        _close(dx, dy.double() @ ref.sparse24_unpack(values, meta, K).double(), torch.float16, "bwd out")


def test_non_contiguous_input_is_handled():
    values, meta = _packed()
    x = torch.randn(K, 6).t()  # [6, K] with stride (1, 6)
    assert not x.is_contiguous()
    _close(s24.sparse24_linear(x, values, meta), ref.sparse24_linear(x.double(), values.double(), meta),
           torch.float32, "non-contiguous")
    xs = torch.randn(20, 2 * K)[:, ::2]  # unit-stride rows but not unit-stride columns
    _close(s24.sparse24_linear(xs, values, meta), ref.sparse24_linear(xs.double(), values.double(), meta),
           torch.float32, "strided")


def test_empty_batch_returns_empty():
    values, meta = _packed()
    y = s24.sparse24_linear(torch.randn(0, K), values, meta)
    assert y.shape == (0, N)


def test_bad_input_errors_name_the_argument():
    values, meta = _packed()
    x = torch.randn(2, K)
    with pytest.raises(ValueError, match="x has last dimension"):
        s24.sparse24_linear(torch.randn(2, K + 4), values, meta)
    with pytest.raises(TypeError, match="x has dtype"):
        s24.sparse24_linear(x.to(torch.int32), values, meta)
    with pytest.raises(ValueError, match="divisible by 4"):
        s24.sparse24_linear(torch.randn(2, 6), torch.randn(N, 3), torch.zeros(N, 1, dtype=torch.uint8))
    with pytest.raises(TypeError, match="meta must be uint8"):
        s24.sparse24_linear(x, values, meta.to(torch.int32))
    with pytest.raises(ValueError, match="meta has shape"):
        s24.sparse24_linear(x, values, meta[:, :-1])
    with pytest.raises(TypeError, match="values has dtype"):
        s24.sparse24_linear(x, values.to(torch.float64), meta)
    with pytest.raises(ValueError, match="bias has shape"):
        s24.sparse24_linear(x, values, meta, torch.randn(N + 1))
    with pytest.raises(ValueError, match="x is on meta"):
        s24.sparse24_forward(torch.empty(2, K, device="meta"), values, meta)
    with pytest.raises(ValueError, match="dy has last dimension"):
        s24.sparse24_backward_input(torch.randn(2, N + 1), values, meta)
    with pytest.raises(ValueError, match="(?i)fine-tune the masked dense weight"):
        s24.sparse24_linear(x, values.clone().requires_grad_(), meta)


def _model(backend):
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(K, 48), nn.ReLU(), nn.Linear(48, N))
    return nn.Sequential(Sparse24Linear.from_linear(dense[0], backend=backend), nn.ReLU(),
                         Sparse24Linear.from_linear(dense[2], backend=backend))


def test_layer_triton_backend_matches_torch_backend():
    triton_model, torch_model = _model("triton"), _model("torch")
    x = torch.randn(2, 5, K)
    xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yr = triton_model(xt), torch_model(xr)
    torch.testing.assert_close(yt, yr, rtol=1e-5, atol=1e-5)
    yt.square().sum().backward()
    yr.square().sum().backward()
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(triton_model[0].bias.grad, torch_model[0].bias.grad, rtol=1e-5, atol=1e-5)
    # an explicit backend runs its kernel and builds no derived copy of the weight
    assert triton_model[0].last_path == "triton" and triton_model[0].derived_bytes() == 0


@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_traces_the_custom_op(compile_backend):
    model = _model("triton")
    x = torch.randn(3, K, requires_grad=True)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    y = compiled(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_ref,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_custom_op_passes_opcheck():
    values, meta = _packed()
    x = torch.randn(3, K, requires_grad=True)
    torch.library.opcheck(torch.ops.robcomp.sparse24_linear.default, (x, values, meta, torch.randn(N)),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


