"""The evaluation loop: record fields, determinism, resume after a crash, sharding, twin mode,
straight-through reporting, MAC counts."""
import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn

import robcomp
from robcomp.attacks import FGSM, PGD, APGD, Square, preset
from robcomp.compression.compress import compress
from robcomp.evaluation.evaluate import evaluate, merge_records
from records import strip


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def attacks():
    return [FGSM(0.1), PGD(0.1, 5, seed=3), APGD(0.1, "ce", 6), Square(0.1, 30), preset("quick", 0.05, steps=5)]


def test_record_fields_and_backward_compatible_call(mlp, digits):
    x, y = digits[2][:200], digits[3][:200]
    record = evaluate(mlp, (x, y), attacks=[FGSM(0.1), PGD(0.1, steps=5, seed=0)], batch_sizes=(1, 16),
                      latency_repeats=3)
    json.dumps(record)  # JSON-serialisable
    for key in ("clean_accuracy", "robust_accuracy", "worst_case_robust_accuracy", "robust_accuracy_by_eps",
                "attack_time_s", "latency", "peak_memory", "energy", "model_bytes", "parameters",
                "nonzero_parameters", "macs", "input_gradients", "straight_through", "sanity", "sanity_flags",
                "env", "seed", "dtype"):
        assert key in record, key
    assert set(record["robust_accuracy"]) == {"FGSM Linf eps=0.1", "PGD-5 Linf eps=0.1"}
    assert set(record["latency"]) == {"1", "16"}
    for batch, lat in record["latency"].items():  # percentiles: test_latency_percentiles_of_known_times
        assert lat["repeats"] == 3 and lat["throughput_per_s"] == pytest.approx(int(batch) / (lat["median_ms"] / 1e3))
    assert record["worst_case_robust_accuracy"] <= min(record["robust_accuracy"].values()) <= record["clean_accuracy"]
    assert record["energy"]["joules_per_sample"] is None and "omitted" in record["energy"]
    assert "method" in record["peak_memory"]
    assert record["macs"]["macs"] == 64 * 64 + 64 * 64 + 64 * 10
    assert record["sanity_flags"] == [], record["sanity"]
    assert record["dtype"] == "float32" and record["env"]["torch"] == torch.__version__
    with pytest.raises(TypeError, match="attacks"):
        evaluate(mlp, (x, y), attacks=["pgd"])
    with pytest.raises(ValueError, match="rank"):
        evaluate(mlp, (x, y), rank=2, world_size=2)
    with pytest.raises(TypeError, match="data"):
        evaluate(mlp, x)


def test_same_seed_same_record_and_dataloader(mlp, digits):
    x, y = digits[2][:160], digits[3][:160]
    kw = dict(attacks=attacks(), batch_size=64, measure=False)
    a = evaluate(mlp, (x, y), **kw)
    b = evaluate(mlp, (x, y), **kw)
    assert strip(a) == strip(b)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    c = evaluate(mlp, loader, **kw)
    assert c["robust_accuracy"] == a["robust_accuracy"]
    # another batch size gives the same numbers: randomness is keyed by example, not by batch
    d = evaluate(mlp, (x, y), **{**kw, "batch_size": 48})
    for k, v in a["robust_accuracy"].items():
        assert abs(d["robust_accuracy"][k] - v) <= 2 / 160, k
    e = evaluate(mlp, (x, y), **kw, seed=1)
    assert e["seed"] == 1


class Crash(Exception):
    pass


class CrashingAttack(PGD):
    """PGD that dies (like a killed process) on its n-th call."""

    def __init__(self, *args, crash_on, **kw):
        super().__init__(*args, **kw)
        self._calls, self._crash_on = 0, crash_on

    def to_dict(self):  # the same configured attack as PGD(...): the state file must accept it
        return {**super().to_dict(), "type": "PGD"}

    def perturb(self, model, x, y):
        self._calls += 1
        if self._calls == self._crash_on:
            raise Crash()
        return super().perturb(model, x, y)


def test_killed_and_resumed_gives_same_numbers(mlp, digits, tmp_path):
    x, y = digits[2][:200], digits[3][:200]
    base = [FGSM(0.1), Square(0.1, 20)]
    ref = evaluate(mlp, (x, y), attacks=base + [PGD(0.1, 5)], batch_size=32, measure=False)
    state = tmp_path / "state.json"
    with pytest.raises(Crash):
        evaluate(mlp, (x, y), attacks=base + [CrashingAttack(0.1, 5, crash_on=4)], batch_size=32,
                 state_path=state, measure=False)
    saved = json.loads(state.read_text())
    assert saved["counts"]["done_batches"] == [0, 1, 2]  # the batch in progress is lost, nothing else
    resumed = evaluate(mlp, (x, y), attacks=base + [PGD(0.1, 5)], batch_size=32, state_path=state, measure=False)
    assert resumed["counts"] == ref["counts"]
    assert strip(resumed) == strip(ref) | {"attacks": resumed["attacks"]}
    # a state file from a different evaluation is refused, not mixed in
    with pytest.raises(ValueError, match="different evaluation"):
        evaluate(mlp, (x, y), attacks=[FGSM(0.2)], batch_size=32, state_path=state, measure=False)


def test_sharded_runs_merge_to_the_full_run(mlp, digits):
    x, y = digits[2][:200], digits[3][:200]
    kw = dict(attacks=[FGSM(0.1), PGD(0.1, 5)], batch_size=32, measure=False, sanity=False)
    full = evaluate(mlp, (x, y), **kw)
    shards = [evaluate(mlp, (x, y), rank=r, world_size=3, **kw) for r in range(3)]
    assert sum(s["examples"] for s in shards) == 200
    merged = merge_records(shards)
    assert merged["counts"] == full["counts"]
    assert merged["robust_accuracy"] == full["robust_accuracy"]


