"""CPU benchmarks: every robcomp format's CPU paths and its dispatched path against the CPU peers,
in the same run (pytest-benchmark, timing through bench/harness.py).

Peers: dense fp32 and bf16 ``F.linear``, ``torch.ao.quantization.quantize_dynamic`` (fbgemm int8,
forward only: it has no input gradient), and where they import (each absent one is recorded in the
results' ``environment.peers_absent`` with the reason): torchao's CPU weight-only int8
(``Int8WeightOnlyConfig``) and int4 (``IntxWeightOnlyConfig(int4, PerGroup(128))``: torchao 0.18's
``Int4WeightOnlyConfig`` has no CPU layout), bitsandbytes' CPU ``Linear8bitLt`` (int8) and
``Linear4bit`` (nf4, bf16 compute). These four are forward only and are their own formats (their
own rounding), so their outputs are checked against the float64 product with a looser bound. robcomp: for each format every path the layer has on CPU
(``native``, ``dense``, ``reference``) and ``dispatched``: the path ``robcomp.tune`` picks when fed
this run's timings (same mechanism as a real tune; being the minimum of noisy medians it is
slightly optimistic). Directions: ``forward`` (inference under ``torch.no_grad``; each path
timed as ``layer(x)`` on a copy tuned to it, so with the eager call plan and prepared kernel a
model's forward runs) and ``forward+grad`` (``run_path`` plus the input gradient ``dX``, what an
attack step pays). Candidates are timed round-robin (one call of each per
round, median over rounds) because the machine is shared and noisy.

Sizes: tiny by default (CI: ``pytest bench --benchmark-disable`` runs each case once and checks
every output against the float64 product of the stored weight). ``ROBCOMP_BENCH_CPU=full`` runs
K x N in {1024x1024, 4096x4096, 4096x14336}, M in {1, 4, 16, 64, 256}, 1 thread and all threads,
and writes ``bench/results/cpu-<date>-<machine>.json`` (CPU model, ISA flags, threads, versions)
after every case (atomic replace; a later run the same day adds to the file, replacing the cases
it measures again). ``ROBCOMP_BENCH_CPU_SHAPES=4096x4096,...``,
``ROBCOMP_BENCH_CPU_MS=1,16`` and ``ROBCOMP_BENCH_CPU_THREADS=1`` narrow a full run;
``ROBCOMP_BENCH_CPU_BUDGET_S`` is the timing budget per case (default 6 s, at least 3 rounds);
``ROBCOMP_BENCH_CPU_OUT=path.json`` writes a full run to that file instead.

Summarise a results file: ``python -m bench.cpu_report bench/results/cpu-....json``.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import robcomp
from bench.harness import RESULTS_DIR, matmul_flops
from robcomp._io import write_json_atomic
from robcomp.compression.handlers import layer_type_for
from robcomp.kernels import cpu as CPU
from robcomp.layers.linear import tensor_bytes
from robcomp.recipes import FP8Dynamic, Int4WeightOnly, Int8Dynamic, Int8WeightOnly, Sparse24, Sparse24Int4

FULL = os.environ.get("ROBCOMP_BENCH_CPU", "").strip() == "full"


def _env_list(name, default, parse):
    raw = os.environ.get(name, "").strip()
    return [parse(v) for v in raw.split(",") if v.strip()] if raw else default


SHAPES = _env_list("ROBCOMP_BENCH_CPU_SHAPES", [(1024, 1024), (4096, 4096), (4096, 14336)] if FULL else [(256, 256)],
                   lambda s: tuple(int(v) for v in s.lower().split("x")))  # (K, N)
MS = _env_list("ROBCOMP_BENCH_CPU_MS", [1, 4, 16, 64, 256] if FULL else [1, 16], int)
THREADS = _env_list("ROBCOMP_BENCH_CPU_THREADS", sorted({1, os.cpu_count() or 1}) if FULL else [1], int)
BUDGET_S = float(os.environ.get("ROBCOMP_BENCH_CPU_BUDGET_S", "6"))
RECIPES = {"sparse24": Sparse24(), "int8_weight_only": Int8WeightOnly(), "int4_weight_only_g128": Int4WeightOnly(128),
           "int8_dynamic": Int8Dynamic(), "fp8_dynamic": FP8Dynamic(), "sparse24_int4_g128": Sparse24Int4(128)}
CPU_ONLY = pytest.mark.skipif(not CPU.available(), reason="numba (a declared dependency) is missing")


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """CPU model, ISA flags that matter for these kernels, threads, versions, date."""
    info = {"cpu_model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["cpu_model"] = value.strip()
            if key.strip() == "flags":
                flags = set(value.split())
                info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
                break
    except OSError:
        pass
    import numba
    info["device"] = f"cpu ({info['cpu_model']})"  # the key every recorded figure carries
    info.update(logical_cpus=os.cpu_count(), torch=torch.__version__, numba=numba.__version__,
                numpy=__import__("numpy").__version__, python=platform.python_version(),
                torchao=_dist_version("torchao"), bitsandbytes=_dist_version("bitsandbytes"),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                note="shared 2-core VM; ratios are same-run medians of round-robin timings")
    return info


class _Results:
    def __init__(self):
        self.env = machine()
        self.rows: list[dict] = []
        self.path: Path | None = None

    def _key(self, r):
        return tuple(r.get(k) for k in ("K", "N", "M", "threads", "direction", "impl"))

    def add(self, rows: list[dict]) -> None:
        if not self.rows and FULL:  # a later invocation on the same day and machine adds to the file
            self._file()
            if self.path.exists():
                try:
                    self.rows = json.loads(self.path.read_text())["results"]
                except (OSError, ValueError, KeyError):
                    self.rows = []
        new = {self._key(r) for r in rows}
        self.rows = [r for r in self.rows if self._key(r) not in new] + rows
        if FULL and os.environ.get("ROBCOMP_BENCH_CPU_WRITE", "1") != "0":
            self.write()

    def _file(self) -> None:
        if self.path is None and os.environ.get("ROBCOMP_BENCH_CPU_OUT", "").strip():
            self.path = Path(os.environ["ROBCOMP_BENCH_CPU_OUT"].strip())
        if self.path is None:
            slug = "".join(c if c.isalnum() else "-" for c in self.env["cpu_model"]).strip("-").lower()
            self.path = RESULTS_DIR / f"cpu-{self.env['date'][:10]}-{slug}.json"

    def write(self) -> None:
        self._file()
        self.env["peers_absent"] = dict(PEERS_ABSENT)
        write_json_atomic(self.path, {"environment": self.env, "results": self.rows}, parents=True, indent=1)


@pytest.fixture(scope="module")
def results():
    return _Results()


def _round_robin(fns: dict, budget_s: float, min_rounds: int = 3) -> dict[str, float]:
    """Median ms of each callable, one call of each per round, until the budget is spent."""
    for fn in fns.values():
        fn()  # warm-up: numba compilation, derived weights
    samples = {k: [] for k in fns}
    t_start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - t_start < budget_s and rounds < 25):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {k: statistics.median(v) for k, v in samples.items()}


def _weight(n, k):
    return torch.randn(n, k) * (1.0 / k ** 0.5)


_LAYERS: dict = {}


def _layers(k, n):
    """The dense layer and every format's layer for one shape, packed once per session."""
    if (k, n) not in _LAYERS:
        _LAYERS.clear()  # one shape at a time: the 4096x14336 layers are large
        torch.manual_seed(0)
        linear = nn.Linear(k, n, bias=False)
        linear.weight.data = _weight(n, k)
        _LAYERS[(k, n)] = linear, {fmt: layer_type_for(r).from_linear(linear, r) for fmt, r in RECIPES.items()}
    return _LAYERS[(k, n)]


