"""``robcomp`` command line: ``run`` (the main job: a study), ``evaluate MODEL``, ``report DIR``, ``env``, ``bench``.

Bad input ends with one ``robcomp: error: ...`` line on stderr and exit code 2, before any file
is written. Only argparse and the standard library are imported before a command runs, so
``--help``, ``--version`` and argument errors return without importing torch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


DESCRIPTION = ("robcomp: compress neural networks with real kernels and measure accuracy, adversarial "
               "robustness and speed in one run. Commands: run (the main job: a study), evaluate MODEL, report DIR, env, "
               "bench.")
DEFAULT_OUT, QUICK_OUT = "robcomp-out", "robcomp-out-quick"
#: ``robcomp evaluate``'s default attacks and radius: a study file's default (fgsm:eps=0.1, pgd:eps=0.1,steps=10)
EVALUATE_ATTACKS, EVALUATE_EPS = ("fgsm", "pgd:steps=10"), "0.1"


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit code 2."""




def _parse_recipes(specs: list[str]) -> tuple[str, ...]:
    from robcomp.recipes import parse_recipe

    try:
        for s in specs:
            parse_recipe(s)
    except ValueError as e:
        raise UsageError(f"--recipes: {e}") from None
    return tuple(specs)


def _study_spec(args):
    """The spec a ``run`` command asks for: --config or the default, --quick, then the overrides."""
    import dataclasses

    from robcomp.zoo.models import MODELS
    from robcomp.study.spec import default_spec, load_spec, quick_spec

    try:
        spec = load_spec(args.config) if args.config else default_spec()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.quick:
        spec = quick_spec(spec)
    if args.models:
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        unknown = [m for m in models if m not in MODELS]
        if unknown or not models:
            raise UsageError(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
        spec = spec.replace(experiments=tuple(dataclasses.replace(e, models=models) for e in spec.experiments))
    if args.recipes:
        recipes = _parse_recipes(args.recipes)
        spec = spec.replace(experiments=tuple(dataclasses.replace(e, recipes=recipes) if e.recipes else e
                                              for e in spec.experiments))
    if args.seed is not None:
        if args.seed < 0:
            raise UsageError(f"--seed must be a non-negative integer (torch seeds are >= 0), got {args.seed}")
        spec = spec.replace(seeds=(args.seed,), experiments=tuple(dataclasses.replace(e, seeds=None)
                                                                  for e in spec.experiments))
    return spec


def _executor(args):
    """None (in-process) or the Ray executor ``--executor ray`` asks for."""
    if args.executor == "inprocess":
        for flag, value in (("--address", args.address), ("--task-cpus", args.task_cpus),
                            ("--task-gpus", args.task_gpus)):
            if value is not None:
                raise UsageError(f"{flag} needs --executor ray")
        return None
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UsageError('--executor ray needs Ray: pip install -e ".[ray]"')
    from robcomp.study.ray_executor import RayExecutor

    try:
        return RayExecutor(args.address, args.task_cpus, args.task_gpus or 0)
    except ValueError as e:
        raise UsageError(f"--{str(e).replace('_', '-')}") from None


def _cmd_run(args) -> int:
    from robcomp.study.runner import check_output_dir, run_study
    from robcomp.study.spec import default_spec_text

    if args.print_config:
        from robcomp.study.spec import shipped_spec_text

        if args.config and not Path(args.config).exists() and shipped_spec_text(args.config) is not None:
            print(shipped_spec_text(args.config), end="")
        elif args.config:
            try:
                print(Path(args.config).read_text(encoding="utf-8"), end="")
            except OSError as e:
                raise UsageError(f"--config {args.config!r}: cannot read: {e.strerror or e}") from None
        else:
            print(default_spec_text(), end="")
        return 0
    from robcomp._io import DirectoryBusyError
    from robcomp.report.results import read_records
    from robcomp.study.runner import check_same_study

    spec = _study_spec(args)
    executor = _executor(args)
    try:
        spec.points()  # every recipe/model combination is well-formed before anything is written
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = args.out if args.out is not None else (QUICK_OUT if args.quick else DEFAULT_OUT)
    try:
        check_output_dir(out)
        results = Path(out) / "results.jsonl"
        if results.exists():
            check_same_study(results, read_records(results, tolerate_partial_last_line=True), spec)
    except (PermissionError, ValueError) as e:
        raise UsageError(str(e)) from None
    t0 = time.perf_counter()
    try:
        run_study(spec, out, progress=not args.no_progress, use_cache=not args.no_cache, executor=executor)
    except DirectoryBusyError as e:
        raise UsageError(str(e)) from None
    print(f"finished in {time.perf_counter() - t0:.1f} s")
    return 0


def _eps(text: str) -> float:
    """``--eps``: a number or a fraction such as ``8/255``."""
    import math
    from fractions import Fraction

    try:
        eps = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--eps {text!r} is not a number or a fraction such as 8/255") from None
    if not (eps > 0 and math.isfinite(eps)):
        raise UsageError(f"--eps must be positive, got {text!r}")
    return eps


def _evaluate_attacks(specs: list[str], eps: float) -> list:
    """The attacks as a study file names them; ``eps`` completes each spec that names none."""
    from robcomp.options import parse_options
    from robcomp.study.spec import SpecError, make_attacks

    full = []
    for spec in specs:
        try:
            has_eps = "eps" in parse_options(spec, "attack", SpecError)[1]
        except SpecError as e:
            raise UsageError(f"--attacks: {e}") from None
        head = spec.strip().rstrip(",")
        sep = ":" if ":" not in head else "" if head.endswith(":") else ","  # fgsm / pgd: / pgd:steps=3
        full.append(head if has_eps else f"{head}{sep}eps={eps!r}")
    try:
        attacks = make_attacks(full)
    except SpecError as e:
        raise UsageError(f"--attacks: {e}") from None
    names = [a.name for a in attacks]
    if len(set(names)) != len(names):
        raise UsageError(f"--attacks: two attacks have the same name: {names}")
    return attacks


def _check_writable(flag: str, path: str | None) -> None:
    """``path`` can be written without creating anything now (its directory may not exist yet)."""
    if path is None:
        return
    if not path.strip():
        raise UsageError(f"{flag} is empty: name the file to write")
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path!r} is a directory: name a .json file")
    ancestor = next(a for a in p.absolute().parents if a.exists())
    if not (ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK)):
        raise UsageError(f"{flag} {path!r}: cannot write there ({ancestor} is not a writable directory)")


