"""2:4 + int4 format and Triton kernels, run in the CPU interpreter (TRITON_INTERPRET=1)."""

import pytest
import torch
import torch.nn as nn

import robcomp as rc
from robcomp.kernels import reference as R
from robcomp.kernels import sparse24_lowbit as S
from robcomp.layers import linear as rnn

from numerics import N_ODD, TOL, rel_err, sqnr_db


def packed(n, k, group, dtype=torch.float32):
    w = torch.randn(n, k)
    q, s, z, m = R.sparse24_int4_pack(w.to(dtype), group)
    return w, (q, s, z, m, group), R.sparse24_int4_unpack(q, s, z, m, group, torch.float64)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_round_trip(group):
    w = torch.randn(N_ODD, 256)
    q, s, z, m = R.sparse24_int4_pack(w, group)
    assert q.shape == (N_ODD, 64) and q.dtype == torch.uint8
    assert s.shape == z.shape == (N_ODD, 256 // group) and m.shape == (N_ODD, 32)
    dense = R.sparse24_int4_unpack(q, s, z, m, group)
    mask = R.sparse24_mask(w)
    assert torch.equal(dense != 0, mask & (dense != 0))  # nothing outside the 2:4 pattern
    values, meta = R.sparse24_pack(w)
    assert torch.equal(meta, m)  # the 2:4 selection is sparse24_pack's, unchanged
    vq = R.int4_unpack(q, s, z, group // 2)
    assert torch.equal(dense, R.sparse24_unpack(vq, m, 256))
    ss = s.repeat_interleave(group // 2, 1)
    assert ((vq - values).abs() <= ss / 2 + 1e-5).all()
    q2, s2, z2, m2 = R.sparse24_int4_pack(dense, group, mask=mask)
    assert torch.equal(q2, q) and torch.equal(m2, m)


@pytest.mark.parametrize("m", [1, 3, 16, 33, 128])
def test_forward_fp16(m):
    w, args, wd = packed(N_ODD, 256, 64, torch.float16)
    x = torch.randn(m, 256).half()
    b = torch.randn(N_ODD).half()
    y = S.sparse24_int4_forward(x, *args, b)
    assert y.shape == (m, N_ODD) and y.dtype == torch.float16
    assert rel_err(y, x.double() @ wd.T + b.double()) < TOL[torch.float16]
    w24 = w * R.sparse24_mask(w)
    assert sqnr_db(y, x.double() @ w24.double().T + b.double()) > 17


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,group", [(2, 32), (20, 128)])
def test_forward_dtypes(dtype, m, group):
    w, args, wd = packed(N_ODD, 256, group, dtype)
    x = torch.randn(m, 256).to(dtype)
    assert rel_err(S.sparse24_int4_forward(x, *args), x.double() @ wd.T) < TOL[dtype]


def _off_by(t, nbytes):
    """A copy of ``t`` whose storage starts ``nbytes`` past an aligned allocation."""
    buf = torch.zeros(t.numel() * t.element_size() + nbytes, dtype=torch.uint8)
    out = buf[nbytes:].view(t.dtype).view(t.shape)
    return out.copy_(t)


@pytest.mark.parametrize("k,group,dtype", [(1536, 128, torch.float32), (384, 32, torch.bfloat16),
                                           (1536, 128, torch.float16), (384, 32, torch.float16)])
def test_word_gemv_at_m1(k, group, dtype):
    """M = 1 runs the word GEMV (tiles of whole groups dividing K: 512 and 128 columns here; fp16:
    the packed-half2 one), also from codes, metadata and (fp16) activations whose storage starts
    off a 4-byte boundary, with split-K."""
    w, (q, s, z, meta, g), wd = packed(N_ODD, k, group, dtype)
    odd = [_off_by(q, 1), _off_by(meta, 2)]
    assert odd[0].data_ptr() % 4 and odd[1].data_ptr() % 4
    x = torch.randn(1, k).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    ref = x.double() @ wd.T
    for codes, mb, split in ((q, meta, None), (odd[0], odd[1], None), (q, meta, 3)):
        assert rel_err(S.sparse24_int4_forward(x, codes, s, z, mb, g, split_k=split), ref) < tol
    if dtype == torch.float16:
        xo = _off_by(x, 2)
        assert xo.data_ptr() % 4
        assert rel_err(S.sparse24_int4_forward(xo, q, s, z, meta, g), ref) < tol


def test_split_k_and_poison(monkeypatch):
    w, args, wd = packed(19, 1024, 128)
    x = torch.randn(2, 1024)
    real = torch.empty

    def poisoned(*shape, dtype=None, **kw):
        t = real(*shape, dtype=dtype, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(77)

    monkeypatch.setattr(torch, "empty", poisoned)
    ys = [S.sparse24_int4_forward(x, *args, split_k=sk) for sk in (1, 3)]
    x20 = torch.randn(20, 1024)
    y20 = S.sparse24_int4_forward(x20, *args)
    monkeypatch.undo()
    for y in ys:
        assert rel_err(y, x.double() @ wd.T) < 1e-5
    assert torch.isfinite(y20).all() and rel_err(y20, x20.double() @ wd.T) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_input_gradient(dtype):
    w, args, wd = packed(N_ODD, 128, 32, dtype)
    x = torch.randn(2, 9, 128).to(dtype).requires_grad_()
    b = torch.randn(N_ODD).to(dtype).requires_grad_()
    y = S.sparse24_int4_linear(x, *args[:-1], args[-1], b)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert rel_err(x.grad, gy.double() @ wd) < 4 * TOL[dtype]
    assert rel_err(b.grad, gy.double().sum((0, 1))) < 4 * TOL[dtype]


def test_weight_gradient_refused_and_compile():
    w, (q, s, z, m, g), wd = packed(N_ODD, 128, 32)
    x = torch.randn(3, 128, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        S.sparse24_int4_linear(x, q, s.clone().requires_grad_(), z, m, g)
    torch._dynamo.reset()
    cf = torch.compile(lambda t: S.sparse24_int4_linear(t, q, s, z, m, g).square().sum(), fullgraph=True,
                       backend="aot_eager")
    cf(x).backward()
    y = x.detach() @ wd.float().T
    assert torch.allclose(x.grad, (2 * y) @ wd.float(), rtol=1e-4, atol=1e-4)


def test_bad_input():
    w = torch.randn(8, 96)
    with pytest.raises(ValueError, match="group_size=64 does not divide in_features=96"):
        R.sparse24_int4_pack(w, 64)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        R.sparse24_int4_pack(bad, 32)
    q, s, z, m = R.sparse24_int4_pack(w, 32)
    with pytest.raises(ValueError, match="does not divide"):
        S.sparse24_int4_forward(torch.randn(2, 96), q, s, z, m, 64)
    with pytest.raises(ValueError, match="meta"):
        S.sparse24_int4_forward(torch.randn(2, 96), q, s, z, m[:, :-1].contiguous(), 32)
    with pytest.raises(ValueError, match="in_features"):
        S.sparse24_int4_forward(torch.randn(2, 64), q, s, z, m, 32)
    with pytest.raises(ValueError, match="empty"):
        S.sparse24_int4_forward(torch.randn(0, 96), q, s, z, m, 32)
    with pytest.raises(ValueError, match="does not divide"):
        rnn.Sparse24Int4Linear.from_linear(nn.Linear(96, 8), rc.Sparse24Int4(group_size=64))


def test_layer_torch_vs_triton():
    lin = nn.Linear(128, N_ODD)
    ref_layer = rnn.Sparse24Int4Linear.from_linear(lin, rc.Sparse24Int4(group_size=32), backend="torch")
    tri = rnn.Sparse24Int4Linear.from_linear(lin, rc.Sparse24Int4(group_size=32), backend="triton")
    assert rnn.Sparse24Int4Linear.gradient == "exact"
    assert ref_layer.compressed_bytes() < 0.25 * 4 * 128 * N_ODD  # < 1 byte per fp32 weight
    x = torch.randn(4, 128, requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    y, yt = ref_layer(x), tri(xt)
    gy = torch.randn_like(y)  # random upstream gradient: a ones vector only checks W's column sums
    y.backward(gy)
    yt.backward(gy)
    # independent float64 reference: the packed format of kernels/reference.py
    q, s, z, m = R.sparse24_int4_pack(lin.weight.detach(), 32)
    wd = R.sparse24_int4_unpack(q, s, z, m, 32, torch.float64)
    assert rel_err(y.detach(), x.detach().double() @ wd.T + lin.bias.detach().double()) < TOL[torch.float32]
    assert rel_err(x.grad, gy.double() @ wd) < TOL[torch.float32]
    assert torch.allclose(y, yt, rtol=1e-4, atol=1e-4)
    assert torch.allclose(x.grad, xt.grad, rtol=1e-4, atol=1e-4)


def test_aot_specs_well_formed():
    specs = S.aot_specs()
    assert len({s[0] for s in specs}) == len(specs)
    for name, fn, sig, consts, opts in specs:
        assert list(sig) == list(fn.arg_names), name
        assert {a for a, t in sig.items() if t == "constexpr"} == set(consts), name
