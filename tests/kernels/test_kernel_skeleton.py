"""The shared weight-streaming skeleton: its jit helpers (int64 offsets, split ranges, integer to
float bit tricks) in the interpreter, the launch plans, the frozen-weight rule and the
``perf_cases`` contract of every kernel module."""

import pytest
import torch
import triton
import triton.language as tl

from robcomp.kernels import _packed as pk
from robcomp.kernels import _skeleton as sk
from robcomp.kernels import lowbit as L
from robcomp.kernels import reference as R
from robcomp.kernels import sparse24 as S
from robcomp.kernels import sparse24_lowbit as SL
from robcomp.kernels._ops import FrozenWeightError


@triton.jit
def _offsets_kernel(offs_ptr, out_ptr, stride, N: tl.constexpr):
    offs = tl.load(offs_ptr + tl.arange(0, N))
    tl.store(out_ptr + tl.arange(0, N), sk.row_offsets(offs, stride))


def test_row_offsets_do_not_wrap_past_2_31():
    offs = torch.tensor([0, 1, 70_000, 600_000, 2**20 + 3, 2**21 - 1, 5, 9], dtype=torch.int32)
    out = torch.empty(8, dtype=torch.int64)
    _offsets_kernel[(1,)](offs, out, 4096, N=8)
    assert torch.equal(out, offs.to(torch.int64) * 4096)
    assert out.max() > 2**31  # the int32 product would have wrapped