#: peer name -> why it is not in the run (filled as peers are built)
PEERS_ABSENT: dict[str, str] = {}
#: forward-only peers with their own quantisation: name -> relative error bound vs the fp32 product
LIBRARY_PEERS = {"torchao_int8_weight_only": 2e-2, "torchao_int4_weight_only_g128": 0.15,
                 "bnb_int8": 2e-2, "bnb_nf4": 0.15}
_PEERS: dict = {}


def _library_peers(linear) -> dict:
    """torchao and bitsandbytes CPU layers for ``linear``'s weight (name -> module), built once per
    shape; a peer that does not install, import or run on CPU is left out with its reason."""
    key = tuple(linear.weight.shape)
    if key in _PEERS:
        return _PEERS[key]
    _PEERS.clear()
    out = {}
    k = linear.in_features

    def build(name, fn):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = fn()
                with torch.no_grad():
                    module(torch.randn(2, k))
            out[name] = module
        except Exception as e:  # not installed, no CPU layout in this version, ...
            PEERS_ABSENT[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"

    def torchao(config):
        from torchao.quantization import quantize_

        m = nn.Sequential(copy.deepcopy(linear))
        quantize_(m, config())
        return m

    def ao_int8():
        from torchao.quantization import Int8WeightOnlyConfig
        return Int8WeightOnlyConfig()

    def ao_int4():
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128))

    def bnb_int8():
        import bitsandbytes as bnb
        m = bnb.nn.Linear8bitLt(k, linear.out_features, bias=False, has_fp16_weights=False, threshold=0.0)
        m.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
        return m.to("cpu")  # bitsandbytes quantises on the move to the device

    def bnb_nf4():
        import bitsandbytes as bnb
        m = bnb.nn.Linear4bit(k, linear.out_features, bias=False, quant_type="nf4", compute_dtype=torch.bfloat16)
        m.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4")
        return m.to("cpu")

    build("torchao_int8_weight_only", lambda: torchao(ao_int8))
    build("torchao_int4_weight_only_g128", lambda: torchao(ao_int4))
    build("bnb_int8", bnb_int8)
    build("bnb_nf4", bnb_nf4)
    try:  # the packed int4 layout robcomp would compare with, where this torchao has one for CPU
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
        m = nn.Sequential(copy.deepcopy(linear)).bfloat16()
        quantize_(m, Int4WeightOnlyConfig(group_size=128))
        m(torch.randn(1, k).bfloat16())
    except Exception as e:
        PEERS_ABSENT["torchao_int4_packed (Int4WeightOnlyConfig)"] = f"{type(e).__name__}: {str(e)[:200]}"
    _PEERS[key] = out
    return out


