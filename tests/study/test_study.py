"""The study: spec parsing, points and their hashes, resumption after a kill, the Python API."""
import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from robcomp.recipes import RECIPES
from robcomp.report import read_records
from robcomp.study.runner import run_study
from robcomp.study.spec import (SpecError, default_spec, default_spec_text, parse_spec, point_id, quick_spec)

ACCURACY_KEYS = ("clean_accuracy", "robust_accuracy", "robust_accuracy_by_eps", "model_bytes", "parameters")


def _points(path):
    return {r["point_id"]: r for r in read_records(path) if "point_id" in r}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    records = run_study(quick_spec(), out, progress=False, echo=lambda *a: None)
    return out, records


def test_default_spec_covers_every_question_and_recipe():
    spec = default_spec()
    kinds = {e.kind for e in spec.experiments}
    assert kinds == {"sweep", "compact", "capacity", "equal_bytes", "efficiency"}
    assert len(spec.seeds) >= 3  # spread, shown as error bars
    sweeps = {e.name: e for e in spec.experiments if e.kind == "sweep"}
    assert any("magnitude_prune" in r for r in sweeps["sparsity"].recipes)
    assert {"post", "finetune", "adv_finetune"} <= set(sweeps["sparsity"].regimes)
    bits = " ".join(sweeps["bits"].recipes)
    assert "int8" in bits and "int4" in bits
    efficiency = next(e for e in spec.experiments if e.kind == "efficiency")
    assert {r.split(":")[0] for r in efficiency.recipes} == set(RECIPES)  # "all": data-driven, nothing special-cased
    # the printed config is the shipped file and parses back to the same spec
    assert parse_spec(tomllib.loads(default_spec_text())) == spec