def test_ensemble_member_statistics_in_record(mlp, digits):
    x, y = digits[2][:150], digits[3][:150]
    ens = preset("standard", 0.1, steps=8, n_queries=30, n_target_classes=2)
    r = evaluate(mlp, (x, y), attacks=[ens], batch_size=64, measure=False, progress=True)
    members = r["ensembles"][ens.name]["members"]
    assert [m["name"] for m in members] == [a.name for a in ens.attacks]
    after = [m["robust_accuracy_after"] for m in members]
    assert after == sorted(after, reverse=True)
    assert after[-1] == pytest.approx(r["robust_accuracy"][ens.name])


def test_compressed_model_record_and_twin_mode(mlp, digits):
    x, y = digits[2][:150], digits[3][:150]
    comp = compress(copy.deepcopy(mlp), robcomp.Sparse24(), backend="torch")
    r = evaluate(comp, (x, y), attacks=[PGD(0.1, 5)], twin=mlp, batch_size=64, measure=False)
    assert r["input_gradients"] and set(r["input_gradients"].values()) == {"exact"}
    assert r["gradient"] == "exact" and r["straight_through"] == []
    assert r["macs"]["macs_nonzero"] < r["macs"]["macs"]  # 2:4 layers do half the work
    assert r["nonzero_parameters"] < r["dense_equivalent_parameters"]
    tw = r["twin"]["PGD-5 Linf eps=0.1"]
    assert 0 <= tw["disagreement"] <= 1 and 0 <= tw["replay_robust_accuracy"] <= r["clean_accuracy"]


class STERound(nn.Module):
    """Rounds activations in the forward; straight-through (identity) gradient in the backward."""

    gradient = "straight-through"

    def forward(self, x):
        return x + (torch.round(x * 8) / 8 - x).detach()


def test_straight_through_layers_are_reported(mlp, digits):
    x, y = digits[2][:64], digits[3][:64]
    model = nn.Sequential(STERound(), copy.deepcopy(mlp)).eval()
    r = evaluate(model, (x, y), attacks=[FGSM(0.1)], measure=False)
    assert r["gradient"] == "straight-through" and r["straight_through"] == ["0"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from robcomp.attacks import PGD, FGSM
    from robcomp.evaluation.evaluate import evaluate
    from robcomp.zoo.models import build_model
    from robcomp.zoo.data import load_digits_split
    model = build_model("mlp", 64)
    model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
    x, y = load_digits_split(seed=0)[2:]
    evaluate(model.eval(), (x[:192], y[:192]), attacks=[FGSM(0.1), PGD(0.1, 200)], batch_size=16,
             state_path=sys.argv[2], measure=False, sanity=False)
""")


def test_sigkilled_process_resumes_to_the_same_numbers(mlp, digits, tmp_path):
    weights, state = tmp_path / "mlp.pt", tmp_path / "state.json"
    torch.save(mlp.state_dict(), weights)
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(weights), str(state)],
                            env={**os.environ, "OMP_NUM_THREADS": "1",  # this checkout's robcomp, not an installed one
                                 "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])})
    deadline = time.time() + 60
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and len(json.loads(state.read_text())["counts"]["done_batches"]) >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    done = json.loads(state.read_text())["counts"]["done_batches"]
    assert 2 <= len(done) < 12, done  # killed part-way, state readable (atomic writes)
    x, y = digits[2][:192], digits[3][:192]
    kw = dict(attacks=[FGSM(0.1), PGD(0.1, 200)], batch_size=16, measure=False, sanity=False)
    resumed = evaluate(mlp, (x, y), state_path=state, **kw)
    fresh = evaluate(mlp, (x, y), **kw)
    assert resumed["counts"] == fresh["counts"]


def test_int8_dynamic_model_reports_straight_through(mlp, digits):
    x, y = digits[2][:64], digits[3][:64]
    comp = compress(copy.deepcopy(mlp), robcomp.Int8Dynamic(), backend="torch")
    r = evaluate(comp, (x, y), attacks=[PGD(0.1, 3)], measure=False, sanity=False)
    assert r["gradient"] == "straight-through" and r["straight_through"]
    assert set(r["straight_through"]) == {k for k, v in r["input_gradients"].items() if v == "straight-through"}


def test_latency_percentiles_of_known_times(monkeypatch):
    """median / p90 / p99 of forwards whose durations are known (a fake clock each forward advances),
    against numpy's linear-interpolation percentiles."""
    import numpy as np

    import robcomp.evaluation.timing as timing

    durations = np.random.default_rng(0).exponential(2.0, size=37)  # ms; skewed, so the percentiles differ
    clock, calls = [0.0], []

    class Tick(nn.Module):
        def forward(self, x):
            if len(calls) >= 2:  # after the two warm-up forwards
                clock[0] += durations[len(calls) - 2] / 1e3
            calls.append(1)
            return x

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    lat = timing.measure_latency(Tick(), (3,), 4, warmup=2, repeats=len(durations))
    assert lat["median_ms"] == pytest.approx(np.median(durations))
    assert lat["p90_ms"] == pytest.approx(np.percentile(durations, 90))
    assert lat["p99_ms"] == pytest.approx(np.percentile(durations, 99))
    assert lat["throughput_per_s"] == pytest.approx(4 / (np.median(durations) / 1e3))