def _quantize_dynamic(linear):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(nn.Sequential(copy.deepcopy(linear)), {nn.Linear}, dtype=torch.qint8)


def _case_fns(layers, linear, x, g, grad):
    """name -> (callable, path label) for every peer and every path of every format."""
    w32, wbf = linear.weight.detach(), linear.weight.detach().bfloat16()
    xb = x.bfloat16()
    out = {}
    if grad:
        def fwd_bwd(f, inp):
            def run():
                xi = inp.detach().requires_grad_()
                f(xi).backward(g if inp.dtype == torch.float32 else g.to(inp.dtype))
            return run
        out["dense_fp32"] = fwd_bwd(lambda t: F.linear(t, w32), x)
        out["dense_bf16"] = fwd_bwd(lambda t: F.linear(t, wbf), xb)
        for fmt, layer in layers.items():
            for p in layer.paths(x.device, x.dtype):
                out[f"{fmt}:{p}"] = fwd_bwd(lambda t, layer=layer, p=p: layer.run_path(p, t), x)
    else:  # inference: no gradient recorded, each format's path run as a model's forward runs it
        qd = _quantize_dynamic(linear)
        out["dense_fp32"] = lambda: F.linear(x, w32)
        out["dense_bf16"] = lambda: F.linear(xb, wbf)
        out["quantize_dynamic_int8"] = lambda: qd(x)
        for name, module in _library_peers(linear).items():
            out[name] = lambda module=module: module(x)
        for fmt, layer in layers.items():
            for p in layer.paths(x.device, x.dtype):
                out[f"{fmt}:{p}"] = _pinned(layer, p, x)
        out = {name: _no_grad(fn) for name, fn in out.items()}
    return out


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    run.layer = getattr(fn, "layer", None)
    return run


