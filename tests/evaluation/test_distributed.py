"""Evaluation sharded over torch.distributed (gloo, 2 CPU processes): the merged record equals the
single-process one example by example, and a killed rank resumes without redoing its batches."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from robcomp.attacks import APGD, FGSM, PGD, Ensemble, Square
from robcomp.evaluation.distributed import evaluate_distributed, shard_state_path
from robcomp.evaluation.evaluate import evaluate

BATCH = 4
N = 37  # 10 batches, the last one short: rank 0 gets batches 0,2,..,8, rank 1 gets 1,3,..,9
CRASH_BATCH = 5  # rank 1 dies while loading its third batch, after batches 1 and 3 are checkpointed
ACCURACY_KEYS = ("examples", "clean_accuracy", "robust_accuracy", "robust_accuracy_by_eps",
                 "worst_case_robust_accuracy", "counts", "per_example", "not_applicable")


def _problem():
    """A tiny classifier that the attacks partly break, on fresh random inputs (same in every process)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.rand(N, 1, 4, 4, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))
    with torch.no_grad():
        y = model(x).argmax(-1)
        y[::5] = (y[::5] + 1) % 3  # some clean mistakes, so clean and worst-case outcomes differ
    attacks = [FGSM(eps=0.1), PGD(eps=0.06, steps=3),  # PGD: keyed random start
               Ensemble([APGD(eps=0.04, steps=3), Square(eps=0.04, n_queries=8)], name="mini-aa")]
    return model, x, y, attacks


def _kwargs(attacks):
    return dict(attacks=attacks, batch_size=BATCH, seed=7, sanity=False, batch_sizes=(1, 2), latency_repeats=2)


class _DiesAt(torch.utils.data.Dataset):
    """Kills its process (no cleanup, like SIGKILL) when the batch ``batch`` is loaded."""

    def __init__(self, x, y, batch):
        self.x, self.y, self.batch = x, y, batch

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.batch * BATCH:
            os._exit(3)
        return self.x[i], self.y[i]


def _worker(rank, world, init_file, out, state, phase):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, x, y, attacks = _problem()
        data = (x, y)
        if phase == "crash" and rank == 1:
            data = torch.utils.data.DataLoader(_DiesAt(x, y, CRASH_BATCH), batch_size=BATCH)
        if phase == "resume" and rank == 1:
            done = [x[b * BATCH:(b + 1) * BATCH] for b in (1, 3)]

            def no_redo(module, inputs):  # FGSM's clean forward on a checkpointed batch would match
                if any(inputs[0].shape == d.shape and torch.equal(inputs[0], d) for d in done):
                    raise AssertionError("a checkpointed batch was evaluated again")
            model[0].register_forward_pre_hook(no_redo)
        evaluate_distributed(model, data, out=out, state_path=state, **_kwargs(attacks))
    finally:
        dist.destroy_process_group()


def _too_few_batches(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, x, y, attacks = _problem()
        with pytest.raises(ValueError, match="1 batches for 2 ranks"):
            evaluate_distributed(model, (x[:3], y[:3]), batch_size=BATCH)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, phase, out, state):
    init = tmp_path / f"rendezvous-{phase}"
    mp.start_processes(_worker, args=(2, str(init), str(out), str(state), phase), nprocs=2, join=True,
                       start_method="spawn")


def _same_results(merged, single):
    for key in ACCURACY_KEYS:
        assert merged[key] == single[key], key
    for name, ens in single["ensembles"].items():
        for m, s in zip(merged["ensembles"][name]["members"], ens["members"]):
            assert {k: m[k] for k in ("attacked", "fooled", "robust", "robust_accuracy_after")} == \
                {k: s[k] for k in ("attacked", "fooled", "robust", "robust_accuracy_after")}, m["name"]


def test_two_gloo_ranks_match_one_process_and_a_killed_rank_resumes(tmp_path):
    model, x, y, attacks = _problem()
    single = evaluate(model, (x, y), per_example=True, **_kwargs(attacks))
    assert single["per_example"]["index"] == list(range(N))
    # the problem is not degenerate: clean mistakes and attack successes both occur
    assert 0 < sum(single["per_example"]["worst"]) < sum(single["per_example"]["clean"]) < N

    out, state = tmp_path / "record.json", tmp_path / "state.json"
    with pytest.raises(mp.ProcessExitedException):
        _spawn(tmp_path, "crash", out, state)
    assert not out.exists()  # no record from a failed run
    saved = json.loads(shard_state_path(state, 1, 2).read_text())["counts"]
    assert saved["done_batches"] == [1, 3] and saved["per_example"]["index"] == list(range(4, 8)) + list(range(12, 16))

    _spawn(tmp_path, "resume", out, state)
    merged = json.loads(out.read_text())
    _same_results(merged, single)
    assert merged["distributed"]["world_size"] == 2 and merged["distributed"]["backend"] == "gloo"
    assert set(merged["latency"]) == {"1", "2"}  # measured, on rank 0 only
    assert [s["rank"] for s in merged["shard"]["merged"]] == [0, 1]


def test_without_a_process_group_the_error_says_what_to_do():
    model, x, y, attacks = _problem()
    with pytest.raises(RuntimeError, match="init_process_group"):
        evaluate_distributed(model, (x, y))


def test_data_with_fewer_batches_than_ranks_is_refused_on_every_rank(tmp_path):
    mp.start_processes(_too_few_batches, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True,
                       start_method="spawn")
