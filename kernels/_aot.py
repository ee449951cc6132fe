"""Ahead-of-time compilation of every Triton kernel configuration, without a GPU.

The interpreter (``TRITON_INTERPRET=1``) accepts programs that the GPU compiler rejects (``tl.dot``
with a block dimension under 16, unsupported dtype mixes, ...). This module compiles the real
kernels for NVIDIA targets on the CPU and inspects what comes out, so such mistakes surface in
the normal test suite:

* the PTX of a kernel that does tensor-core dots contains ``mma`` (sm_80) or ``wgmma``/``mma``
  (sm_90);
* ``cuobjdump --dump-resource-usage`` (shipped in the triton wheel, under
  ``triton/backends/nvidia/bin/``) reports registers, stack and local-memory (spill) bytes of each
  cubin: a kernel that spills on sm_90 is slow there.

Registry contract
-----------------
Every kernel module under ``robcomp.kernels`` (``sparse24``, ``lowbit``, ``sparse24_lowbit``, ...)
exposes ``aot_specs() -> list`` with one entry per (kernel, autotune config, dtype)::

    (name, jit_fn, signature, constexprs)              # or, with options:
    (name, jit_fn, signature, constexprs, options)

* ``name``: unique, readable (e.g. ``"sparse24_gemm_fp16_c2"``).
* ``jit_fn``: the ``@triton.jit`` function itself (not the ``triton.autotune`` wrapper; for a
  wrapper pass ``wrapper.fn``).
* ``signature``: ``{arg_name: type}`` for *every* parameter in order, types as Triton spells them
  (``"*fp16"``, ``"*bf16"``, ``"*fp32"``, ``"*u8"``, ``"*i8"``, ``"i32"``, ``"i64"``, ``"fp32"``),
  and ``"constexpr"`` for constexpr parameters.
* ``constexprs``: ``{arg_name: value}`` for every constexpr parameter (the config's ``kwargs``
  plus flags such as ``HAS_BIAS``).
* ``options`` (optional dict): ``num_warps``, ``num_stages`` (from the ``triton.Config``);
  ``divisible_by_16``: argument names (pointers, sizes, strides) to compile as multiples of 16,
  which is how Triton specialises them at run time for aligned shapes (without these hints the
  PTX has no vector loads and no cp.async pipelining, and register use is unrepresentative);
  and the checks' expectations: ``expect_mma`` (bool; default: True when the kernel source calls
  ``tl.dot``), ``allow_spills`` (bool, default False).

Each JSON record reports ``mma``, ``wgmma``, ``ld_v4`` (``ld.global.v4``), ``cp_async`` and
``usage`` (registers / stack / local / shared bytes from cuobjdump), or ``error``.
Cost: about 1-2 s of CPU per (spec, arch) when Triton's cache (``~/.triton/cache``) is cold,
milliseconds when warm; keep spec lists to the configs that are really autotuned.

Use: ``python -m robcomp.kernels._aot [--arch 80 90] [--modules sparse24 lowbit] [--jobs N]``
prints one JSON line per (spec, arch). Run it WITHOUT ``TRITON_INTERPRET`` (the test does so in a
subprocess). Nothing here needs a GPU or the CUDA driver.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

KERNEL_MODULES = ("sparse24", "lowbit", "sparse24_lowbit")
ARCHS = (80, 90)


def available_modules(names=KERNEL_MODULES) -> list[str]:
    """The kernel modules that exist and expose ``aot_specs``."""
    found = []
    for name in names:
        try:
            mod = importlib.import_module(f"robcomp.kernels.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(name):
                continue
            raise
        if hasattr(mod, "aot_specs"):
            found.append(name)
    return found


def _normalise(spec) -> tuple:
    if len(spec) == 4:
        name, fn, sig, consts = spec
        opts = {}
    elif len(spec) == 5:
        name, fn, sig, consts, opts = spec
        opts = dict(opts or {})
    else:
        raise ValueError(f"an aot spec is (name, fn, signature, constexprs[, options]), got {len(spec)} items")
    return name, fn, dict(sig), dict(consts), opts


def _cuobjdump() -> str | None:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def resource_usage(cubin: bytes) -> dict | None:
    """Registers, stack and spill bytes from ``cuobjdump --dump-resource-usage`` (None if absent)."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(path)
    if out.returncode != 0:
        return None
    usage = {}
    for key, field in (("registers", "REG"), ("stack", "STACK"), ("local", "LOCAL"), ("shared", "SHARED")):
        m = re.search(rf"\b{field}:(\d+)", out.stdout)
        if m:
            usage[key] = int(m.group(1))
    return usage or None


def compile_one(module: str, index: int, arch: int) -> dict:
    """Compile spec ``index`` of ``module`` for ``sm_{arch}``; returns what the checks need."""
    import triton
    from triton.backends.compiler import GPUTarget

    mod = importlib.import_module(f"robcomp.kernels.{module}")
    name, fn, sig, consts, opts = _normalise(mod.aot_specs()[index])
    from triton.runtime.jit import JITFunction
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn  # tolerate autotune/heuristics wrappers
    expect_mma = opts.pop("expect_mma", "tl.dot(" in getattr(fn, "src", ""))
    allow_spills = opts.pop("allow_spills", False)
    aligned = opts.pop("divisible_by_16", ())
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    record = {"module": module, "name": name, "arch": arch, "expect_mma": expect_mma, "allow_spills": allow_spills}
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs or None)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    except Exception as e:  # reported, the test fails on it
        record["error"] = f"{type(e).__name__}: {e}"[:2000]
        return record
    ptx = k.asm.get("ptx", "")
    record["mma"] = bool(re.search(r"\bw?gmma\.|\bmma\.sync", ptx))
    record["wgmma"] = "wgmma." in ptx
    record["ld_v4"] = "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx
    record["cp_async"] = "cp.async" in ptx
    record["ptx_local"] = ".local" in ptx
    cubin = k.asm.get("cubin")
    record["usage"] = resource_usage(cubin) if cubin else None
    return record


def run(archs=ARCHS, modules=None, jobs=None) -> list[dict]:
    modules = available_modules() if modules is None else list(modules)
    tasks, broken = [], []
    for module in modules:
        try:
            count = len(importlib.import_module(f"robcomp.kernels.{module}").aot_specs())
        except Exception as e:  # a broken registry is a failure to report, not a crash
            broken.append({"module": module, "name": f"{module}.aot_specs", "arch": None,
                           "error": f"{type(e).__name__}: {e}"[:2000]})
            continue
        tasks += [(module, i, arch) for i in range(count) for arch in archs]
    if not tasks:
        return broken
    jobs = jobs or min(len(tasks), os.cpu_count() or 1) or 1
    if jobs == 1:
        return broken + [compile_one(*t) for t in tasks]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return broken + list(pool.map(compile_one, *zip(*tasks)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--modules", nargs="+", default=None)
    p.add_argument("--jobs", type=int, default=None)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile ahead of time", file=sys.stderr)
        return 2
    for rec in run(a.arch, a.modules, a.jobs):
        print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