def _evaluate_device(text: str | None, torchrun: bool) -> str | None:
    """Under torchrun ``cpu`` (gloo) or ``cuda`` (NCCL, cuda:LOCAL_RANK), default by CUDA; else any device."""
    import torch

    from robcomp.inputs import check_device

    if text is None:
        return None if torchrun else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = check_device(text)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
    if torchrun and (device.type not in ("cpu", "cuda") or device.index is not None):
        raise UsageError(f"--device {text!r}: under torchrun give cpu or cuda (each rank takes cuda:LOCAL_RANK)")
    return text


def _cmd_evaluate(args) -> int:
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    attacks = _evaluate_attacks(args.attacks, _eps(args.eps))
    _check_writable("--out", args.out)
    _check_writable("--state", args.state)
    from robcomp.evaluation.command import (check_model_takes, load_test_data, run_evaluation, summary_line,
                                            torchrun_rank_world, under_torchrun)
    from robcomp.serialize import load

    device = _evaluate_device(args.device, under_torchrun())
    try:
        x, y = load_test_data(args.data, args.limit)
    except ValueError as e:
        raise UsageError(f"--data: {e}") from None
    try:
        model = load(args.model)
    except (OSError, ValueError) as e:
        raise UsageError(f"MODEL: {e}") from None
    try:
        check_model_takes(model, x, y)
    except ValueError as e:
        raise UsageError(f"MODEL and --data {args.data!r}: {e}") from None
    rank, world = torchrun_rank_world()
    if -(-len(x) // args.batch_size) < world:
        raise UsageError(f"{len(x)} examples make {-(-len(x) // args.batch_size)} batches of --batch-size "
                         f"{args.batch_size} for {world} ranks: every rank needs one (a smaller --batch-size)")
    try:
        record = run_evaluation(model, (x, y), attacks=attacks, batch_size=args.batch_size, device=device,
                                out=args.out, state=args.state)
    except ValueError as e:  # e.g. --state holds another evaluation's state
        raise UsageError(str(e).replace("state_path", "--state", 1)) from None
    if rank == 0:
        print(summary_line(record, args.out))
    return 0


def _cmd_report(args) -> int:
    import shutil

    from robcomp._io import atomic_path
    from robcomp.report import read_records
    from robcomp.report.bench import load_bench
    from robcomp.report.render import render_report

    directory = Path(args.directory)
    try:
        records = read_records(directory / "results.jsonl", tolerate_partial_last_line=True)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"DIR: {e}") from None
    for f in args.bench or ():
        try:
            load_bench(f)
        except ValueError as e:
            raise UsageError(str(e)) from None
    for f in args.bench or ():  # keep a copy so that a later `robcomp report DIR` shows it too
        dest = directory / "bench" / Path(f).name
        dest.parent.mkdir(exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(f, tmp)
    paths = render_report(directory, records)
    print(f"rendered from {sum(1 for r in records if 'point_id' in r or 'clean_accuracy' in r)} records: "
          + ", ".join(str(p) for p in paths))
    return 0


def _cmd_env(args) -> int:
    import torch

    from robcomp.evaluation.env import environment, package_version, triton_status

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = environment(device)
    info["triton_kernels"] = triton_status()
    for name, dist in (("torch_pruning", "torch-pruning"), ("bitsandbytes", "bitsandbytes"), ("numba", "numba"),
                       ("safetensors", "safetensors")):
        # the installed distribution's version, not the module's __version__ (torch-pruning's lags)
        info[name] = package_version(dist) or "not installed"
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key.ljust(width)}  {value}")
    return 0


