"""End to end: the console script, the quick main job, the cache, and bad command-line input."""
import json
import os
import subprocess
import sys

import pytest

from robcomp.cli import main


def _robcomp(*args, cache, cwd=None):
    env = dict(os.environ, ROBCOMP_CACHE_DIR=str(cache))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "robcomp.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_quick_main_job_end_to_end_and_cache_reuse(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = _robcomp("run", "--quick", "--out", str(out), "--no-progress", cache=cache)
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    recipes = {r["recipe"] for r in records}
    assert {"dense", "sparse24", "int8_weight_only", "int4_weight_only(group_size=32)",
            "channel_prune(ratio=0.5)"} <= recipes
    assert {r["training"] for r in records} == {"standard", "adversarial"}
    for r in records:
        assert 0.5 < r["clean_accuracy"] <= 1.0  # trained, better than chance (0.1) even when tiny
        assert len(r["robust_accuracy"]) == 4  # FGSM and PGD at two epsilons
        assert all(0 <= v <= r["clean_accuracy"] for v in r["robust_accuracy"].values())
        assert set(r["latency"]) == {"1", "64"}
        assert r["model_bytes"] > 0 and r["parameters"] > 0
        assert r["env"]["torch"]
    dense = {r["training"]: r for r in records if r["recipe"] == "dense"}
    assert all(r["model_bytes"] < dense[r["training"]]["model_bytes"] for r in records if r["recipe"] != "dense")
    report = (out / "report.md").read_text()
    assert "| model | training | recipe |" in report and "sparse24" in report
    assert "clean %" in first.stdout and "0/2 baselines from cache" in first.stdout

    second = _robcomp("run", "--quick", "--out", str(out), "--no-progress", cache=cache)
    assert second.returncode == 0, second.stderr
    assert "2/2 baselines from cache" in second.stdout
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["clean_accuracy"] for r in again] == [r["clean_accuracy"] for r in records]


@pytest.mark.parametrize("args, message", [
    (["run", "--quick", "--recipes", "foo"], "unknown recipe 'foo'"),
    (["run", "--quick", "--recipes", "int4_weight_only:group_size=100"], "group_size must be one of"),
    (["run", "--quick", "--models", "resnet"], "unknown ['resnet']"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robcomp: error:") and message in err[0]
    assert not out.exists()


def test_unwritable_out_is_rejected_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["run", "--quick", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "not a writable directory" in err[0]
    assert blocker.read_text() == "not a directory"


def test_env_command_reports_versions_and_triton(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] and "triton_kernels" in info and info["device"] == "cpu"


def test_report_rerenders_from_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results file" in capsys.readouterr().err
