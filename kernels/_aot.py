"""Ahead-of-time compilation of every Triton kernel configuration, without a GPU.

The interpreter (``TRITON_INTERPRET=1``) accepts programs that the GPU compiler rejects (``tl.dot``
with a block dimension under 16, unsupported dtype mixes, layouts triton 3.6 cannot lower, ...).
This module compiles the real kernels for NVIDIA targets on the CPU and inspects what comes out,
so such mistakes surface in the normal test suite, under every Triton version CI runs (3.6, the
GPU machine's, and the newest):

* the PTX of a kernel that does tensor-core dots contains ``mma`` (sm_80) or ``wgmma``/``mma``
  (sm_90); the widths of its global loads (``ld.global.v4`` = 16 bytes) and ``cp.async``;
* ``cuobjdump --dump-resource-usage`` (the triton 3.6 and 3.9 wheels both ship ``cuobjdump``,
  ``nvdisasm`` and ``ptxas`` under ``triton/backends/nvidia/bin/``) reports registers, stack and local-memory
  (spill) bytes of each cubin: a kernel that spills on sm_90 is slow there;
* ``cuobjdump -sass`` gives the machine code (SASS), whose global loads (``LDG.E.128`` ...) and
  local-memory traffic (``LDL``/``STL`` = spills) are counted here, and which
  ``bench/static_model.py`` reads to predict speed.

Registry contract
-----------------
Every kernel module under ``robcomp.kernels`` (``sparse24``, ``lowbit``, ``sparse24_lowbit``, ...)
exposes ``aot_specs() -> list`` with one entry per (kernel, autotune config, dtype), and may expose
``aot_specs_fp8() -> list`` for kernels that need fp8 hardware (compiled only for sm_89 and newer,
see ``REGISTRIES``)::

    (name, jit_fn, signature, constexprs)              # or, with options:
    (name, jit_fn, signature, constexprs, options)

* ``name``: unique within the module, readable (e.g. ``"sparse24_gemm_fp16_c2"``).
* ``jit_fn``: the ``@triton.jit`` function (an autotune/heuristics wrapper is unwrapped).
* ``signature``: ``{arg_name: type}`` for *every* parameter in order, types as Triton spells them
  (``"*fp16"``, ``"*bf16"``, ``"*fp32"``, ``"*u8"``, ``"*i8"``, ``"*fp8e4nv"``, ``"i32"``, ``"i64"``,
  ``"fp32"``), and ``"constexpr"`` for constexpr parameters.
* ``constexprs``: ``{arg_name: value}`` for every constexpr parameter.
* ``options`` (optional dict): ``num_warps``, ``num_stages``; ``divisible_by_16``: argument names
  to compile as multiples of 16 (what Triton specialises at run time for aligned shapes; without
  it there are no vector loads and register use is unrepresentative); ``expect_mma`` (default:
  the kernel source calls ``tl.dot``), ``allow_spills`` (default False).

Each JSON record carries ``triton`` (the version), ``module``, ``name``, ``arch``, ``num_warps``,
``constexprs`` and either ``error`` or: ``mma``, ``wgmma``, ``ld_v4``, ``cp_async``, ``ptx_loads``
(PTX ``ld.global`` count per access width in bytes), ``sass_loads`` (SASS ``LDG`` count per width),
``usage`` (registers / stack / local / shared bytes; None when cuobjdump could not be read),
``spill_ops`` (SASS ``LDL``/``STL`` count; None without SASS), and with ``--sass-dir``
``sass_path``.
Cost: about 1-2 s of CPU per (spec, arch) when Triton's cache (``~/.triton/cache``) is cold,
milliseconds when warm.

Use: ``python -m robcomp.kernels._aot [--arch 80 90] [--modules sparse24 lowbit] [--names N ...]
[--sass-dir DIR] [--jobs N]`` prints one JSON line per (spec, arch). Run it WITHOUT
``TRITON_INTERPRET``. Nothing here needs a GPU or the CUDA driver.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

KERNEL_MODULES = ("sparse24", "lowbit", "sparse24_lowbit")
ARCHS = (80, 90)
#: spec registries a kernel module may expose, with the oldest architecture each compiles for
REGISTRIES = (("aot_specs", 0), ("aot_specs_fp8", 89))


# ============================================================ Triton version compatibility
# The one place that knows Triton's ahead-of-time API. Triton 3.6 and 3.9 share
# ``ASTSource(fn, signature, constexprs, attrs)`` with string-keyed signatures, constexprs keyed by
# name and attrs ``{(arg_index,): [["tt.divisibility", 16]]}`` (checked on both; older releases
# took an ``AttrsDescriptor`` and are not supported), and ``GPUTarget("cuda", arch, 32)``.
def triton_version() -> str:
    import triton
    return triton.__version__


def _jit_function(fn):
    from triton.runtime.jit import JITFunction
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn  # autotune / heuristics wrappers
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{fn!r} is not a @triton.jit function (is TRITON_INTERPRET set?)")
    return fn


def _compile(fn, signature: dict, constexprs: dict, aligned, arch: int, options: dict):
    """``triton.compile`` of one specialisation for ``sm_{arch}``; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs or None)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


