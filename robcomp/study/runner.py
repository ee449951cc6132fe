"""The study: sweeps over models x widths x recipes x training regimes x seeds, resumable.

``run_study(spec, out)`` expands a :class:`~robcomp.study.spec.StudySpec` into points, runs every
point that ``out/results.jsonl`` does not already hold (a point is keyed by the hash of its
configuration), appends one record per point atomically, then renders ``report.md``,
``report.html`` and the PNG plots from the results file alone (``robcomp.report.render``).

A crash or a kill loses at most the point in progress: rerunning the same spec skips the finished
points and gives the same accuracies as an uninterrupted run (training and attacks are seeded
and deterministic on CPU; timings are measurements and differ run to run).

Trained baselines and fine-tuned models are cached (``robcomp.study.checkpoints``), keyed by everything that
determines their weights, so a second run into a fresh directory only compresses and evaluates.
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from robcomp._version import __version__
from robcomp.study.checkpoints import cached_state
from robcomp.compression.compress import compress
from robcomp.layers.sizes import count_nonzero_parameters, model_bytes
from robcomp.zoo.data import DIGITS, load_digits_split
from robcomp.evaluation.evaluate import evaluate
from robcomp._io import DirectoryLock
from robcomp.zoo.models import build_model
from robcomp.study.progress import progress_mode, study_progress
from robcomp.recipes import recipe_from_dict
from robcomp.report.results import STUDY_RECORD, append_record
from robcomp.study.spec import Point, StudySpec, default_spec, make_attacks
from robcomp.training.train import TrainConfig, train

__all__ = ["run_study", "check_output_dir", "check_same_study", "layer_times"]

def check_output_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and prove it is writable, before any work is done."""
    if not str(out).strip():
        raise ValueError("--out is empty: name an output directory (the current directory is not used implicitly)")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PermissionError(f"--out {str(out)!r} is not a writable directory: {e.strerror or e}") from None
    return out


