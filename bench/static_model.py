#!/usr/bin/env python
"""Static performance model of the Triton kernels, from their sm_90 SASS, without a GPU.

For every op a kernel module runs (``perf_cases``, below) at M in {1, 16, 64, 4096} on the target
shapes, every candidate config is compiled for sm_90 (``robcomp.kernels._aot``) and its SASS read:

* the main loop: the innermost backward branch (``BRA`` to a lower address) with the largest body,
  i.e. the K (or N, for the input gradient) loop; its instructions per iteration, global loads
  (``LDG.E.128`` = 16 bytes a thread ...), tensor-core, conversion and shuffle instructions;
* warp-instructions per dense weight = loop instructions x warps per CTA / dense weights one CTA
  consumes per iteration; total = that x N x K x ceil(M / BLOCK_M) (each M tile re-reads W);
* CTAs against the 132 SMs: a grid covering a fraction f = CTAs / (waves x SMs) of the SM-time
  issues (and computes) at f of the peak; one covering fewer SMs than exist also streams at
  CTAs / SMs of the bandwidth.

Predicted time = max(memory = bytes / bandwidth, issue = warp-instructions / 0.93e12 per s,
tensor = FLOPs / 790e12 (configs with mma/wgmma; 8-bit MMAs twice that), launches x ``LAUNCH_S``) on an H100 (3.0 TB/s)
and an H200 (4.3 TB/s); dense fp16 cuBLAS = max(2 (NK + MK + MN) bytes / bandwidth,
2MNK / 790e12, one launch). The autotuner's choice is modelled as the fastest candidate. This is
a bound-based model: it ignores latency (loads in flight are reported, not modelled), predicated
branches inside the loop (the whole body is counted) and occupancy; it tells which bound binds
and by how much, a GPU run says the rest.

Interface (every kernel module): ``perf_cases(m, n, k, dtype=torch.float16, sm_count=132)`` ->
one dict per op the launchers run for ``x [m, k]``, weight ``[n, k]``::

    {"op": "<format>_forward" | "<format>_backward_input", "launches": int,
     "bytes": int (minimum: packed weight + scales/zeros/meta + x + y), "flops": int,
     "candidates": [{"spec": <name in aot_specs() or aot_specs_fp8()>, "ctas": int,
                     "weights_per_iter": int (dense weights ONE CTA consumes per loop iteration),
                     "num_warps": int}, ...]}

Op names are ``<format>_forward`` / ``<format>_backward_input`` (``GATED`` finds the gated forward
ops by module and name: ``int8_weight``/``w8a16`` and ``int4``/``w4a16`` in lowbit, anything in
sparse24 and sparse24_lowbit). A candidate whose spec has a ``BLOCK_M`` constexpr re-reads the
weight once per M tile (``ceil(M / BLOCK_M)``); one without (the matrix-vector kernels) reads it once.

Use: ``python bench/static_model.py --md bench/STATIC.md --json bench/STATIC.json`` (or
``robcomp bench --static``); from Python (e.g. bench/gpu_suite.py): ``cases(module, m, n, k)``,
``predict(case, device="h100")``, ``table(...)``. Compiling the candidates takes about 1-2 s each
with a cold Triton cache.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEVICES = {"h100": {"name": "H100 SXM", "bandwidth": 3.0e12, "sms": 132},
           "h200": {"name": "H200", "bandwidth": 4.3e12, "sms": 132}}
#: warp-instructions per second of the whole GPU: 132 SMs x 4 schedulers x ~1.76 GHz
ISSUE_RATE = 0.93e12
#: dense fp16 tensor-core FLOP/s (cuBLAS, measured on H100); int8 / fp8 MMAs run twice as fast
TENSOR_FLOPS = 790e12
#: GPU time of one kernel launch in a stream (3-5 us; eager PyTorch)
LAUNCH_S = 4e-6
MS = (1, 16, 64, 4096)
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N)
MODULES = ("sparse24", "lowbit", "sparse24_lowbit")
ARCH = 90


# ============================================================================ SASS
@dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str      # with modifiers, e.g. "LDG.E.128"
    operands: str
    target: int | None = None  # branch target address

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_INSTR = re.compile(r"/\*([0-9a-fA-F]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L[\w.]*):")
_LABEL_REF = re.compile(r"`\((\.L[\w.]*)\)")
_HEX = re.compile(r"\b0x([0-9a-fA-F]+)\b")
_BRANCHES = ("BRA", "JMP")


def parse_sass(text: str) -> list[Instr]:
    """Instructions of one kernel's SASS, as printed by ``cuobjdump -sass`` (``BRA 0x5c0``) or
    ``nvdisasm`` (``BRA `(.L_x_1)`` with ``.L_x_1:`` label lines); branch targets resolved."""
    raw, labels, pending = [], {}, []
    for line in text.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _INSTR.search(line)
        if m is None:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        raw.append((addr, m.group(2), m.group(3).strip()))
    out = []
    for addr, op, args in raw:
        target = None
        if op.split(".")[0] in _BRANCHES:
            ref = _LABEL_REF.search(args)
            if ref and ref.group(1) in labels:
                target = labels[ref.group(1)]
            elif not ref:
                h = _HEX.search(args)
                target = int(h.group(1), 16) if h else None
        out.append(Instr(addr, op, args, target))
    return out


def find_loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """``(first, last)`` instruction indices of every loop: a branch back to a lower address
    (a branch to itself is the trap after ``EXIT``, not a loop)."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    return [(index[ins.target], i) for i, ins in enumerate(instrs)
            if ins.target is not None and ins.target < ins.addr and ins.target in index]


def main_loop(instrs: list[Instr]) -> tuple[int, int] | None:
    """The hot loop: among the innermost loops (containing no other loop), the largest body."""
    loops = find_loops(instrs)
    inner = [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]
    return max(inner, key=lambda a: a[1] - a[0], default=None)


_CLASSES = {
    "mma": ("HMMA", "HGMMA", "IMMA", "IGMMA", "QMMA", "QGMMA"),
    "mma_8bit": ("IMMA", "IGMMA", "QMMA", "QGMMA"),
    "fp32": ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP"),
    "half2": ("HFMA2", "HMUL2", "HADD2", "HMNMX2"),
    "convert": ("I2F", "I2FP", "F2F", "F2FP", "F2I", "I2I"),
    "shuffle": ("SHFL",),
    "barrier": ("BAR", "SYNCS", "WARPSYNC", "DEPBAR"),
    "shared": ("LDS", "LDSM", "STS"),
    "global_load": ("LDG", "LDGSTS"),
}


def _width(opcode: str) -> int:
    tokens = opcode.split(".")[1:]
    for tok, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if tok in tokens:
            return width
    return 4


def loop_stats(instrs: list[Instr]) -> dict | None:
    """Per-iteration counts of the main loop (None when the kernel has no loop)."""
    loop = main_loop(instrs)
    if loop is None:
        return None
    body = [ins for ins in instrs[loop[0]:loop[1] + 1] if ins.base != "NOP"]
    stats = {"instructions": len(body), "first": instrs[loop[0]].addr, "last": instrs[loop[1]].addr}
    for cls, bases in _CLASSES.items():
        stats[cls] = sum(ins.base in bases for ins in body)
    widths: dict[str, int] = {}
    for ins in body:
        if ins.base in ("LDG", "LDGSTS"):
            key = f"{ins.base}.{_width(ins.opcode)}"
            widths[key] = widths.get(key, 0) + 1
    stats["loads"] = dict(sorted(widths.items()))
    stats["load_bytes_per_thread"] = sum(int(k.split(".")[1]) * v for k, v in widths.items())
    return stats


# ============================================================================ compile
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _import_robcomp():
    """robcomp from this checkout (as bench/gpu_suite.py does; the repository root is not put on
    sys.path, its ``kernels/`` would shadow the PyPI ``kernels`` package)."""
    if "robcomp" not in sys.modules:
        for name in ("robcomp.kernels", "robcomp"):
            path = ROOT / name.split(".")[-1]
            spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                          submodule_search_locations=[str(path)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        sys.modules["robcomp"].kernels = sys.modules["robcomp.kernels"]
    return sys.modules["robcomp"]


_ANALYSES: dict = {}  # memo: (triton version, module, spec, arch) -> analysis (compiling is slow)


def analyse(specs, arch: int = ARCH, jobs: int | None = None) -> dict:
    """``{(module, spec): record}``: the ``_aot`` record of each spec compiled for ``sm_{arch}``,
    with ``loop`` = :func:`loop_stats` of its SASS. Compiles in this process (``jobs`` > 1: in
    forked workers; pass ``jobs=1`` from a process that has initialised CUDA), or in a subprocess
    without TRITON_INTERPRET when this one interprets. Memoised per Triton version."""
    import triton
    key = lambda mod, name: (triton.__version__, mod, name, arch)  # noqa: E731
    todo: dict[str, set] = {}
    for mod, name in specs:
        if key(mod, name) not in _ANALYSES:
            todo.setdefault(mod, set()).add(name)
    jobs = jobs or max(1, min(8, os.cpu_count() or 1))
    for mod, names in todo.items():
        with tempfile.TemporaryDirectory(prefix="robcomp-sass-") as d:
            if _interpreting():
                env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
                proc = subprocess.run([sys.executable, "-m", "robcomp.kernels._aot", "--arch", str(arch),
                                       "--modules", mod, "--names", *sorted(names), "--sass-dir", d,
                                       "--jobs", str(jobs)], env=env, cwd=ROOT, capture_output=True,
                                      text=True, timeout=1800)
                if proc.returncode != 0:
                    raise RuntimeError(f"AOT compile of {mod} failed: {proc.stderr[-2000:]}")
                records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            else:
                _import_robcomp()
                from robcomp.kernels import _aot
                records = _aot.run((arch,), [mod], jobs, names, d)
            for rec in records:
                path = rec.pop("sass_path", None)
                if path and "error" not in rec:
                    rec["loop"] = loop_stats(parse_sass(Path(path).read_text()))
                _ANALYSES[key(mod, rec["name"])] = rec
    out = {}
    for mod, name in specs:
        if key(mod, name) not in _ANALYSES:
            raise KeyError(f"{mod} has no aot spec named {name!r} (perf_cases and aot_specs disagree)")
        out[(mod, name)] = _ANALYSES[key(mod, name)]
    return out


# ============================================================================ model
def cases(module: str, m: int, n: int, k: int, sm_count: int = 132) -> list[dict]:
    """``perf_cases`` of ``robcomp.kernels.<module>`` (fp16), each tagged with module, m, n, k."""
    _import_robcomp()
    import torch
    mod = importlib.import_module(f"robcomp.kernels.{module}")
    return [{**c, "module": module, "m": m, "n": n, "k": k}
            for c in mod.perf_cases(m, n, k, dtype=torch.float16, sm_count=sm_count)]


def dense(m: int, n: int, k: int, device: str = "h100") -> dict:
    """Dense fp16 cuBLAS: max(bytes of W, x and y / bandwidth, tensor-core FLOPs, one launch)."""
    dev = _device(device)
    memory = 2 * (n * k + m * k + m * n) / dev["bandwidth"]
    tensor = 2 * m * n * k / TENSOR_FLOPS
    return {"time_us": 1e6 * max(memory, tensor, LAUNCH_S),
            "bound": max((("memory", memory), ("tensor", tensor), ("launch", LAUNCH_S)), key=lambda b: b[1])[0]}


def _device(device: str) -> dict:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {sorted(DEVICES)}, got {device!r}")
    return DEVICES[device]


def _candidate(case: dict, cand: dict, rec: dict, dev: dict) -> dict:
    out = {"spec": cand["spec"], "ctas": cand["ctas"], "num_warps": cand["num_warps"]}
    if "error" in rec:
        return {**out, "error": rec["error"]}
    loop = rec.get("loop")
    if not loop:
        return {**out, "error": "no main loop found in the SASS"}
    m, n, k = case["m"], case["n"], case["k"]
    per_weight = loop["instructions"] * cand["num_warps"] / cand["weights_per_iter"]
    block_m = rec.get("constexprs", {}).get("BLOCK_M")
    m_tiles = math.ceil(m / block_m) if block_m else 1
    sms, ctas = dev["sms"], cand["ctas"]
    sm_time = ctas / (math.ceil(ctas / sms) * sms)  # fraction of SM-time the grid's waves use
    eight_bit = loop.get("mma_8bit", 0) and loop["mma_8bit"] == loop["mma"]
    tensor_rate = TENSOR_FLOPS * (2 if eight_bit else 1)
    bounds = {"memory": case["bytes"] / (dev["bandwidth"] * min(1.0, ctas / sms)),
              "issue": per_weight * n * k * m_tiles / (ISSUE_RATE * sm_time),
              "tensor": case["flops"] / (tensor_rate * sm_time) if rec.get("mma") else 0.0,
              "launch": case["launches"] * LAUNCH_S}
    bound = max(bounds, key=bounds.get)
    return {**out, "registers": (rec.get("usage") or {}).get("registers"), "loop_instructions": loop["instructions"],
            "warp_instr_per_weight": per_weight, "thread_instr_per_weight": 32 * per_weight,
            "loop_loads": loop["loads"], "load_bytes_per_cta_iter": loop["load_bytes_per_thread"] * 32 * cand["num_warps"],
            "mma_per_iter": loop["mma"], "convert_per_iter": loop["convert"],
            "shuffle_per_iter": loop["shuffle"], "waves": math.ceil(ctas / sms),
            **{f"{b}_us": 1e6 * t for b, t in bounds.items()}, "time_us": 1e6 * bounds[bound], "bound": bound}


def predict(case: dict, device: str = "h100", analyses: dict | None = None) -> dict:
    """Prediction for one op case (from :func:`cases`: a ``perf_cases`` dict with module, m, n, k):
    the fastest candidate's bounds, its instructions per weight and the ratio vs dense fp16."""
    missing = [key for key in ("module", "m", "n", "k", "op", "bytes", "flops", "launches", "candidates")
               if key not in case]
    if missing:
        raise ValueError(f"case lacks {missing}: build it with static_model.cases(module, m, n, k)")
    dev = _device(device)
    specs = [(case["module"], c["spec"]) for c in case["candidates"]]
    if analyses is None:
        analyses = analyse(specs)
    preds = [_candidate(case, c, analyses[s], dev) for c, s in zip(case["candidates"], specs)]
    ok = [p for p in preds if "error" not in p]
    best = (min(ok, key=lambda p: p["time_us"]) if ok
            else {"error": "; ".join(sorted({_oneline(p["error"]) for p in preds}))})
    base = dense(case["m"], case["n"], case["k"], device)
    n, k = case["n"], case["k"]
    out = {"op": case["op"], "module": case["module"], "m": case["m"], "k": k, "n": n, "device": device,
           "bytes_per_weight": case["bytes"] / (n * k), "launches": case["launches"], **best,
           "dense_us": base["time_us"], "dense_bound": base["bound"], "sms": dev["sms"], "candidates": preds}
    if ok:
        out["ratio_vs_dense"] = base["time_us"] / best["time_us"]
        out["memory_bound"] = best["issue_us"] < best["memory_us"]
    return out


def table(ms=MS, shapes=SHAPES, devices=("h100", "h200"), modules=MODULES, jobs=None) -> dict:
    """Every op of ``modules`` at every M and (K, N): one compile of the union of the candidates."""
    import triton
    all_cases = [c for k, n in shapes for m in ms for mod in modules for c in cases(mod, m, n, k)]
    analyses = analyse(sorted({(c["module"], cd["spec"]) for c in all_cases for cd in c["candidates"]}), jobs=jobs)
    rows = [predict(c, dev, analyses) for c in all_cases for dev in devices]
    meta = {"triton": triton.__version__, "date": datetime.date.today().isoformat(), "arch": f"sm_{ARCH}",
            "devices": {d: DEVICES[d] for d in devices}, "issue_rate": ISSUE_RATE, "tensor_flops": TENSOR_FLOPS,
            "launch_s": LAUNCH_S, "dtype": "float16"}
    return {"meta": meta, "rows": rows}


#: the forward ops the gate holds to "memory-bound at M = 1, 4096 x 4096": (module, op pattern)
GATED = {"W8A16": ("lowbit", r"^(int8_weight|w8a16)"), "W4A16 g128": ("lowbit", r"^(int4|w4a16)"),
         "2:4 fp16": ("sparse24", r"^sparse24"), "2:4 + int4": ("sparse24_lowbit", r"")}
_BACKWARD = re.compile(r"backward|bwd|grad|dx")


def gated_rows(rows: list[dict], device: str = "h100") -> dict:
    """``{label: row}`` of the gated forward ops at M = 1, K = N = 4096 (a missing one maps to None)."""
    out = {}
    for label, (module, pattern) in GATED.items():
        hits = [r for r in rows if r["module"] == module and r["m"] == 1 and r["k"] == 4096 and r["n"] == 4096
                and r["device"] == device and re.search(pattern, r["op"]) and not _BACKWARD.search(r["op"])]
        out[label] = hits[0] if hits else None
    return out


# ============================================================================ output
def _fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def _oneline(text: str) -> str:
    _import_robcomp()
    from robcomp.kernels._aot import summarise_error
    return summarise_error(text)


def _short(spec: str) -> str:
    return re.sub(r"BLOCK_", "", spec).replace("GROUP_M8_", "")


def markdown(result: dict, command: str) -> str:
    meta, rows = result["meta"], result["rows"]
    devs = list(meta["devices"])
    lines = [f"# Static performance model (sm_90 SASS, triton {meta['triton']})", "",
             f"Generated {meta['date']} by `{command}` (bench/static_model.py; no GPU involved). "
             "Predicted time = max(memory = bytes / bandwidth, issue = warp-instructions / "
             f"{meta['issue_rate']:.3g} per s, tensor = FLOPs / {meta['tensor_flops']:.3g} per s (mma configs; 8-bit "
             "MMAs twice that), "
             f"launches x {1e6 * meta['launch_s']:.0f} us), issue and tensor scaled by the SM-time the grid's "
             "waves cover (132 SMs); the fastest candidate config is shown. Dense = fp16 cuBLAS predicted "
             "the same way. Ratio > 1: faster than dense. "
             + ", ".join(f"{d} = {v['name']} {v['bandwidth'] / 1e12:.1f} TB/s" for d, v in meta["devices"].items())
             + ". instr/w = warp-instructions per dense weight in the main loop (x 32 = thread-instructions); "
             "B/w = the op's minimum bytes per weight; loop loads = global loads per iteration (LDG = "
             "synchronous, LDGSTS = cp.async) by bytes per thread; KB/iter = bytes one CTA requests per iteration.",
             "", "## Gate: memory-bound at M = 1, K x N = 4096 x 4096 (H100)", "",
             "| kernel | op | spec | instr/w | issue us | memory us | memory-bound |", "|---|---|---|---|---|---|---|"]
    for label, r in gated_rows(rows).items():
        if r is None or "error" in r:
            lines.append(f"| {label} | {r['op'] if r else 'missing'} | {_oneline((r or {}).get('error', 'no case'))} "
                         "| | | | no |")
            continue
        lines.append(f"| {label} | {r['op']} | {_short(r['spec'])} | {_fmt(r['warp_instr_per_weight'], 3)} | "
                     f"{_fmt(r['issue_us'])} | {_fmt(r['memory_us'])} | {'yes' if r['memory_bound'] else 'NO'} |")
    head = ["op", "M", "K x N", "best spec", "CTAs", "warps", "regs", "loop instr", "instr/w", "B/w", "loop loads", "KB/iter"]
    for d in devs:
        head += [f"{d} us", f"{d} bound", f"{d} dense us", f"{d} ratio"]
    lines += ["", "## All ops", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["k"], r["n"], r["m"], r["module"], r["op"]), {})[r["device"]] = r
    for (k, n, m, _, op), per in by_key.items():
        r0 = per[devs[0]]
        if "error" in r0:
            lines.append(f"| {op} | {m} | {k} x {n} | error: {_oneline(r0['error'])} |" + " |" * (len(head) - 4))
            continue
        loads = " ".join(f"{w}x{c}" for w, c in r0["loop_loads"].items())
        cells = [op, str(m), f"{k} x {n}", _short(r0["spec"]), str(r0["ctas"]), str(r0["num_warps"]),
                 str(r0["registers"]), str(r0["loop_instructions"]), _fmt(r0["warp_instr_per_weight"], 3),
                 _fmt(r0["bytes_per_weight"], 3), loads, _fmt(r0["load_bytes_per_cta_iter"] / 1024, 1)]
        for d in devs:
            r = per[d]
            cells += [_fmt(r["time_us"]), r["bound"], _fmt(r["dense_us"]), _fmt(r["ratio_vs_dense"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
    _import_robcomp()  # this script also runs from a checkout where robcomp is not installed
    from robcomp._io import write_text_atomic  # umask permissions, not mkstemp's private 0600

    write_text_atomic(path, text, parents=True)


def _shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"a shape is KxN, e.g. 4096x14336; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", type=int, nargs="+", default=list(MS))
    p.add_argument("--shapes", type=_shape, nargs="+", default=list(SHAPES), metavar="KxN")
    p.add_argument("--modules", nargs="+", default=list(MODULES), choices=MODULES)
    p.add_argument("--md", help="write the Markdown table here (e.g. bench/STATIC.md)")
    p.add_argument("--json", help="write the rows as JSON here (e.g. bench/STATIC.json)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles")
    a = p.parse_args(argv)
    if _interpreting():
        print("note: TRITON_INTERPRET is set; compiling in a subprocess without it", file=sys.stderr)
    result = table(a.ms, a.shapes, modules=a.modules, jobs=a.jobs)
    command = "python bench/static_model.py" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:]))
    text = markdown(result, command)
    if a.md:
        _write(a.md, text)
    if a.json:
        _write(a.json, json.dumps({**result, "command": command}, separators=(",", ":")) + "\n")
    print(text)
    gate = gated_rows(result["rows"])
    failing = [k for k, r in gate.items() if not r or "error" in r or not r["memory_bound"]]
    if failing:
        print(f"gate: predicted NOT memory-bound at M=1, 4096x4096 on H100: {', '.join(failing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
