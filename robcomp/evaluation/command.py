"""What ``robcomp evaluate`` does once its arguments are parsed: read the test split it names, check
that the model takes it, and evaluate, in one process or, started by ``torchrun``, sharded over the
ranks (:mod:`robcomp.evaluation.distributed`). The command line (``robcomp/cli.py``) parses the
attacks and loads the model; bad input raises ``ValueError`` here, before anything is written."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from robcomp._io import write_json_atomic
from robcomp.evaluation.distributed import evaluate_distributed, init_from_env
from robcomp.evaluation.evaluate import evaluate

__all__ = ["DATA_CHOICES", "load_test_data", "under_torchrun", "torchrun_rank_world", "check_model_takes",
           "run_evaluation", "summary_line"]

DATA_CHOICES = "digits (the embedded test split), cifar10:ROOT or mnist:ROOT (the test split of local files)"


def load_test_data(spec: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split ``spec`` names (:data:`DATA_CHOICES`) as ``(x, y)``, its first ``limit`` examples."""
    from robcomp.zoo.data import CIFAR10, MNIST, load_digits_split

    name, sep, root = spec.partition(":")
    readers = {"cifar10": CIFAR10, "mnist": MNIST}
    if name == "digits" and not sep:
        x, y = load_digits_split()[2:]  # the study's split (data_seed 0)
    elif name in readers and root:
        try:
            ds = readers[name](root, train=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{spec!r}: {e}") from None
        x, y = ds.data, ds.targets
    else:
        raise ValueError(f"unknown data {spec!r}: expected {DATA_CHOICES}")
    return (x, y) if limit is None else (x[:limit], y[:limit])


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_rank_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from torchrun's environment, ``(0, 1)`` outside it."""
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if under_torchrun() else (0, 1)


def check_model_takes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward pass on the first example, so a model/data mismatch is refused before any work."""
    try:
        with torch.no_grad():
            out = model.eval()(x[:1])
    except Exception as e:  # any layer may object to the shape: report it in one line
        raise ValueError(f"the model does not take this data's inputs {tuple(x.shape[1:])}: "
                         f"{type(e).__name__}: {e}") from None
    classes = out.shape[-1] if isinstance(out, torch.Tensor) and out.ndim >= 2 else None
    if classes is not None and int(y.max()) >= classes:
        raise ValueError(f"the data has labels up to {int(y.max())}, but the model has {classes} outputs")


def run_evaluation(model: nn.Module, data: tuple, *, attacks, batch_size: int, device: str | None,
                   out: str | None, state: str | None) -> dict:
    """Evaluate with per-example outcomes; under torchrun on every rank (``device``: None, ``"cpu"``
    for gloo or ``"cuda"`` for NCCL on ``cuda:LOCAL_RANK``), else in this process. The record goes to
    ``out`` atomically (rank 0 alone under torchrun). Returns the record."""
    kwargs = dict(attacks=attacks, batch_size=batch_size)
    if not under_torchrun():
        record = evaluate(model, data, device=device, state_path=state, per_example=True, **kwargs)
        if out is not None:
            write_json_atomic(out, record, parents=True)
        return record
    import torch.distributed as dist

    init_from_env("gloo" if device == "cpu" else "nccl" if device == "cuda" else None)
    try:
        return evaluate_distributed(model, data, out=out, state_path=state,
                                    device="cpu" if device == "cpu" else None, **kwargs)
    finally:
        dist.destroy_process_group()


def summary_line(record: dict, out: str | None) -> str:
    robust = record["worst_case_robust_accuracy"]
    ranks = record.get("distributed", {}).get("world_size", 1)
    return (f"clean accuracy {record['clean_accuracy']:.4f}, robust accuracy "
            + (f"{robust:.4f} (worst case over {len(record['attacks'])} attacks)" if robust is not None
               else "n/a (no attack applicable)")
            + f" on {record['examples']} examples" + (f", {ranks} ranks" if ranks > 1 else "")
            + (f"; record: {Path(out)}" if out is not None else ""))
