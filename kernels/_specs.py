"""One builder of ``robcomp.kernels._aot`` specs and of ``perf_cases`` records for every kernel module.

A spec name is derived from the kernel, the format, the activation dtype and the launch config
(``spec_name``), so the AOT registry (``aot_specs``) and the static-model records
(``perf_cases``) name the same compiled object.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from . import _skeleton as sk

TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: int4 group size compiled ahead of time (others differ only in the constexpr divisor)
AOT_GROUP = 128

#: arguments that are multiples of 16 (pointers: 16-byte aligned) at run time for aligned shapes
#: (N, K multiples of 128), as Triton specialises them. Left out: M, M_BUCKET, SPLIT and stride_sn
#: (= K / group_size, often small and odd).
ALIGNED = ("N", "K", "stride_xm", "stride_wn", "stride_ym", "stride_mn", "stride_dym", "stride_dxm", "stride_qm")

#: name of each format in spec and op names
FMT_LABEL = {0: "w8a16", 1: "fp8", 2: "w4a16", 3: "sparse24", 4: "s24i4"}


def jit_fn(kernel):
    from triton.runtime.autotuner import Autotuner, Heuristics
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def config_label(config: triton.Config) -> str:
    kw = config.kwargs
    dims = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kw)
    return f"{dims}_w{config.num_warps}s{config.num_stages}"


def spec_name(kernel: str, fmt_label: str, t: str, config: triton.Config, *, block_m: Optional[int] = None,
              atomic: Optional[bool] = None, group: Optional[int] = None) -> str:
    parts = [fmt_label, kernel, t]
    if group is not None:
        parts.append(f"g{group}")
    if block_m is not None:
        parts.append(f"m{block_m}")
    parts.append(config_label(config))
    if atomic is not None:
        parts.append("atomic" if atomic else "store")
    return "_".join(parts)


def spec(name: str, kernel, types: dict, constexprs: dict, config: triton.Config, expect_mma: bool) -> tuple:
    """``(name, fn, signature, constexprs, options)``: every parameter typed (``"i32"`` for
    integers not in ``types``), pointers and aligned sizes/strides hinted divisible by 16."""
    fn = jit_fn(kernel)
    consts = dict(constexprs, **config.kwargs)
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg in types:
            sig[arg] = types[arg]
        elif arg.endswith("_ptr"):
            raise KeyError(f"{name}: no type for pointer argument {arg}")
        else:
            sig[arg] = "i32"
    aligned = [a for a, t in sig.items() if t != "constexpr" and (a.endswith("_ptr") or a in ALIGNED)]
    opts = {"num_warps": config.num_warps, "num_stages": config.num_stages, "expect_mma": expect_mma,
            "divisible_by_16": aligned}
    return (name, fn, sig, consts, opts)


# ---------------------------------------------------------------------------- skeleton kernels
def _weight_types(fmt: int, t: str, scale_fp32: bool = False) -> dict:
    w = {0: "*i8", 1: "*fp8e4nv", 2: "*u8", 3: f"*{t}", 4: "*u8"}[fmt]
    s = "*fp32" if fmt == 1 or scale_fp32 else f"*{t}"
    meta = "*u8" if fmt in sk.SPARSE else w
    z = s
    return {"w_ptr": w, "meta_ptr": meta, "s_ptr": s, "z_ptr": z}


def _io_types(t: str, atomic: bool, backward: bool) -> dict:
    out = "*fp32" if atomic else f"*{t}"
    if backward:
        return {"dy_ptr": f"*{t}", "dx_ptr": out}
    return {"x_ptr": f"*{t}", "b_ptr": f"*{t}", "y_ptr": out}


def _group(fmt: int) -> Optional[int]:
    return AOT_GROUP if fmt in sk.GROUPED else None


def gemv_spec_name(fmt, t, config, block_m, atomic):
    return spec_name("gemv", FMT_LABEL[fmt], t, config, block_m=block_m, atomic=atomic, group=_group(fmt))


def tiled_spec_name(kernel, fmt, t, config, atomic):
    return spec_name(kernel, FMT_LABEL[fmt], t, config, atomic=atomic, group=_group(fmt))


def _tiled_variants(fmt: int, dt: torch.dtype, backward: bool) -> list:
    """``(config, atomic)`` of every tile the launcher can run for this format and dtype."""
    group = _group(fmt)
    f32 = dt == torch.float32
    if f32:
        return [(sk.F32_TILE, True), (sk.F32_TILE, False)]
    out = []
    for bm in sk.GEMM_MEDIUM_BLOCK_MS:
        # the tile at a split-K shape (narrow grid) and at a wide one: the base tile, stored or
        # with atomics, and its narrowed forms (always stored: they only run without split)
        base = (sk.plan_backward if backward else sk.plan_forward)(fmt, bm, 1024, 1024, group, dt, 132, interp=False)
        if bm <= (sk.DX_NARROW_M if backward else sk.MEDIUM_NARROW_M)[fmt]:
            # the base tile only split, its narrowed forms only unsplit
            narrowed = sk.narrowed(base.config, "BLOCK_K" if backward else "BLOCK_N")
            out += [(base.config, True)] + [(c, False) for c in narrowed[1:]]
        else:
            out += [(base.config, True), (base.config, False)]
    table = sk.DX_LARGE if backward else sk.GEMM_LARGE
    out += [(c, False) for c in sk.large_configs(table, fmt, group)]
    seen, unique = set(), []
    for c, atomic in out:  # a narrowed medium tile may equal a large one
        if (config_label(c), atomic) not in seen:
            seen.add((config_label(c), atomic))
            unique.append((c, atomic))
    return unique


def skeleton_specs(fmt: int, dtypes=DTYPES, *, forward: bool = True, scale_fp32: bool = False) -> list:
    """Every GEMV / GEMM / input-gradient variant of format ``fmt`` the launchers can run
    (``scale_fp32``: the float32 per-channel scale of the dynamic formats, names end ``_s32``)."""
    out = []
    group = _group(fmt)
    consts = {"FORMAT": fmt, "GROUP_SIZE": group or 1}
    for dt in dtypes:
        t = TL[dt]
        wt = _weight_types(fmt, t, scale_fp32)
        t_name = t + ("_s32" if scale_fp32 and fmt == 0 else "")
        if forward and fmt != 1:  # fp8 weights have no weight-only forward
            for bm in sk.GEMV_BLOCK_MS:
                configs = sk.gemv_configs(fmt, bm, group, interp=False)
                # the budget-filling tile stored or with atomics; the narrower ones only run unsplit
                for c, atomic in [(configs[0], True)] + [(c, False) for c in configs]:
                    out.append(spec(gemv_spec_name(fmt, t, c, bm, atomic), sk.gemv_kernel,
                                    {**wt, **_io_types(t, atomic, False)},
                                    {**consts, "HAS_BIAS": True, "ATOMIC": atomic, "BLOCK_M": bm}, c, False))
            for c, atomic in _tiled_variants(fmt, dt, False):
                out.append(spec(tiled_spec_name("gemm", fmt, t, c, atomic), sk.gemm_kernel,
                                {**wt, **_io_types(t, atomic, False)},
                                {**consts, "HAS_BIAS": True, "F32": dt == torch.float32, "ATOMIC": atomic}, c,
                                dt != torch.float32))
        for c, atomic in _tiled_variants(fmt, dt, True):
            out.append(spec(tiled_spec_name("bwd_input", fmt, t_name, c, atomic), sk.dx_kernel,
                            {**wt, **_io_types(t, atomic, True)},
                            {**consts, "F32": dt == torch.float32, "ATOMIC": atomic}, c, dt != torch.float32))
    return out


# ---------------------------------------------------------------------------- perf_cases
def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _launches(atomic: bool, dtype: torch.dtype) -> int:
    """The kernel, plus the zero-fill and (16-bit outputs) the cast of an atomic fp32 buffer."""
    return 1 + (0 if not atomic else (1 if dtype == torch.float32 else 2))


def skeleton_cases(op_prefix: str, fmt: int, m: int, n: int, k: int, weight_bytes: int, dtype=torch.float16,
                   sm_count: int = 132, group: Optional[int] = None) -> list[dict]:
    """Forward and input-gradient records of one weight format at ``x [m, k]``, ``W [n, k]``."""
    t = TL[dtype]
    e = _elt(dtype)
    group = group if fmt in sk.GROUPED else None
    if group is not None and group != AOT_GROUP:
        raise ValueError(f"perf_cases covers the compiled group size {AOT_GROUP}, got {group}")
    cases = []
    if fmt != 1:
        p = sk.plan_forward(fmt, m, n, k, _group(fmt), dtype, sm_count, interp=False)
        if p.kernel == "gemv":
            c = p.config
            cands = [{"spec": gemv_spec_name(fmt, t, c, p.block_m, p.atomic),
                      "ctas": triton.cdiv(n, c.kwargs["BLOCK_N"]) * p.split,
                      "weights_per_iter": c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"], "num_warps": c.num_warps}]
        else:
            cands = _tiled_cands("gemm", fmt, t, p, m, n, k, sk.GEMM_LARGE)
        cases.append({"op": f"{op_prefix}_forward", "launches": _launches(p.atomic, dtype),
                      "bytes": weight_bytes + (m * k + m * n) * e, "flops": 2 * m * n * k, "candidates": cands})
    p = sk.plan_backward(fmt, m, n, k, _group(fmt), dtype, sm_count, interp=False)
    cases.append({"op": f"{op_prefix}_backward_input", "launches": _launches(p.atomic, dtype),
                  "bytes": weight_bytes + (m * n + m * k) * e, "flops": 2 * m * n * k,
                  "candidates": _tiled_cands("bwd_input", fmt, t, p, m, k, n, sk.DX_LARGE)})
    return cases


def _tiled_cands(kernel, fmt, t, p, m, cols, red, table) -> list:
    """``cols``: output columns (N forward, K input gradient); ``red``: the reduction length."""
    configs = [p.config] if p.config is not None else sk.large_configs(table, fmt, _group(fmt))
    out = []
    for c in configs:
        kw = c.kwargs
        out_cols = kw["BLOCK_N"] if kernel == "gemm" else kw["BLOCK_K"]
        ctas = triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(cols, out_cols) * p.split
        out.append({"spec": tiled_spec_name(kernel, fmt, t, c, p.atomic), "ctas": ctas,
                    "weights_per_iter": kw["BLOCK_N"] * kw["BLOCK_K"], "num_warps": c.num_warps})
    return out
