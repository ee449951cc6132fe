"""``robcomp`` command line: ``run`` (the main job: a study), ``report DIR``, ``env``, ``bench``.

Bad input ends with one ``robcomp: error: ...`` line on stderr and exit code 2, before any file
is written. Only argparse and the standard library are imported before a command runs, so
``--help``, ``--version`` and argument errors return without importing torch.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


DESCRIPTION = ("robcomp: compress neural networks with real kernels and measure accuracy, adversarial "
               "robustness and speed in one run. Commands: run (the main job: a study), report DIR, env, bench.")
DEFAULT_OUT, QUICK_OUT = "robcomp-out", "robcomp-out-quick"


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