@torch.no_grad()
def layer_times(model: nn.Module, input_shape, batch_size: int, repeats: int = 10) -> dict:
    """Per-layer share of the forward time: which module type (and backend) each Linear/Conv layer
    ran with, its milliseconds and its share of the forward pass.

    Layers and the whole pass are timed in the same hooked passes, and the reported pass is the
    one with the median total, so the shares of disjoint layers add up to at most 100%
    (``total_ms``: that hooked pass; ``unhooked_ms``: median of plain passes, for reference)."""
    from robcomp.layers.linear import CompressedLinear

    model.eval()
    x = torch.rand((batch_size, *input_shape), generator=torch.Generator().manual_seed(0))
    cuda = x.is_cuda

    def sync():
        if cuda:
            torch.cuda.synchronize()

    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d, CompressedLinear)) and ".parametrizations" not in f".{n}"}
    # a layer inside another timed layer would be counted twice
    layers = {n: m for n, m in layers.items() if not any(n.startswith(o + ".") for o in layers if o != n)}
    run: dict[str, float] = {}
    starts: dict[str, float] = {}
    handles = []
    for n, m in layers.items():
        def pre(mod, inp, n=n):
            sync()
            starts[n] = time.perf_counter()

        def post(mod, inp, out, n=n):
            sync()
            run[n] = run.get(n, 0.0) + (time.perf_counter() - starts[n]) * 1e3
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    passes = []
    try:
        model(x)  # warm-up
        for _ in range(repeats):
            run.clear()
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            passes.append(((time.perf_counter() - t0) * 1e3, dict(run)))
    finally:
        for h in handles:
            h.remove()
    plain = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model(x)
        sync()
        plain.append((time.perf_counter() - t0) * 1e3)
    total, per_layer = sorted(passes, key=lambda p: p[0])[len(passes) // 2]
    out = {}
    for n, m in layers.items():
        if n not in per_layer:
            continue
        ms = per_layer[n]
        kind = type(m).__name__.replace("Parametrized", "")
        if isinstance(m, CompressedLinear):
            kind += f" ({m.backend})"
        elif type(m).__name__.startswith("Parametrized"):
            kind += " (dense, masked)"
        out[n] = {"module": kind, "ms": ms, "share": ms / total if total > 0 else None}
    return {"batch_size": batch_size, "total_ms": total, "unhooked_ms": sorted(plain)[len(plain) // 2],
            "layers": out}


class _Context:
    """What the points of one run share: data, attacks, trained baselines."""

    def __init__(self, spec: StudySpec, use_cache: bool, progress: bool):
        self.spec, self.use_cache, self.progress = spec, use_cache, progress
        x, y, xt, yt = load_digits_split(seed=spec.data_seed)
        if spec.test_examples:
            xt, yt = xt[:spec.test_examples], yt[:spec.test_examples]
        self.x, self.y, self.x_test, self.y_test = x, y, xt, yt
        self.bases: dict[tuple, tuple[nn.Module, dict]] = {}
        self.baselines_trained = 0
        self.baselines_cached = 0

    def baseline(self, p: Point) -> tuple[nn.Module, dict]:
        key = (p.model, p.width, p.base, p.seed, str(sorted(p.train.items())))
        if key not in self.bases:
            tcfg = TrainConfig(**p.train)
            torch.manual_seed(p.seed)
            model = build_model(p.model, p.width, input_shape=DIGITS.input_shape, num_classes=DIGITS.num_classes)
            ckey = {"kind": "baseline", "model": p.model, "width": p.width, "train": tcfg.to_dict(),
                    "data": "digits", "data_seed": p.data["seed"], "robcomp": __version__,
                    "torch": torch.__version__.split("+")[0]}
            t0 = time.perf_counter()
            model, hit = cached_state(model, ckey, lambda m: train(
                m, self.x, self.y, tcfg, desc=f"train {p.model}-{p.width or 'default'} ({p.base}, seed {p.seed})",
                progress=self.progress), enabled=self.use_cache)
            if hit:
                self.baselines_cached += 1
            else:
                self.baselines_trained += 1
            info = {"cache_key": ckey, "cached": hit, "time_s": time.perf_counter() - t0,
                    "bytes": model_bytes(model), "nonzero": count_nonzero_parameters(model)["nonzero_parameters"]}
            self.bases[key] = (model, info)
        return self.bases[key]

    def variant(self, base: nn.Module, base_info: dict, p: Point) -> tuple[nn.Module, dict]:
        """Compress a copy of ``base`` with the point's recipe and fine-tune it per its regime."""
        recipe = recipe_from_dict(p.recipe)
        example = self.x[:64]
        t0 = time.perf_counter()
        structure = compress(copy.deepcopy(base), recipe, example_inputs=example)
        summary = structure.compression_summary
        if p.regime == "post":
            return structure, {"method": None, "cached": None, "time_s": time.perf_counter() - t0}
        ft = TrainConfig(**p.finetune)
        base_key = {"kind": "finetune", "base": base_info["cache_key"], "recipe": recipe.to_dict(),
                    "finetune": ft.to_dict(), "robcomp": __version__}
        method = "pgd" if ft.adversarial else "clean"
        from robcomp.training.adversarial import compression_aware_finetune, supports_compression_aware

        if supports_compression_aware(recipe):
            # train towards the recipe (masks / fake quantisation), then pack; other recipes are
            # compressed first and then trained
            def fit_aware(m):
                return compression_aware_finetune(copy.deepcopy(base), recipe, self.x, self.y, ft, method=method)
            model, hit = cached_state(copy.deepcopy(structure), {**base_key, "method": "compression_aware"},
                                      fit_aware, enabled=self.use_cache)
            model.compression_summary = summary
            return model, {"method": "compression_aware", "cached": hit, "time_s": time.perf_counter() - t0,
                           "config": ft.to_dict()}

        def fit(m):
            return train(m, self.x, self.y, ft, desc=f"fine-tune {recipe.label()} ({p.regime})", progress=self.progress)

        model, hit = cached_state(structure, {**base_key, "method": "compress_then_train"}, fit,
                                  enabled=self.use_cache)
        model.compression_summary = summary
        return model, {"method": "compress_then_train", "cached": hit, "time_s": time.perf_counter() - t0,
                       "config": ft.to_dict()}


def _record_for(p: Point, ctx: _Context) -> dict:
    base, base_info = ctx.baseline(p)
    label = p.recipe_label
    common = {
        "point_id": p.id, "point": p.config, "experiment": p.experiment, "kind": p.kind, "role": p.role,
        "model_name": p.model, "width": p.width, "base": p.base, "regime": p.regime, "seed": p.seed,
        "recipe": label, "recipe_name": p.recipe["name"] if p.recipe else "dense", "recipe_config": p.recipe,
        "family": ctx.spec.family(p.recipe["name"]) if p.recipe else "dense",
        "training": p.base, "dense_bytes": base_info["bytes"], "dense_nonzero": base_info["nonzero"],
        "baseline": {"cached": base_info["cached"], "time_s": base_info["time_s"]},
    }
    if p.recipe is None:
        model, ft_info = base, None
    else:
        try:
            model, ft_info = ctx.variant(base, base_info, p)
        except (ValueError, NotImplementedError) as e:
            # the recipe cannot take this model here (e.g. no layer it applies to): a finished point.
            # A TypeError is a bug, not a property of the point: it propagates
            return {**common, "status": "skipped", "reason": f"{type(e).__name__}: {e}"}
    t0 = time.perf_counter()
    record = evaluate(model, (ctx.x_test, ctx.y_test), attacks=make_attacks(p.attacks), batch_sizes=p.batch_sizes,
                      latency_repeats=p.latency_repeats, name=f"{p.model}-{p.width or 'default'}/{p.base}/{label}/"
                      f"{p.regime}/seed{p.seed}", seed=p.seed, sanity=p.sanity)
    eval_s = time.perf_counter() - t0
    nonzero = count_nonzero_parameters(model)["nonzero_parameters"]
    record.update(common)
    record.update({
        "status": "ok", "finetune": ft_info, "effective_nonzero": nonzero,
        "bytes_ratio": base_info["bytes"] / record["model_bytes"],
        "nonzero_ratio": base_info["nonzero"] / max(nonzero, 1),
        "evaluate_time_s": eval_s,
        "io_elements": [int(ctx.x_test[0].numel()), int(DIGITS.num_classes)],
        "compression_summary": getattr(model, "compression_summary", None) and model.compression_summary.to_dict(),
    })
    record["compression_ratio"] = max(record["bytes_ratio"], record["nonzero_ratio"])
    if p.layer_timing:
        in_shape = tuple(ctx.x_test.shape[1:])
        record["layer_timing"] = {str(b): layer_times(model, in_shape, b) for b in p.batch_sizes}
    return record


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _read_existing(path: Path) -> list[dict]:
    from robcomp.report.results import read_records

    if not path.exists():
        return []
    return read_records(path, tolerate_partial_last_line=True)


def check_same_study(results_path: Path, existing: list[dict], spec: StudySpec) -> None:
    """Refuse to mix two studies in one results file (the report would show both)."""
    headers = [r for r in existing if r.get("type") == STUDY_RECORD]
    if headers and headers[-1].get("spec") != spec.to_dict():
        other = headers[-1].get("spec", {}).get("name", "?")
        raise ValueError(f"{results_path} holds the results of another study ({other!r}, spec "
                         f"{headers[-1].get('spec_hash')}); this run is {spec.name!r} (spec {spec.spec_hash()}): "
                         "pass another --out, or delete that file to start over")


def run_study(spec: StudySpec | str | os.PathLike | None = None, out: str | os.PathLike = "robcomp-out", *,
              progress: bool = True,
              echo=print, use_cache: bool = True, max_points: int | None = None, render: bool = True,
              executor=None) -> list[dict]:
    """Run ``spec`` (a :class:`StudySpec`, a path to a TOML study file, or None for the shipped
    default study) into ``out``; return the records of its points.

    Points already in ``out/results.jsonl`` are skipped. ``out`` is locked while the run lasts
    (:class:`~robcomp._io.DirectoryBusyError` when another run holds it), and a results file of
    another study is refused (ValueError). ``max_points`` stops after running that
    many new points (for tests of resumption); ``render=False`` skips the report. ``progress``
    shows a bar on a terminal and one plain line per point on stderr otherwise. ``executor``:
    None runs the points in this process; a :class:`~robcomp.study.ray_executor.RayExecutor` runs them
    as Ray tasks (this process still appends every record).
    """
    if spec is None:
        spec = default_spec()
    elif isinstance(spec, (str, os.PathLike)):
        from robcomp.study.spec import load_spec

        spec = load_spec(spec)
    if not isinstance(spec, StudySpec):
        raise TypeError(f"spec must be a StudySpec, got {type(spec).__name__}")
    out = check_output_dir(out)
    with DirectoryLock(out):  # a second run into `out` refuses instead of duplicating points
        return _run_locked(spec, out, progress=progress, echo=echo, use_cache=use_cache, max_points=max_points,
                           render=render, executor=executor)


def _in_process(points, ctx: _Context, bar):
    for p in points:
        bar.set_postfix_str(f"{p.experiment}/{p.recipe_label}/{p.regime}/s{p.seed}")
        yield p, _record_for(p, ctx)


def _kernel_sweep(spec: StudySpec, existing: list[dict], results_path: Path, mode: str, n_points: int) -> None:
    """Measure the spec's kernel sweep once per results file (after the points, with the study's
    threads), unless it is disabled or already recorded."""
    from robcomp.evaluation.kernel_sweep import KERNEL_SWEEP_RECORD, run_kernel_sweep

    ks = spec.kernel_sweep
    if not ks.get("enabled") or any(r.get("type") == KERNEL_SWEEP_RECORD for r in existing):
        return
    if mode != "off":
        import sys

        print(f"robcomp study [{n_points}/{n_points}] kernel sweep: sizes {ks['sizes']} x batches {ks['batches']}",
              file=sys.stderr, flush=True)
    append_record(results_path, run_kernel_sweep(ks["sizes"], ks["batches"], budget_s=ks["budget_s"]))


def _run_locked(spec: StudySpec, out: Path, *, progress, echo, use_cache, max_points, render,
                executor=None) -> list[dict]:
    results_path = out / "results.jsonl"
    existing = _read_existing(results_path)
    check_same_study(results_path, existing, spec)
    done = {r["point_id"] for r in existing if "point_id" in r}
    if not any(r.get("type") == STUDY_RECORD for r in existing):
        append_record(results_path, {"type": STUDY_RECORD, "spec": spec.to_dict(), "spec_hash": spec.spec_hash()})
    points = spec.points()
    todo = [p for p in points if p.id not in done]
    t_start = time.perf_counter()
    with _threads(spec.threads):
        mode = progress_mode(progress)
        # nested training bars only on a terminal; a log gets one line per point
        ctx = _Context(spec, use_cache, mode == "bar")
        bar = study_progress(len(points), len(points) - len(todo), "robcomp study", mode)
        run = todo[:max_points] if max_points is not None else todo
        finished = _in_process(run, ctx, bar) if executor is None else executor.run(spec, run, use_cache)
        for p, record in finished:
            append_record(results_path, record)  # by this process only, whatever ran the point
            bar.update(1)
        bar.close()
        ran = min(len(todo), max_points) if max_points is not None else len(todo)
        if ran == len(todo):
            _kernel_sweep(spec, existing, results_path, mode, len(points))
    records = _read_existing(results_path)
    ids = {p.id for p in points}
    mine = [r for r in records if r.get("point_id") in ids]
    if render:
        from robcomp.report.render import render_report, summary_text

        paths = render_report(out, records)
        echo(summary_text(records))
        echo(f"\n{ran} points run, {len(points) - len(todo)} already in {results_path} "
             f"({len(points)} in the study); "
             + (f"baselines: {ctx.baselines_trained} trained, {ctx.baselines_cached} from cache"
                if executor is None else executor.describe()) + f"; {time.perf_counter() - t_start:.1f} s")
        echo("wrote " + ", ".join(str(p) for p in paths))
    return mine