def test_shipped_memory_bound_study_and_the_default_kernel_sweep(capsys):
    from robcomp.cli import main
    from robcomp.zoo.models import build_model
    from robcomp.study.spec import load_spec, shipped_studies

    assert {"default", "memory_bound"} <= set(shipped_studies())
    spec = load_spec("memory_bound")  # a shipped study by name (robcomp run --config memory_bound)
    (ex,) = spec.experiments
    assert ex.kind == "efficiency" and 1 in spec.batch_sizes and spec.kernel_sweep["enabled"]
    assert {r.split(":")[0] for r in ex.recipes} >= {"int8_weight_only", "int4_weight_only", "sparse24",
                                                      "sparse24_int4"}
    weights = sum(m.weight.numel() for m in build_model(ex.models[0]).modules() if hasattr(m, "weight"))
    assert 4 * weights > 32 * 2 ** 20  # fp32 weights beyond a 32 MB cache: batch 1 is memory-bound
    assert main(["run", "--config", "memory_bound", "--print-config"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["study"]["name"] == "memory_bound"
    with pytest.raises(SpecError, match="shipped studies: .*memory_bound"):
        load_spec("no_such_study")
    ks = default_spec().kernel_sweep
    assert ks["enabled"] and 1 in ks["batches"] and max(ks["sizes"]) >= 4096
    quick = quick_spec(spec)  # smoke-sized: the wide model narrowed, the sweep over small sizes only
    assert quick.kernel_sweep["enabled"] and max(quick.kernel_sweep["sizes"]) <= 1024
    assert all(w <= 1024 for e in quick.experiments for m in e.models for w in e.widths_for(m))
    assert quick.points()[0].batch_sizes == [1, 16]
    data = tomllib.loads(default_spec_text())  # an experiment's own batch sizes replace the study's, for it only
    data["experiment"][-1]["batch_sizes"] = [1, 8]
    batches = {p.experiment: p.batch_sizes for p in parse_spec(data).points()}
    assert batches[data["experiment"][-1]["name"]] == [1, 8] and batches["sparsity"] == [1, 256]
    no_table = tomllib.loads(default_spec_text())
    del no_table["kernel_sweep"]
    assert not parse_spec(no_table).kernel_sweep["enabled"]  # a spec without the table measures none


def test_point_ids_are_stable_and_distinct():
    spec = default_spec()
    points = spec.points()
    ids = [p.id for p in points]
    assert len(ids) == len(set(ids))
    assert ids == [p.id for p in default_spec().points()]  # deterministic
    assert points[0].id == point_id(json.loads(json.dumps(points[0].config)))  # survives a JSON round trip


@pytest.mark.parametrize("patch, message", [
    ({"study": {"seedz": [0]}}, "unknown key(s) ['seedz']"),
    ({"experiment": [{"name": "a", "kind": "sweep", "recipes": ["foo"]}]}, "unknown recipe 'foo'"),
    ({"experiment": [{"name": "a", "kind": "nope"}]}, "kind must be one of"),
    ({"experiment": [{"name": "a", "kind": "capacity", "regimes": ["later"]}]}, "regimes must hold"),
    ({"evaluate": {"attacks": ["pgd:steps=3"]}}, "needs eps"),
    ({"evaluate": {"attacks": ["zap:eps=0.1"]}}, "unknown attack 'zap'"),
    ({"train": {"epochs": 0}}, "epochs must be a positive integer"),
    ({"kernel_sweep": {"sizes": []}}, "kernel_sweep.sizes must be a non-empty list"),
    ({"kernel_sweep": {"budget": 1.0}}, "unknown key(s) ['budget']"),
    ({"kernel_sweep": {"budget_s": 0}}, "kernel_sweep.budget_s must be positive"),
    ({"experiment": [{"name": "a", "kind": "capacity", "batch_sizes": [0]}]}, "batch_sizes must hold positive"),
])
def test_bad_spec_names_the_key(patch, message):
    data = tomllib.loads(default_spec_text())
    for table, value in patch.items():
        data[table] = value if isinstance(value, list) else {**data.get(table, {}), **value}
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert message in str(e.value)


def test_quick_study_fills_every_section(quick_run):
    out, records = quick_run
    spec = quick_spec()
    assert len(records) == len(spec.points())
    assert {r["experiment"] for r in records} == {e.name for e in spec.experiments}
    assert all(r["status"] in ("ok", "skipped") for r in records)
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) >= 0.9 * len(records)
    for r in ok:
        assert (0.3 if r["role"] != "compressed" else 0.0) < r["clean_accuracy"] <= 1
        assert r["compression_ratio"] >= 0.99 or r["role"] != "compressed" or r["recipe_name"] == "magnitude_prune"
    regimes = {r["regime"] for r in ok}
    assert {"dense", "post", "finetune", "adv_finetune"} <= regimes
    assert any(r["finetune"] and r["finetune"]["method"] == "compression_aware" for r in ok if r.get("finetune"))
    eff = [r for r in ok if r["kind"] == "efficiency" and r["role"] == "compressed"]
    assert all(r["layer_timing"] for r in eff)
    for name in ("report.md", "report.html"):
        assert (out / name).stat().st_size > 1000
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert {f"{e.name}.png" for e in spec.experiments} <= set(pngs)
    report = (out / "report.md").read_text()
    for e in spec.experiments:
        assert f"## {e.title}" in report
    assert report.count("**Finding:**") >= len(spec.experiments)
    assert "critical ratios" in report and "breaks before clean accuracy" in report or "never breaks before" in report


def test_rerun_skips_finished_points(quick_run, monkeypatch):
    import robcomp.study.runner

    def recompute(p, ctx):
        raise AssertionError(f"point {p.id} was recomputed")
    monkeypatch.setattr(robcomp.study.runner, "_record_for", recompute)
    out, records = quick_run
    before = (out / "results.jsonl").read_text()
    lines = []
    again = run_study(quick_spec(), out, progress=False, echo=lines.append)
    assert (out / "results.jsonl").read_text() == before  # nothing appended: every point was done
    # what was recomputed, not how long it took: no point, no baseline (trained or loaded)
    assert any(line.startswith("\n0 points run") and "baselines: 0 trained, 0 from cache" in line for line in lines)
    assert [r["point_id"] for r in again] == [r["point_id"] for r in records]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_results(quick_run, tmp_path):
    """SIGKILL `robcomp run --quick` midway, rerun it: no finished point is redone and the
    accuracies (and the accuracy-only report sections) equal those of the uninterrupted run."""
    full_out = quick_run[0]
    out = tmp_path / "killed"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "robcomp.cli", "run", "--quick", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if results.exists() and results.read_text().count("\n") >= 12:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _points(results)
    total = len(quick_spec().points())
    assert 0 < len(partial) < total, "the kill must land midway"
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"{total - len(partial)} points run, {len(partial)} already in" in second.stdout
    resumed, full = _points(results), _points(full_out / "results.jsonl")
    assert set(resumed) == set(full)
    for pid, r in resumed.items():
        if pid in partial:
            assert r == partial[pid]  # finished points were not redone
        for key in ACCURACY_KEYS:
            assert r.get(key) == full[pid].get(key), (r["experiment"], r["recipe"], key)

    def accuracy_sections(path):
        text = path.read_text()
        keep = []
        for part in text.split("\n## ")[1:]:
            title = part.split("\n", 1)[0]
            if title not in ("Efficiency", "Hardware efficiency", "All results", "Findings"):
                keep.append(part)
        return keep
    assert accuracy_sections(out / "report.md") == accuracy_sections(full_out / "report.md")


def test_second_run_into_a_locked_directory_refuses(tmp_path):
    """Two processes, one --out: the second run refuses and writes nothing."""
    hold = ("import sys\nfrom robcomp._io import DirectoryLock\nwith DirectoryLock(sys.argv[1]):\n"
            "    print('locked', flush=True)\n    sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"

        second = subprocess.run([sys.executable, "-m", "robcomp.cli", "run", "--quick", "--out", str(tmp_path),
                                 "--no-progress"], capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"robcomp: error: {tmp_path} is in use by another robcomp run (pid {holder.pid}): wait for it to "
            "finish or pass another --out"]
        assert not (tmp_path / "results.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_directory_of_another_study_is_refused(tmp_path):
    from robcomp.report.results import append_record
    from robcomp.report.results import STUDY_RECORD

    full = default_spec()
    append_record(tmp_path / "results.jsonl", {"type": STUDY_RECORD, "spec": full.to_dict(),
                                               "spec_hash": full.spec_hash()})
    before = (tmp_path / "results.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds the results of another study .* pass another --out"):
        run_study(quick_spec(), tmp_path, progress=False, echo=lambda *a: None)
    assert (tmp_path / "results.jsonl").read_text() == before


def test_unhonourable_channel_prune_is_skipped_not_ok(tmp_path, capsys):
    """ChannelPrune(0.99) on MLP-64 with round_to=8 cannot remove a channel: the point says so."""
    import dataclasses

    quick = quick_spec()
    ex = dataclasses.replace(next(e for e in quick.experiments if e.kind == "sweep"), models=("mlp",),
                             widths={"mlp": [64]}, recipes=("channel_prune:ratio=0.99", "channel_prune:ratio=0.875"),
                             regimes=("post",), bases=("standard",))
    spec = quick.replace(experiments=(ex,), attacks=("fgsm:eps=0.1",), train={**quick.train, "epochs": 1},
                         test_examples=32, batch_sizes=(32,), latency_repeats=1)
    records = run_study(spec, tmp_path, progress=True, use_cache=False, render=False)
    err = capsys.readouterr().err  # not a terminal: one plain line per point, no bar redraws
    assert "\r" not in err and "robcomp study [3/3] " in err.splitlines()[-1]
    by_recipe = {r["recipe"]: r for r in records}
    bad = by_recipe["channel_prune(ratio=0.99)"]
    assert bad["status"] == "skipped"
    assert "removed no channel" in bad["reason"] and "ratio=0.875" in bad["reason"]
    assert by_recipe["channel_prune(ratio=0.875)"]["status"] == "ok"


def test_layer_shares_add_up_to_at_most_the_whole_pass():
    from robcomp.compression.compress import compress
    from robcomp.zoo.models import build_model
    from robcomp.recipes import Int8WeightOnly
    from robcomp.study.runner import layer_times

    model = compress(build_model("mlp", 64).eval(), Int8WeightOnly())
    t = layer_times(model, (1, 8, 8), batch_size=16, repeats=5)
    shares = [info["share"] for info in t["layers"].values()]
    assert len(shares) == 3 and all(s > 0 for s in shares)
    assert sum(shares) <= 1.0  # layers and total from the same pass
    assert t["total_ms"] > 0 and t["unhooked_ms"] > 0


def test_run_study_is_reachable_from_the_study_package():
    """The README's Python entry ``robcomp.study.run_study`` is the runner's, resolved lazily."""
    import robcomp.study
    from robcomp.study.runner import run_study

    assert robcomp.study.run_study is run_study
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        robcomp.study.nope
