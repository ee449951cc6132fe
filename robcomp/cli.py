"""``robcomp`` command line: ``run`` (the main job), ``report DIR``, ``env``, ``bench``.

Bad input ends with one ``robcomp: error: ...`` line on stderr and exit code 2, before any file
is written.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit code 2."""


def _parse_recipes(specs: list[str]):
    from robcomp.recipes import parse_recipe

    try:
        return tuple(parse_recipe(s) for s in specs)
    except ValueError as e:
        raise UsageError(f"--recipes: {e}") from None


def _cmd_run(args) -> int:
    from robcomp.study import MainJobConfig, check_output_dir, run_main_job

    overrides = {}
    if args.models:
        overrides["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.recipes:
        overrides["recipes"] = _parse_recipes(args.recipes)
    overrides["seed"] = args.seed
    overrides["use_cache"] = not args.no_cache
    try:
        cfg = MainJobConfig.quick(**overrides) if args.quick else MainJobConfig(**overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        check_output_dir(args.out)
    except PermissionError as e:
        raise UsageError(str(e)) from None
    t0 = time.perf_counter()
    run_main_job(args.out, cfg, progress=not args.no_progress)
    print(f"finished in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_report(args) -> int:
    from robcomp.report import read_records, render_markdown

    directory = Path(args.directory)
    try:
        records = read_records(directory / "results.jsonl")
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"DIR: {e}") from None
    render_markdown(records, directory / "report.md", title="robcomp report")
    print(f"wrote {directory / 'report.md'} from {len(records)} records")
    return 0


def _cmd_env(args) -> int:
    import torch

    from robcomp.env import environment, triton_status

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = environment(device)
    info["triton_kernels"] = triton_status()
    for name in ("torch_pruning", "bitsandbytes", "numba", "safetensors"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "installed")
        except Exception as e:  # an optional backend that fails to import is reported, not fatal
            info[name] = f"unavailable ({type(e).__name__})"
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key.ljust(width)}  {value}")
    return 0


def _cmd_bench(args) -> int:
    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    if not bench_dir.is_dir():
        raise UsageError(f"benchmark suites not found at {bench_dir} (run from a source checkout)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", str(bench_dir), "-q", f"--benchmark-json={out}"]
    print(" ".join(cmd))
    return subprocess.call(cmd)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robcomp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the main job: train, compress, attack and time on the embedded digits data")
    run.add_argument("--out", default="robcomp-out", help="output directory (default ./robcomp-out)")
    run.add_argument("--quick", action="store_true", help="smoke-sized run (seconds)")
    run.add_argument("--models", help="comma-separated model names (default mlp,cnn)")
    run.add_argument("--recipes", nargs="+", metavar="RECIPE",
                     help="recipes as NAME or NAME:key=value,...; e.g. sparse24 int4_weight_only:group_size=64 "
                          "channel_prune:ratio=0.5")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-cache", action="store_true", help="retrain baselines instead of reusing cached ones")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(func=_cmd_run)
    rep = sub.add_parser("report", help="re-render report.md from DIR/results.jsonl")
    rep.add_argument("directory", metavar="DIR")
    rep.set_defaults(func=_cmd_report)
    env = sub.add_parser("env", help="device, versions and whether Triton kernels can run")
    env.add_argument("--json", action="store_true")
    env.set_defaults(func=_cmd_env)
    bench = sub.add_parser("bench", help="run the bench/ pytest-benchmark suites")
    bench.add_argument("--out", default="robcomp-out/bench.json", help="pytest-benchmark JSON output")
    bench.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"robcomp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