def _cmd_bench(args) -> int:
    # the suites live in the source checkout: the current directory, else next to an editable install
    candidates = [Path.cwd() / "bench", Path(__file__).resolve().parent.parent / "bench"]
    bench_dir = next((c for c in candidates if (c / "conftest.py").is_file() or c.is_dir()), None)
    if bench_dir is None:
        raise UsageError("benchmark suites (bench/) not found: run `robcomp bench` from a source checkout")
    if not args.out.strip():
        raise UsageError("--out is empty: name the pytest-benchmark JSON file to write")
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            raise UsageError(f"--out {args.out!r} is a directory: name a .json file")
        with tempfile.TemporaryFile(dir=out.parent, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"--out {args.out!r}: cannot write there: {e.strerror or e}") from None
    if args.static:  # predicted from the compiled SASS, no GPU: bench/static_model.py
        cmd = [sys.executable, str(bench_dir / "static_model.py"), "--md", str(out.with_name("STATIC.md")),
               "--json", str(out.with_name("STATIC.json"))]
        print(" ".join(cmd))
        return subprocess.call(cmd)
    cmd = [sys.executable, "-m", "pytest", str(bench_dir), "-q", f"--benchmark-json={out}"]
    print(" ".join(cmd))
    return subprocess.call(cmd)


