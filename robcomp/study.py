"""The main job: train dense baselines on the embedded digits data (standard and adversarial),
compress each with every recipe, fine-tune where the recipe needs it, evaluate all of them, and
write ``results.jsonl`` and ``report.md``.

Trained baselines and fine-tuned pruned models are cached (``robcomp.cache``), so a second run
only evaluates.
"""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from robcomp import __version__
from robcomp.attacks import FGSM, PGD
from robcomp.cache import cached_state
from robcomp.compress import compress, model_bytes
from robcomp.data import DIGITS, load_digits_split
from robcomp.evaluate import evaluate
from robcomp.models import MODELS, build_model
from robcomp.recipes import ChannelPrune, Int4WeightOnly, Int8WeightOnly, Recipe, Sparse24
from robcomp.report.markdown import format_table, render_markdown, summary_rows
from robcomp.report.results import append_record, write_text_atomic
from robcomp.train import TrainConfig, train

__all__ = ["MainJobConfig", "run_main_job", "check_output_dir", "DEFAULT_RECIPES"]

DEFAULT_RECIPES: tuple[Recipe, ...] = (
    Sparse24(), Int8WeightOnly(), Int4WeightOnly(group_size=32),
    ChannelPrune(ratio=0.25), ChannelPrune(ratio=0.5), ChannelPrune(ratio=0.75),
)


@dataclass
class MainJobConfig:
    models: Sequence[str] = ("mlp", "cnn")
    recipes: Sequence[Recipe] = DEFAULT_RECIPES
    epsilons: Sequence[float] = (0.05, 0.1)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, eps=0.1, pgd_steps=5))
    finetune_epochs: int = 8
    pgd_steps: int = 10
    batch_sizes: Sequence[int] = (1, 256)
    test_examples: int | None = None  # None: the whole test split
    latency_repeats: int = 30
    seed: int = 0
    use_cache: bool = True

    @classmethod
    def quick(cls, **overrides) -> "MainJobConfig":
        """Smoke-sized: one small model, few epochs, a slice of the test set."""
        base = dict(models=("mlp",), train=TrainConfig(epochs=3, eps=0.1, pgd_steps=2), finetune_epochs=1,
                    pgd_steps=3, batch_sizes=(1, 64), test_examples=96, latency_repeats=5,
                    recipes=(Sparse24(), Int8WeightOnly(), Int4WeightOnly(group_size=32), ChannelPrune(ratio=0.5)))
        base.update(overrides)
        return cls(**base)

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise ValueError(f"models: unknown {unknown}; known: {', '.join(MODELS)}")
        if not self.recipes:
            raise ValueError("recipes: give at least one recipe")


def check_output_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and prove it is writable, before any work is done."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"--out {str(out)!r} is not a writable directory: {e.strerror or e}") from None
    return out