def _pinned(layer, path, x):
    """``layer(x)`` on a copy whose tuned path for x's shape is ``path``: the eager call plan and
    the prepared kernel where the path has one (kernels/cpu_prepared.py), as a tuned model runs."""
    pinned = copy.deepcopy(layer)
    pinned.tuned_paths[(x.device.type, x.dtype, robcomp.layers.dispatch.m_bucket(x.shape[0]))] = path
    with torch.no_grad():
        pinned(x)  # builds the plan and any derived copy outside the timing
    assert pinned.last_path == path, (path, pinned.last_path)

    def run():
        return pinned(x)
    run.layer = pinned  # what it holds, derived copies included (the dispatched row's bytes)
    return run


def _check_outputs(layers, x, linear=None):
    """Every path of every format against the float64 product of its stored weight; the library
    peers against the float64 product of the dense weight, within their own rounding's bound."""
    if linear is not None:
        ref = x.double() @ linear.weight.detach().double().T
        for name, module in _library_peers(linear).items():
            with torch.no_grad():
                err = ((module(x).double() - ref).norm() / ref.norm()).item()
            assert err < LIBRARY_PEERS[name], (name, err)
    for fmt, layer in layers.items():
        w = layer.dequantize().double()
        for p in layer.paths(x.device, x.dtype):
            y = layer.run_path(p, x).double()
            ref = layer.forward_reference(x).double() if layer.gradient == "straight-through" else x.double() @ w.T
            err = ((y - ref).norm() / ref.norm()).item()
            assert err < 1.5e-2, (fmt, p, err)


@CPU_ONLY
@pytest.mark.parametrize("direction", ["forward", "forward+grad"])
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", SHAPES)
def test_cpu_formats_vs_peers(benchmark, results, k, n, m, threads, direction, tmp_path):
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        linear, layers = _layers(k, n)
        torch.manual_seed(m)
        x = torch.randn(m, k)
        g = torch.randn(m, n)
        if benchmark.disabled:  # CI smoke run: correctness of every path, then one call of each peer
            _check_outputs(layers, x, linear)
            for fn in _case_fns(layers, linear, x, g, direction != "forward").values():
                fn()
            return
        fns = _case_fns(layers, linear, x, g, direction != "forward")
        budget = BUDGET_S * (1.0 if m <= 16 or k * n <= 2 ** 24 else 2.0)
        ms = _round_robin(fns, budget)
        rows = []
        base = ms["dense_fp32"]
        peers = {kk: v for kk, v in ms.items() if ":" not in kk and kk != "dense_fp32"}
        best_peer = min(peers.items(), key=lambda kv: kv[1]) if peers else None
        common = {"K": k, "N": n, "M": m, "threads": threads, "direction": direction, "dtype": "float32"}
        for name, t in ms.items():
            rows.append({**common, "impl": name, "ms": round(t, 4), "speedup_vs_dense_fp32": round(base / t, 3),
                         "gflops": round(matmul_flops(m, n, k) / (t * 1e-3) / 1e9, 2)})
        # the dispatched path: robcomp.tune fed this run's timings (the same decision rule)
        cache = robcomp.layers.dispatch.DispatchCache(tmp_path / "dispatch.json")
        for fmt, layer in layers.items():
            table = robcomp.tune(nn.Sequential(layer), x, cache=cache,
                                 measure=lambda fn, fmt=fmt: ms[f"{fmt}:{fn.args[0]}"])
            choice = table["0"][f"float32|M{robcomp.layers.dispatch.m_bucket(m)}"]["choice"]
            t = ms[f"{fmt}:{choice}"]
            ran = getattr(fns[f"{fmt}:{choice}"], "layer", None) or layer
            row = {**common, "impl": f"{fmt}:dispatched", "path": choice, "ms": round(t, 4),
                   "speedup_vs_dense_fp32": round(base / t, 3), "weight_bytes": tensor_bytes(ran),
                   "dense_fp32_weight_bytes": 4 * n * k}
            if best_peer is not None:
                row.update(best_peer=best_peer[0], speedup_vs_best_peer=round(best_peer[1] / t, 3))
            if direction == "forward":
                row["speedup_vs_quantize_dynamic"] = round(ms["quantize_dynamic_int8"] / t, 3)
            rows.append(row)
        results.add(rows)
        benchmark.extra_info.update(case=common, ms=ms)
        benchmark.pedantic(fns["dense_fp32"], rounds=1, iterations=1)
    finally:
        torch.set_num_threads(old_threads)


