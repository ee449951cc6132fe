"""Ahead-of-time compilation of every kernel configuration for sm_80 and sm_90, on the CPU.

The interpreter accepts programs the GPU compiler rejects; this compiles the real kernels (in a
subprocess without TRITON_INTERPRET, see robcomp.kernels._aot) with the Triton this interpreter
has (CI runs it under triton 3.6 and the newest) and reads the result: tensor-core instructions
where a kernel does dots, and no register spills on sm_90 (cuobjdump). The fp8 registry
(``aot_specs_fp8``) compiles for sm_90 only.
"""
import json
import os
import subprocess
import sys

import pytest
import triton

from robcomp.kernels import _aot

MODULES = list(_aot.KERNEL_MODULES)


def test_every_kernel_module_exposes_aot_specs():
    missing = [m for m in MODULES if m not in _aot.available_modules((m,))]
    assert not missing, f"kernel modules without aot_specs(): {missing}"


@pytest.fixture(scope="module")
def compiled():
    """One subprocess compiling every spec of every kernel module, in parallel processes."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "robcomp.kernels._aot", "--modules", *MODULES,
                           "--jobs", str(max(2, min(8, os.cpu_count() or 2)))],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_records_name_the_triton_that_compiled_them(compiled):
    assert compiled
    assert {r["triton"] for r in compiled} == {triton.__version__}


def test_every_registered_spec_was_compiled_for_its_architectures(compiled):
    got = {(r["module"], r["name"], r["arch"]) for r in compiled}
    want = {(m, name, arch) for m in MODULES for _, _, name, min_arch in _aot.module_specs(m)
            for arch in _aot.ARCHS if arch >= min_arch}
    assert want <= got, f"specs not compiled: {sorted(want - got)[:10]}"
    fp8 = [r for r in compiled if "fp8" in r["name"]]
    assert fp8 and {r["arch"] for r in fp8} == {90}, "the fp8 specs must compile for sm_90"


@pytest.mark.parametrize("module", MODULES)
def test_every_config_compiles_for_sm80_and_sm90(compiled, module):
    recs = [r for r in compiled if r["module"] == module]
    assert recs, f"{module}.aot_specs() returned no specs"
    errors = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in recs if "error" in r]
    assert not errors, f"triton {triton.__version__}:\n" + "\n".join(errors)
    assert {r["arch"] for r in recs} == set(_aot.ARCHS)
    no_mma = [f"{r['name']} sm_{r['arch']}" for r in recs if r["expect_mma"] and not r["mma"]]
    assert not no_mma, f"dot kernels without mma/wgmma in their PTX: {no_mma}"
    # an unreadable spill count is a failure, never a pass
    unread = [f"{r['name']} sm_{r['arch']}" for r in recs if not r.get("usage") or r.get("spill_ops") is None]
    assert not unread, f"cuobjdump gave no resource usage or SASS (spills unchecked) for: {unread[:5]}"
    spills = [f"{r['name']}: {r['usage']}, {r['spill_ops']} LDL/STL" for r in recs
              if r["arch"] == 90 and not r["allow_spills"]
              and (r["usage"]["stack"] or r["usage"]["local"] or r["spill_ops"])]
    assert not spills, (f"kernels that spill on sm_90: {spills}. Compile them as they run (options "
                        "'divisible_by_16', see robcomp/kernels/_aot.py), shrink the config, or mark it "
                        "allow_spills with a reason")


def test_ptx_and_sass_report_the_global_load_widths(compiled):
    ok = [r for r in compiled if "error" not in r]
    assert ok
    for r in ok:
        # every kernel reads global memory: with LDG, or with LDGSTS (cp.async) when pipelined
        assert r["sass_loads"], f"{r['name']} sm_{r['arch']}: no global loads found in the SASS"
        assert r["ptx_loads"] or r["cp_async"], f"{r['name']} sm_{r['arch']}: no global loads in the PTX"
        assert set(r["ptx_loads"]) <= {"1", "2", "4", "8", "16"}, r["ptx_loads"]
        assert r["ld_v4"] == ("16" in r["ptx_loads"]), r


def test_sparse24_registry_covers_every_config_and_dtype():
    from robcomp.kernels import sparse24 as s24
    specs = s24.aot_specs()
    names = [spec[0] for spec in specs]
    assert len(names) == len(set(names))
    for t in ("fp16", "bf16", "fp32"):
        for kernel in ("gemv", "gemm", "bwd_input"):
            assert any(n.startswith(f"sparse24_{kernel}_{t}_") for n in names), (kernel, t)
    # every config a launcher picks is compiled (the registry and the launchers share one plan)
    for m in (1, 2, 3, 4, 5, 16, 33, 64, 65, 4096):
        for case in s24.perf_cases(m, 4096, 4096):
            for cand in case["candidates"]:
                assert cand["spec"] in names, (m, cand["spec"])
    # every tl.dot block dimension is >= 16 (the interpreter would not notice a smaller one)
    for name, _, _, consts, _ in specs:
        if "_gemv_" not in name:
            assert min(consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"]) >= 16, name


def test_sparse24_kernels_use_wide_loads_and_tensor_cores(compiled):
    from robcomp.kernels import sparse24 as s24
    spec_block_m = {spec[0]: spec[3]["BLOCK_M"] for spec in s24.aot_specs()}
    recs = [r for r in compiled if r["module"] == "sparse24" and "error" not in r]
    assert recs
    for r in recs:
        where = f"{r['name']} sm_{r['arch']}"
        if "_gemv_" in r["name"]:
            assert r["ld_v4"], f"{where}: GEMV without ld.global.v4"
        else:
            assert r["cp_async"], f"{where}: tiled kernel without cp.async pipelining"
        if r["arch"] == 90 and r["expect_mma"] and spec_block_m[r["name"]] >= 64:
            assert r["wgmma"], f"{where}: BLOCK_M >= 64 config without wgmma on sm_90"
