"""Evaluation sharded over a ``torch.distributed`` process group (``torchrun``; gloo on CPU, NCCL on GPUs).

``evaluate_distributed(model, data, ...)`` is :func:`robcomp.evaluation.evaluate.evaluate` run by every rank
of an initialised process group: rank ``r`` evaluates batches ``b % world_size == r`` on its own
device (``cuda:LOCAL_RANK`` under NCCL), the per-example outcomes are all-gathered as tensors, the
shard records (counts, attack times, flags) with ``all_gather_object``, and every rank returns the
same merged record; rank 0 alone writes it (``out=``, atomically). Attacks draw their random
numbers by example index, so the accuracies and per-example outcomes equal a single-process run's.

Resume is per rank: ``state_path=`` names one file per rank (:func:`shard_state_path`), so a
killed rank restarted with the same arguments redoes at most its batch in progress.

Latency, memory and energy are measured by rank 0 alone, after every rank has finished its shard
(the others wait in a barrier), so the figures are not polluted by the other ranks' attacks.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from robcomp.evaluation.evaluate import _as_batches, _write_json_atomic, evaluate, merge_records

__all__ = ["evaluate_distributed", "init_from_env", "local_device", "shard_state_path"]

_OUTCOMES = ("index", "clean", "worst")
_MEASURED = ("latency", "peak_memory", "energy")


def init_from_env(backend: str | None = None, **kwargs) -> str:
    """Initialise the default process group from torchrun's environment variables (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL when CUDA is available, gloo otherwise.
    Returns the backend. ``kwargs`` go to :func:`torch.distributed.init_process_group`."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"init_from_env: {', '.join(missing)} not set: start the script with torchrun "
                           "(or call torch.distributed.init_process_group yourself)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, **kwargs)
    return backend


def local_device(group=None) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def shard_state_path(state_path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The resume file of one rank: ``state.json`` -> ``state.rank1-of-2.json``."""
    p = Path(state_path)
    return p.with_name(f"{p.stem}.rank{rank}-of-{world_size}{p.suffix or '.json'}")


def _gather_outcomes(per_example: dict, group, comm_device) -> dict:
    """All-gather every rank's (index, clean, worst) rows; padded to the longest shard."""
    rows = torch.tensor([list(r) for r in zip(*(per_example[k] for k in _OUTCOMES))], dtype=torch.int64,
                        device=comm_device).reshape(-1, len(_OUTCOMES))
    world = dist.get_world_size(group)
    size = torch.tensor([len(rows)], dtype=torch.int64, device=comm_device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest, len(_OUTCOMES)), -1, dtype=torch.int64, device=comm_device)
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    joined = torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)]).cpu()
    joined = joined[joined[:, 0].argsort()]
    if not torch.equal(joined[:, 0], torch.arange(len(joined))):
        raise RuntimeError("evaluate_distributed: the ranks' shards do not cover the examples exactly once "
                           "(does every rank see the same data in the same order?)")
    return {k: joined[:, i].tolist() for i, k in enumerate(_OUTCOMES)}


def _batch_count(data, batch_size: int) -> int | None:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return -(-len(data[0]) // batch_size)
    try:
        return len(data)
    except TypeError:  # an iterable dataset: unknown until iterated
        return None


def evaluate_distributed(model, data, *, out: str | os.PathLike | None = None,
                         state_path: str | os.PathLike | None = None, device=None, group=None,
                         measure: bool = True, **kwargs) -> dict:
    """:func:`~robcomp.evaluation.evaluate.evaluate` sharded over the initialised process group ``group``
    (default: the default group). Call it on every rank with the same model, data and arguments.

    ``device``: default :func:`local_device`. ``out``: rank 0 writes the merged record there
    (JSON, atomically). ``state_path``: per-rank resume files (:func:`shard_state_path`).
    ``measure``: latency/memory/energy, measured on rank 0 after all shards are done.
    Other keyword arguments are :func:`evaluate`'s (not ``rank``, ``world_size``, ``per_example``).
    Returns the merged record (the same on every rank), with ``per_example`` outcomes and a
    ``distributed`` section saying how it was produced.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("evaluate_distributed needs an initialised process group: call "
                           "torch.distributed.init_process_group (or robcomp.evaluation.distributed.init_from_env()) first")
    taken = sorted({"rank", "world_size", "per_example"} & set(kwargs))
    if taken:
        raise TypeError(f"evaluate_distributed sets {', '.join(taken)} itself: do not pass them")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    backend = dist.get_backend(group)
    device = torch.device(device) if device is not None else local_device(group)
    if backend == "nccl" and device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    batches = _batch_count(data, kwargs.get("batch_size", 256))
    if batches is not None and batches < world:
        # checked on every rank alike: one rank failing alone would leave the others in a collective
        raise ValueError(f"data has {batches} batches for {world} ranks: every rank needs at least one "
                         "(a smaller batch_size or fewer processes)")
    t0 = time.perf_counter()
    shard = evaluate(model, data, rank=rank, world_size=world, device=device, measure=False, per_example=True,
                     state_path=None if state_path is None else shard_state_path(state_path, rank, world), **kwargs)
    shard_s = time.perf_counter() - t0
    outcomes = _gather_outcomes(shard.pop("per_example"), group, comm_device)
    shards = [None] * world
    dist.all_gather_object(shards, {**shard, "_shard_s": shard_s}, group=group)  # a barrier too
    merged = merge_records(shards)
    merged.pop("_shard_s", None)
    merged["per_example"] = outcomes
    if sum(outcomes["clean"]) != merged["counts"]["clean_correct"] or \
            sum(outcomes["worst"]) != merged["counts"]["worst_correct"]:
        raise RuntimeError("evaluate_distributed: gathered per-example outcomes disagree with the shard counts")
    if rank == 0 and measure:
        # every shard is done: rank 0 measures alone (one clean pass over one example, no attack)
        _, _, x, y = next(_as_batches(data, kwargs.get("batch_size", 256)))
        timing = evaluate(model, (x[:1], y[:1]), device=device, sanity=False, measure=True,
                          **{k: kwargs[k] for k in ("batch_sizes", "latency_repeats", "output_fn") if k in kwargs})
        merged.update({k: timing[k] for k in _MEASURED if k in timing})
    merged["distributed"] = {
        "backend": backend, "world_size": world, "devices": "cuda:LOCAL_RANK" if backend == "nccl" else "cpu",
        "measured_on": f"rank 0 ({device}), after every shard finished" if measure else None,
        "attack_time_s": "summed over ranks", "shard_wall_s": [s["_shard_s"] for s in shards],
    }
    if rank == 0 and out is not None:
        _write_json_atomic(Path(out), merged)
    box = [merged if rank == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]