@CPU_ONLY
def test_per_call_overhead_of_a_small_layer(benchmark, results):
    """Python cost of one compressed layer call at 256x256, M=1, no gradient (``layer(x)``: the
    eager plan and the prepared kernel, kernels/cpu_prepared.py), next to dense F.linear and
    nn.Linear, each format's generic launcher (``run_path``) and the raw kernel."""
    torch.set_num_threads(1)
    linear = nn.Linear(256, 256, bias=False)
    linear.weight.data = _weight(256, 256)
    x = torch.randn(1, 256)
    layer = layer_type_for(Int8Dynamic).from_linear(linear, Int8Dynamic())
    sp = layer_type_for(Sparse24).from_linear(linear, Sparse24())
    raw_v, raw_m = sp.values, sp.meta
    from robcomp.inputs import check_float_input

    fns = {"dense_fp32": lambda: F.linear(x, linear.weight),
           "dense_fp32:nn.Linear": lambda: linear(x),  # a module call, like the compressed layers'
           "int8_dynamic:layer": lambda: layer(x),
           "sparse24:layer": lambda: sp(x),
           "sparse24:raw_kernel": lambda: CPU.sp24_fwd(x, raw_v, raw_m),
           "sparse24:select_path_only": lambda: sp.select_path(x),
           "check_float_input_only": lambda: check_float_input(x, "overhead")}
    if hasattr(CPU, "_sp24_fwd"):  # the numba kernel without its torch.library custom-op wrapper
        fns["sparse24:numba_kernel_without_custom_op"] = lambda: CPU._sp24_fwd(x, raw_v, raw_m)
    # per format: the whole call (checks, dispatch, path record), the chosen path alone, and the
    # format's CPU entry point alone (derived-weight lookup, custom-op wrapper, kernel)
    for fmt, recipe in RECIPES.items():
        lay = layer_type_for(recipe).from_linear(linear, recipe)
        path = lay.select_path(x)
        fns[f"{fmt}:layer"] = lambda lay=lay: lay(x)
        fns[f"{fmt}:run_path({path})"] = lambda lay=lay, path=path: lay.run_path(path, x)
        if path == "native":
            fns[f"{fmt}:forward_cpu"] = lambda lay=lay: lay.forward_cpu(x)
    if benchmark.disabled:
        for fn in fns.values():
            fn()
        return

    def many(fn):
        def run():
            with torch.no_grad():  # inference: no autograd graph for either the dense or the compressed call
                for _ in range(200):
                    fn()
        return run
    ms = _round_robin({kk: many(f) for kk, f in fns.items()}, 3.0)
    results.add([{"K": 256, "N": 256, "M": 1, "threads": 1, "direction": "overhead", "impl": kk,
                  "us_per_call": round(v * 1e3 / 200, 2)} for kk, v in ms.items()])
    benchmark.extra_info.update(us_per_call={kk: v * 1e3 / 200 for kk, v in ms.items()})
    benchmark.pedantic(fns["sparse24:layer"], rounds=1, iterations=1)
