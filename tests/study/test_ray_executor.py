"""The quick study on a local Ray (2 CPUs) gives the in-process records, timings aside, and a
driver stopped midway resumes; the command line's executor flags are checked before any work."""
import re
import subprocess
import sys

import pytest

from robcomp.cli import main
from robcomp.report import read_records
from robcomp.study.runner import run_study
from robcomp.study.spec import quick_spec

# measurements and cache provenance: the only fields allowed to differ between two runs
TIMING = ("attack_time_s", "evaluate_time_s", "latency", "layer_timing", "peak_memory", "energy")
STOPPED_AFTER = 20


def _comparable(record):
    r = {k: v for k, v in record.items() if k not in TIMING}
    r["baseline"] = None  # {"cached", "time_s"}: Ray trains baselines in their own tasks first
    if r.get("finetune"):
        r["finetune"] = {k: v for k, v in r["finetune"].items() if k != "time_s"}
    r["env"] = {k: v for k, v in r["env"].items() if k != "date"}
    return r


def _points(path):
    return {r["point_id"]: r for r in read_records(path) if "point_id" in r}


@pytest.mark.slow
def test_ray_quick_study_matches_in_process_and_resumes(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason='the Ray executor needs the extra: pip install -e ".[ray]"')
    from robcomp.study.ray_executor import RayExecutor

    spec = quick_spec()
    monkeypatch.setenv("ROBCOMP_CACHE_DIR", str(tmp_path / "local-cache"))  # not the other tests' warm one
    said = []
    local = run_study(spec, tmp_path / "local", progress=False, echo=said.append)
    trained_here = int(re.search(r"baselines: (\d+) trained", "\n".join(said)).group(1))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # the tasks get their cache path from the driver, not from the environment Ray started with
        shared = tmp_path / "shared-cache"
        monkeypatch.setenv("ROBCOMP_CACHE_DIR", str(shared))
        out = tmp_path / "ray"
        first, second = RayExecutor(), RayExecutor()
        run_study(spec, out, progress=False, echo=lambda *a: None, executor=first, max_points=STOPPED_AFTER,
                  render=False)
        partial = _points(out / "results.jsonl")
        assert len(partial) == STOPPED_AFTER
        lines = []
        run_study(spec, out, progress=False, echo=lines.append, executor=second)
    finally:
        ray.shutdown()
    total = len(spec.points())
    assert f"{total - STOPPED_AFTER} points run, {STOPPED_AFTER} already in" in "\n".join(lines)
    # each baseline trained once, in its own task, into the shared cache (which started empty)
    assert first.baselines["cached"] == 0
    assert first.baselines["trained"] + second.baselines["trained"] == trained_here > 0
    assert len(list((shared / "checkpoints").glob("*.safetensors"))) >= trained_here
    resumed = _points(out / "results.jsonl")
    assert len(resumed) == total == len(local)  # every point once: nothing redone, nothing lost
    for pid, r in partial.items():
        assert resumed[pid] == r  # finished points were not redone
    by_id = {r["point_id"]: r for r in local}
    for pid, r in resumed.items():
        assert _comparable(r) == _comparable(by_id[pid]), (r["experiment"], r["recipe"], r["regime"])
    assert (out / "report.md").exists()


@pytest.mark.parametrize("argv, message", [
    (["--address", "auto"], "--address needs --executor ray"),
    (["--task-gpus", "1"], "--task-gpus needs --executor ray"),
    (["--executor", "ray", "--task-cpus", "-1"], "--task-cpus must be a non-negative number"),
    (["--executor", "ray", "--task-cpus", "0"], "--task-cpus must be positive"),
])
def test_executor_flags_are_checked_before_anything_is_written(tmp_path, capsys, argv, message):
    if "ray" in argv:  # without Ray installed the command stops earlier, saying how to install it
        pytest.importorskip("ray")
    out = tmp_path / "out"
    assert main(["run", "--quick", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_ray_executor_is_an_extra_not_a_dependency():
    # importing robcomp's study machinery never imports ray
    code = "import sys, robcomp.study.runner, robcomp.cli, robcomp.study.ray_executor; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