def _parser() -> argparse.ArgumentParser:
    from robcomp._version import __version__

    p = argparse.ArgumentParser(prog="robcomp", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"robcomp {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the main job: run a study (default: the shipped one) on the embedded digits "
                                     "data and write results.jsonl, report.md, report.html and plots/")
    run.add_argument("--config", metavar="FILE.toml", help="study specification (default: the shipped default study; "
                                                           "see --print-config), or the name of a shipped study: "
                                                           "memory_bound (a model whose weights outgrow the CPU cache)")
    run.add_argument("--print-config", action="store_true", help="print the study specification (TOML) and exit")
    run.add_argument("--out", default=None, help=f"output directory (default ./{DEFAULT_OUT}, with --quick "
                                                 f"./{QUICK_OUT}); a rerun of the same study into the same directory "
                                                 "skips finished points; another study's directory is refused")
    run.add_argument("--quick", action="store_true", help="smoke-sized study: one seed, few epochs, a slice of the "
                                                          "test set")
    run.add_argument("--models", help="comma-separated model names replacing every experiment's models")
    run.add_argument("--recipes", nargs="+", metavar="RECIPE",
                     help="recipes as NAME or NAME:key=value,... replacing every experiment's recipes; e.g. "
                          "sparse24 int4_weight_only:group_size=64 channel_prune:ratio=0.5")
    run.add_argument("--seed", type=int, default=None, help="run every point with this one seed (>= 0)")
    run.add_argument("--no-cache", action="store_true", help="retrain baselines instead of reusing cached ones")
    run.add_argument("--no-progress", action="store_true", help="no progress output (by default: bars on a "
                                                                "terminal, one line per point when stderr is not one)")
    run.add_argument("--executor", choices=("inprocess", "ray"), default="inprocess",
                     help="where points run: in this process (default) or as Ray tasks (pip install -e \".[ray]\"); "
                          "either way this process alone appends results.jsonl")
    run.add_argument("--address", help="with --executor ray: the cluster to join (auto, ray://HOST:10001); "
                                       "default a local Ray on this machine's cores")
    run.add_argument("--task-cpus", type=float, help="with --executor ray: CPUs per point task (default: the "
                                                     "study's threads)")
    run.add_argument("--task-gpus", type=float, help="with --executor ray: GPUs per point task (default 0)")
    run.set_defaults(func=_cmd_run)
    ev = sub.add_parser("evaluate", help="evaluate a model saved with robcomp.save on a test set under attacks; "
                                         "started by torchrun, sharded over its ranks")
    ev.add_argument("model", metavar="MODEL", help="a .safetensors file written by robcomp.save")
    ev.add_argument("--data", default="digits", help="digits (the embedded test split, default), cifar10:ROOT or "
                                                     "mnist:ROOT (the test split of local files)")
    ev.add_argument("--attacks", nargs="+", metavar="ATTACK", default=list(EVALUATE_ATTACKS),
                    help="attacks as in a study file, NAME:key=value,...: fgsm, pgd:steps=10, apgd:loss=dlr, "
                         "square:n_queries=500, preset:name=standard, ... (default: fgsm pgd:steps=10)")
    ev.add_argument("--eps", default=EVALUATE_EPS, help="radius of every attack that names no eps= (a number or a "
                                                        "fraction such as 8/255; default 0.1)")
    ev.add_argument("--batch-size", type=int, default=256, help="examples per batch (default 256); under "
                                                                "torchrun rank r takes batches b %% world_size == r")
    ev.add_argument("--limit", type=int, metavar="N", help="evaluate the first N examples only")
    ev.add_argument("--out", metavar="RECORD.json", help="write the evaluation record there (atomically; under "
                                                         "torchrun rank 0 alone)")
    ev.add_argument("--state", metavar="PATH", help="resume file, written after every batch (under torchrun one "
                                                    "per rank: state.json -> state.rank1-of-2.json)")
    ev.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cuda when available); under torchrun cpu "
                                     "(gloo) or cuda (NCCL, each rank on cuda:LOCAL_RANK)")
    ev.set_defaults(func=_cmd_evaluate)
    rep = sub.add_parser("report", help="re-render report.md, report.html and plots/ from DIR/results.jsonl")
    rep.add_argument("directory", metavar="DIR")
    rep.add_argument("--bench", nargs="+", metavar="FILE.json",
                     help="pytest-benchmark JSON to fold into the hardware efficiency section (copied to DIR/bench/)")
    rep.set_defaults(func=_cmd_report)
    env = sub.add_parser("env", help="device, versions and whether Triton kernels can run")
    env.add_argument("--json", action="store_true")
    env.set_defaults(func=_cmd_env)
    bench = sub.add_parser("bench", help="run the bench/ pytest-benchmark suites")
    bench.add_argument("--out", default="robcomp-out/bench.json", help="pytest-benchmark JSON output")
    bench.add_argument("--static", action="store_true",
                       help="instead, the static performance model (sm_90 SASS, no GPU): STATIC.md and "
                            "STATIC.json beside --out")
    bench.set_defaults(func=_cmd_bench)
    return p


def _warn_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"robcomp: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    import warnings

    parser = _parser()
    args = parser.parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _warn_one_line  # robcomp's own warnings as one line, like its errors
    try:
        return args.func(args)
    except UsageError as e:
        print(f"robcomp: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