def _baseline(name: str, regime: str, cfg: MainJobConfig, x, y, progress: bool) -> tuple[torch.nn.Module, bool]:
    tcfg = cfg.train.scaled(adversarial=regime == "adversarial", seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(name, input_shape=DIGITS.input_shape, num_classes=DIGITS.num_classes)
    key = {"kind": "baseline", "model": name, "train": tcfg.to_dict(), "data": "digits", "data_seed": cfg.seed,
           "robcomp": __version__, "torch": torch.__version__.split("+")[0]}
    return cached_state(model, key, lambda m: train(m, x, y, tcfg, desc=f"train {name} ({regime})",
                                                    progress=progress), enabled=cfg.use_cache)


def _compressed(base, name: str, regime: str, recipe: Recipe, cfg: MainJobConfig, x, y, progress: bool):
    """Compress a copy of ``base``; pruned models are fine-tuned the way the baseline was trained."""
    model = compress(copy.deepcopy(base), recipe, example_inputs=x[:64])
    if not isinstance(recipe, ChannelPrune):
        return model, None
    ft = cfg.train.scaled(epochs=cfg.finetune_epochs, lr=cfg.train.lr / 3, adversarial=regime == "adversarial",
                          seed=cfg.seed + 1)
    key = {"kind": "finetuned", "model": name, "regime": regime, "recipe": recipe.to_dict(),
           "base_train": cfg.train.to_dict(), "finetune": ft.to_dict(), "data_seed": cfg.seed,
           "robcomp": __version__, "torch": torch.__version__.split("+")[0]}
    summary = model.compression_summary
    # the pruned architecture is rebuilt deterministically, so cached weights load into it
    model, _ = cached_state(model, key, lambda m: train(m, x, y, ft, desc=f"fine-tune {recipe.label()}",
                                                        progress=progress), enabled=cfg.use_cache)
    model.compression_summary = summary
    return model, ft.to_dict()


def run_main_job(out: str | os.PathLike = "robcomp-out", cfg: MainJobConfig | None = None, *,
                 progress: bool = True, echo=print) -> list[dict]:
    """Run the main job into ``out``; return the records (also in ``out/results.jsonl``)."""
    cfg = cfg or MainJobConfig()
    out = check_output_dir(out)
    x_train, y_train, x_test, y_test = load_digits_split(seed=cfg.seed)
    if cfg.test_examples is not None:
        x_test, y_test = x_test[:cfg.test_examples], y_test[:cfg.test_examples]
    attacks = [a for eps in cfg.epsilons for a in (FGSM(eps), PGD(eps, steps=cfg.pgd_steps, seed=cfg.seed))]
    results_path = out / "results.jsonl"
    write_text_atomic(results_path, "")  # a run starts a fresh results file
    records, cache_hits = [], 0
    jobs = [(m, regime) for m in cfg.models for regime in ("standard", "adversarial")]
    bar = tqdm(total=len(jobs) * (1 + len(cfg.recipes)), desc="robcomp run", disable=not progress)
    for name, regime in jobs:
        base, hit = _baseline(name, regime, cfg, x_train, y_train, progress)
        cache_hits += hit
        dense_bytes = model_bytes(base)
        variants = [("dense", base, None, None)]
        variants += [(r.label(), *_compressed(base, name, regime, r, cfg, x_train, y_train, progress), r)
                     for r in cfg.recipes]
        for label, model, finetune, recipe in variants:
            bar.set_postfix_str(f"{name}/{regime}/{label}")
            record = evaluate(model, (x_test, y_test), attacks=attacks, batch_sizes=cfg.batch_sizes,
                              latency_repeats=cfg.latency_repeats, name=f"{name}/{regime}/{label}")
            record.update({
                "model_name": name, "training": regime, "recipe": label,
                "recipe_config": None if recipe is None else recipe.to_dict(),
                "finetune": finetune, "compression_ratio": dense_bytes / record["model_bytes"],
                "compression_summary": getattr(model, "compression_summary", None) and
                model.compression_summary.to_dict(),
            })
            append_record(results_path, record)
            records.append(record)
            bar.update(1)
    bar.close()
    notes = [f"Data: scikit-learn digits, {len(x_train)} train / {len(x_test)} test images (8x8, seed {cfg.seed}).",
             f"Attacks: FGSM and PGD-{cfg.pgd_steps} (L-inf, random start) at eps {', '.join(map(str, cfg.epsilons))}.",
             f"Adversarial training: PGD-{cfg.train.pgd_steps} at eps {cfg.train.eps}; channel-pruned models are "
             f"fine-tuned {cfg.finetune_epochs} epochs in their baseline's regime; other recipes are post-training.",
             f"Baselines reused from the cache: {cache_hits} of {len(jobs)}."]
    render_markdown(records, out / "report.md", title="robcomp main job", notes=notes)
    head, rows = summary_rows(records)
    echo(format_table(head, rows))
    echo(f"\nwrote {results_path} and {out / 'report.md'} ({cache_hits}/{len(jobs)} baselines from cache)")
    return records