# ============================================================ tools from the triton wheel
def _nvidia_tool(name: str) -> str | None:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def _run_on_cubin(args: list, cubin: bytes) -> str | None:
    tool = _nvidia_tool(args[0])
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([tool, *args[1:], path], capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(path)
    return out.stdout if out.returncode == 0 else None


def resource_usage(cubin: bytes) -> dict | None:
    """Registers, stack, local (spill) and shared bytes from ``cuobjdump --dump-resource-usage``;
    None when the tool is missing or its output lacks a field (the caller must treat that as
    unchecked, never as "no spills")."""
    text = _run_on_cubin(["cuobjdump", "--dump-resource-usage"], cubin)
    if text is None:
        return None
    usage = {}
    for key, field in (("registers", "REG"), ("stack", "STACK"), ("local", "LOCAL"), ("shared", "SHARED")):
        m = re.search(rf"\b{field}:(\d+)", text)
        if m is None:
            return None
        usage[key] = int(m.group(1))
    return usage


def _sass_cache_dir() -> str:
    import triton
    return os.path.join(triton.knobs.cache.dir, "robcomp-sass")


def sass_text(cubin: bytes) -> str | None:
    """The SASS of a cubin (``cuobjdump -sass``: one ``/*addr*/ OPCODE operands ;`` per line).
    Disassembling costs more than a cached compile, so the text is cached beside Triton's cache,
    keyed by the cubin's hash."""
    path = os.path.join(_sass_cache_dir(), hashlib.sha256(cubin).hexdigest() + ".sass")
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    text = _run_on_cubin(["cuobjdump", "-sass"], cubin)
    if text:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return text


# ============================================================ what the code contains
_PTX_LD = re.compile(r"\bld\.global[\w.:]*")
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def ptx_load_widths(ptx: str) -> dict:
    """``{bytes per access: count}`` of the PTX global loads (``ld.global.v4.b32`` = 16)."""
    out = Counter()
    for ins in _PTX_LD.findall(ptx):
        parts = ins.split(".")
        vec = 4 if "v4" in parts else 2 if "v2" in parts else 1
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bufs](8|16|32|64)", p)), 32)
        out[str(vec * bits // 8)] += 1
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def sass_load_width(opcode: str) -> int:
    """Bytes per thread of a SASS ``LDG``/``LDS``/``LDGSTS`` opcode (``LDG.E.128`` = 16)."""
    tokens = opcode.split(".")[1:]
    for tok, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if tok in tokens:
            return width
    return 4


def sass_opcodes(sass: str) -> list[str]:
    """Opcodes (with modifiers) of every SASS instruction, in address order."""
    return _SASS_OP.findall(sass)


def sass_load_widths(sass: str) -> dict:
    """``{bytes per thread: count}`` of the SASS global loads (``LDG``; ``LDGSTS`` = cp.async)."""
    out = Counter(str(sass_load_width(op)) for op in sass_opcodes(sass) if op.split(".")[0] in ("LDG", "LDGSTS"))
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def sass_spill_ops(sass: str) -> int:
    """Local-memory instructions (``LDL``/``STL``): register spills and stack arrays."""
    return sum(op.split(".")[0] in ("LDL", "STL") for op in sass_opcodes(sass))


def summarise_error(text: str, width: int = 160) -> str:
    """One line for an ``error`` field: its first line and, for Triton's CompilationError (source
    with a ``^`` under the culprit), the source line the caret points at."""
    lines = [line for line in text.splitlines() if line.strip()]
    out = lines[0] if lines else text
    carets = [i for i, line in enumerate(lines) if set(line.strip()) == {"^"} and i > 0]
    if carets:
        out += " " + lines[carets[-1] - 1].strip()
    return " ".join(out.replace("|", "/").split())[:width]


# ============================================================ registry
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


def module_specs(module: str) -> list[tuple]:
    """``(registry, index, name, min_arch)`` for every spec of every registry of ``module``."""
    mod = importlib.import_module(f"robcomp.kernels.{module}")
    out = []
    for registry, min_arch in REGISTRIES:
        if hasattr(mod, registry):
            out += [(registry, i, _normalise(s)[0], min_arch) for i, s in enumerate(getattr(mod, registry)())]
    return out


# ============================================================ compile + inspect
def compile_one(module: str, registry: str, index: int, arch: int, sass_dir: str | None = None,
                keep_sass: bool = False) -> dict:
    """Compile spec ``index`` of ``module.<registry>()`` for ``sm_{arch}`` and inspect the result."""
    mod = importlib.import_module(f"robcomp.kernels.{module}")
    name, fn, sig, consts, opts = _normalise(getattr(mod, registry)()[index])
    record = {"triton": triton_version(), "module": module, "name": name, "arch": arch}
    try:
        fn = _jit_function(fn)
        record["expect_mma"] = opts.pop("expect_mma", "tl.dot(" in fn.src)
        record["allow_spills"] = opts.pop("allow_spills", False)
        aligned = opts.pop("divisible_by_16", ())
        record["num_warps"] = opts.get("num_warps", 4)
        record["constexprs"] = {a: v for a, v in consts.items() if isinstance(v, (bool, int, float, str))}
        k = _compile(fn, sig, consts, aligned, arch, opts)
    except Exception as e:  # reported; the test fails on it
        record["error"] = f"{type(e).__name__}: {e}"[:2000]
        return record
    ptx = k.asm.get("ptx", "")
    record["mma"] = bool(re.search(r"\bw?gmma\.|\bmma\.sync", ptx))
    record["wgmma"] = "wgmma." in ptx
    record["ld_v4"] = bool(re.search(r"\bld\.global[\w.:]*\.v4\.", ptx))
    record["cp_async"] = "cp.async" in ptx
    record["ptx_loads"] = ptx_load_widths(ptx)
    cubin = k.asm.get("cubin")
    record["usage"] = resource_usage(cubin) if cubin else None
    sass = sass_text(cubin) if cubin else None
    record["sass_loads"] = sass_load_widths(sass) if sass else None
    record["spill_ops"] = sass_spill_ops(sass) if sass else None
    if sass and sass_dir:
        path = os.path.join(sass_dir, f"{module}.{name}.sm{arch}.sass")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(sass)
        os.replace(tmp, path)
        record["sass_path"] = path
    if keep_sass:
        record["sass"] = sass
    return record


def _compile_task(args):
    return compile_one(*args)


def run(archs=ARCHS, modules=None, jobs=None, names=None, sass_dir=None) -> list[dict]:
    """Compile every spec of ``modules`` (all kernel modules by default) for ``archs``; ``names``
    restricts to those spec names. Registries below their ``min_arch`` are not compiled for an arch."""
    modules = available_modules() if modules is None else list(modules)
    tasks, broken = [], []
    for module in modules:
        try:
            specs = module_specs(module)
        except Exception as e:  # a broken registry is a failure to report, not a crash
            broken.append({"triton": triton_version(), "module": module, "name": f"{module}.aot_specs",
                           "arch": None, "error": f"{type(e).__name__}: {e}"[:2000]})
            continue
        tasks += [(module, reg, i, arch, sass_dir) for reg, i, name, min_arch in specs
                  for arch in archs if arch >= min_arch and (names is None or name in names)]
    if not tasks:
        return broken
    jobs = jobs or min(len(tasks), os.cpu_count() or 1) or 1
    if jobs == 1:
        return broken + [_compile_task(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return broken + list(pool.map(_compile_task, tasks))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--modules", nargs="+", default=None)
    p.add_argument("--names", nargs="+", default=None, help="only these spec names")
    p.add_argument("--sass-dir", default=None, help="write each cubin's SASS here (sass_path in the record)")
    p.add_argument("--jobs", type=int, default=None)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile ahead of time", file=sys.stderr)
        return 2
    if a.sass_dir:
        os.makedirs(a.sass_dir, exist_ok=True)
    for rec in run(a.arch, a.modules, a.jobs, set(a.names) if a.names else None, a.sass_dir):
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