@triton.jit
def _split_kernel(out_ptr, SPLIT, L, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lo, hi = sk.split_range(pid, SPLIT, L, BLOCK)
    tl.store(out_ptr + 2 * pid, lo)
    tl.store(out_ptr + 2 * pid + 1, hi)


@pytest.mark.parametrize("length,split,block", [(1100, 3, 32), (4096, 8, 128), (200, 4, 64), (96, 2, 64)])
def test_split_ranges_tile_the_reduction(length, split, block):
    out = torch.empty(2 * split, dtype=torch.int32)
    _split_kernel[(split,)](out, split, length, BLOCK=block)
    covered = []
    for lo, hi in out.reshape(split, 2).tolist():
        assert lo % block == 0
        covered += range(lo, max(lo, hi))
    assert covered == list(range(length))  # each column in exactly one split, in order


@triton.jit
def _codes_kernel(q8_ptr, u_ptr, o8h_ptr, o8f_ptr, ouh_ptr, ouf_ptr):
    offs = tl.arange(0, 256)
    q = tl.load(q8_ptr + offs)
    u = tl.load(u_ptr + offs)
    tl.store(o8h_ptr + offs, sk._int8_codes(q, tl.float16))
    tl.store(o8f_ptr + offs, sk._int8_codes(q, tl.float32))
    tl.store(ouh_ptr + offs, sk._biased(u & 0xF, tl.float16) - sk._magic_zero(tl.zeros_like(u).to(tl.float16), tl.float16))
    tl.store(ouf_ptr + offs, sk._biased(u, tl.float32) - sk._magic_zero(tl.zeros_like(u).to(tl.float32), tl.float32))


def test_integer_codes_convert_exactly_without_i2f():
    q8 = torch.arange(-128, 128, dtype=torch.int8)
    u = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    outs = [torch.full((256,), float("nan"), dtype=d) for d in (torch.float16, torch.float32, torch.float16, torch.float32)]
    _codes_kernel[(1,)](q8, u, *outs)
    assert torch.equal(outs[0].double(), q8.double()) and torch.equal(outs[1].double(), q8.double())
    assert torch.equal(outs[2].double(), (u & 0xF).double()) and torch.equal(outs[3].double(), u.double())


@triton.jit
def _nibble_kernel(w_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    wd = tl.load(w_ptr + offs)
    mant = tl.where(N > 0, 0x780000, 0)
    for j in tl.static_range(8):
        tl.store(out_ptr + offs * 8 + j, sk._nibble(wd, j, mant))


def test_word_nibbles_become_one_plus_q_over_16_exactly():
    """Every nibble of random int32 words (sign bit included) as ``1 + q/16``, code ``8w + j`` at
    nibble ``j``: the int4 GEMVs' conversion, against the bytes' own low/high nibbles."""
    words = torch.randint(-2**31, 2**31 - 1, (64,), dtype=torch.int64).to(torch.int32)
    words[:2] = torch.tensor([-1, 0], dtype=torch.int32)
    out = torch.full((64 * 8,), float("nan"))
    _nibble_kernel[(1,)](words, out, N=64)
    b = words.view(torch.uint8).to(torch.int64)  # little-endian bytes: byte i holds codes 2i, 2i+1
    codes = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)
    assert torch.equal(out.double(), 1 + codes.double() / 16)


@triton.jit
def _prmt_kernel(a_ptr, b_ptr, c_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, pk.prmt(tl.load(a_ptr + offs), tl.load(b_ptr + offs), tl.load(c_ptr + offs)))


@triton.jit
def _half2_kernel(a_ptr, b_ptr, c_ptr, fma_ptr, mul_ptr, sum_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(a_ptr + offs)
    b = tl.load(b_ptr + offs)
    tl.store(fma_ptr + offs, pk.hfma2(a, b, tl.load(c_ptr + offs)))
    tl.store(mul_ptr + offs, pk.hmul2(a, b))
    tl.store(sum_ptr + offs, pk.lane_sum(a))


def _prmt_ref(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32, default mode, from its definition (bytes of {b, a}, sign replication)."""
    src = (a & 0xFFFFFFFF).to_bytes(4, "little") + (b & 0xFFFFFFFF).to_bytes(4, "little")
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = src[s & 7]
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out - (1 << 32) if out >= 1 << 31 else out


def test_packed_primitives_follow_their_ptx_definitions():
    """The interpreter's forms of the packed-register helpers (on the GPU: one PTX instruction
    each): byte permute of random words and selectors (sign mode included); half2 FMA, multiply
    and lane sum of fp16 lanes (low half = lane 0), one rounding to fp16."""
    n = 256
    words = torch.randint(-2**31, 2**31 - 1, (3, n), dtype=torch.int64).to(torch.int32)
    halves = (torch.randn(3, 2 * n) * 8).half().view(torch.int32)
    outs = [torch.zeros(n, dtype=torch.int32) for _ in range(3)] + [torch.zeros(n)]
    _prmt_kernel[(1,)](*words, outs[0], N=n)
    assert outs[0].tolist() == [_prmt_ref(a, b, c) for a, b, c in zip(*(w.tolist() for w in words))]
    _half2_kernel[(1,)](*halves, *outs[1:], N=n)
    a, b, c = (h.view(torch.float16).double() for h in halves)
    assert torch.equal(outs[1].view(torch.float16), (a * b + c).half())
    assert torch.equal(outs[2].view(torch.float16), (a * b).half())
    assert torch.equal(outs[3].double(), a.reshape(n, 2).sum(1))


@pytest.mark.parametrize("fmt", [sk.INT8.value, sk.INT4.value, sk.S24.value, sk.S24I4.value])
def test_small_m_plans_cover_the_gpu(fmt):
    """At 4096 x 4096 every M <= 64 launch fills ``WAVE_FILL`` of an H100's 132 SMs, and does
    so in one launch: no split-K (zero-fill + atomics + cast) where the grid fills the GPU alone."""
    group = 128 if fmt in sk.GROUPED else None
    for m in (1, 2, 4, 16, 64):
        for plan, cols in ((sk.plan_forward(fmt, m, 4096, 4096, group, torch.float16, 132, interp=False), "n"),
                           (sk.plan_backward(fmt, m, 4096, 4096, group, torch.float16, 132, interp=False), "k")):
            c = plan.config.kwargs
            per = c["BLOCK_N"] if plan.kernel != "dx" else c["BLOCK_K"]
            rows = 1 if plan.kernel == "gemv" else triton.cdiv(m, c["BLOCK_M"])
            assert rows * triton.cdiv(4096, per) * plan.split >= sk.WAVE_FILL * 132, (m, plan)
            if plan.kernel == "gemv" or m <= (sk.DX_NARROW_M if plan.kernel == "dx" else sk.MEDIUM_NARROW_M)[fmt]:
                assert plan.split == 1 and not plan.atomic, (m, plan)
        # a narrow output (N = 1024, K = 4096) cannot fill the GPU unsplit: split-K with atomics
        p = sk.plan_forward(fmt, 1, 1024, 4096, group, torch.float16, 132, interp=False)
        assert p.split > 1 and p.atomic, p


def _all_spec_names():
    names = set()
    for mod in (L, S, SL):
        names |= {s[0] for s in mod.aot_specs()}
    return names | {s[0] for s in L.aot_specs_fp8()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_perf_cases_contract(dtype):
    names = _all_spec_names()
    for mod in (L, S, SL):
        for m, n, k in ((1, 4096, 4096), (16, 4096, 4096), (64, 11008, 4096), (4096, 4096, 4096)):
            cases = mod.perf_cases(m, n, k, dtype=dtype, sm_count=132)
            ops = [c["op"] for c in cases]
            assert len(ops) == len(set(ops)) and any(o.endswith("_backward_input") for o in ops)
            for c in cases:
                assert set(c) == {"op", "launches", "bytes", "flops", "candidates"}
                assert c["flops"] == 2 * m * n * k and c["launches"] >= 1
                assert c["bytes"] > (m * k + m * n) * dtype.itemsize
                assert c["candidates"], c["op"]
                for cand in c["candidates"]:
                    assert set(cand) == {"spec", "ctas", "weights_per_iter", "num_warps"}
                    assert cand["spec"] in names, cand["spec"]
                    assert cand["ctas"] >= 1 and cand["weights_per_iter"] >= 256 and cand["num_warps"] in (2, 4, 8)


def test_frozen_weights_raise_one_error_type_everywhere():
    w = torch.randn(8, 128)
    x = torch.randn(2, 128, requires_grad=True)
    q8, s8 = R.int8_weight_pack(w)
    q4, s4, z4 = R.int4_pack(w, 32)
    v, meta = R.sparse24_pack(w)
    qi, si, zi, mi = R.sparse24_int4_pack(w, 32)
    calls = [lambda: L.int8_weight_linear(x, q8, s8.requires_grad_()),
             lambda: L.int4_linear(x, q4, s4, z4.requires_grad_(), 32),
             lambda: L.int8_dynamic_linear(x, *R.int8_dynamic_pack(w)[:1], R.int8_dynamic_pack(w)[1].requires_grad_()),
             lambda: S.sparse24_linear(x, v.requires_grad_(), meta),
             lambda: SL.sparse24_int4_linear(x, qi, si.requires_grad_(), zi, mi, 32)]
    for call in calls:
        with pytest.raises(FrozenWeightError, match="frozen"):
            call()
    assert issubclass(FrozenWeightError, ValueError)
