"""Ahead-of-time compilation of every kernel configuration for sm_80 and sm_90, on the CPU.

The interpreter accepts programs the GPU compiler rejects; this compiles the real kernels (in a
subprocess without TRITON_INTERPRET, see robcomp.kernels._aot) and reads the result: tensor-core
instructions where a kernel does dots, and no register spills on sm_90 (cuobjdump).
"""
import json
import os
import subprocess
import sys

import pytest

from robcomp.kernels import _aot

MODULES = [m for m in _aot.KERNEL_MODULES]


def test_every_kernel_module_exposes_aot_specs():
    missing = [m for m in MODULES if m not in _aot.available_modules((m,))]
    assert not missing, f"kernel modules without aot_specs(): {missing}"


@pytest.fixture(scope="module")
def compiled():
    """One subprocess compiling every spec of every kernel module, in parallel processes."""
    mods = list(MODULES)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "robcomp.kernels._aot", "--modules", *mods,
                           "--jobs", str(max(2, min(8, os.cpu_count() or 2)))],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return records


@pytest.mark.parametrize("module", MODULES)
def test_every_config_compiles_for_sm80_and_sm90(compiled, module):
    recs = [r for r in compiled if r["module"] == module]
    assert recs, f"{module}.aot_specs() returned no specs"
    errors = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in recs if "error" in r]
    assert not errors, "\n".join(errors)
    assert {r["arch"] for r in recs} == set(_aot.ARCHS)
    no_mma = [f"{r['name']} sm_{r['arch']}" for r in recs if r["expect_mma"] and not r["mma"]]
    assert not no_mma, f"dot kernels without mma/wgmma in their PTX: {no_mma}"
    unread = [r["name"] for r in recs if r["arch"] == 90 and not r.get("usage")]
    assert not unread, f"cuobjdump gave no resource usage (spills unchecked) for: {unread[:5]}"
    spills = [f"{r['name']}: {r['usage']}" for r in recs
              if r["arch"] == 90 and r.get("usage") and not r["allow_spills"]
              and (r["usage"].get("stack", 0) or r["usage"].get("local", 0))]
    assert not spills, (f"kernels that spill on sm_90: {spills}. Compile them as they run (options "
                        "'divisible_by_16', see robcomp/kernels/_aot.py), shrink the config, or mark it "
                        "allow_spills with a reason")


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
        assert r["usage"] is None or not (r["usage"].get("stack") or r["usage"].get("local")), \
            f"{where}: spills {r['usage']}"
