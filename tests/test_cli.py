"""End to end: the console script, the quick main job, the cache, and bad command-line input."""
import json
import os
import re
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
    points = [r for r in records if "point_id" in r and r["status"] == "ok"]
    recipes = {r["recipe_name"] for r in points}
    assert {"dense", "sparse24", "int8_weight_only", "int4_weight_only", "channel_prune", "magnitude_prune"} <= recipes
    assert {r["training"] for r in points} == {"standard", "adversarial"}
    for r in points:
        # trained, better than chance (0.1) even when tiny; extreme compression may fall lower
        assert (0.3 if r["role"] != "compressed" else 0.0) < r["clean_accuracy"] <= 1.0
        assert len(r["robust_accuracy"]) == 4  # FGSM and PGD at two epsilons
        assert all(0 <= v <= r["clean_accuracy"] for v in r["robust_accuracy"].values())
        assert set(r["latency"]) == {"1", "64"}
        assert r["model_bytes"] > 0 and r["parameters"] > 0
        assert r["env"]["torch"]
    dense = {(r["experiment"], r["seed"]): r for r in points if r["role"] == "dense"}
    real_formats = [r for r in points if r["role"] == "compressed" and r["recipe_name"] != "magnitude_prune"]
    assert all(r["model_bytes"] < dense[(r["experiment"], r["seed"])]["model_bytes"] for r in real_formats)
    report = (out / "report.md").read_text()
    assert "| model | training | recipe |" in report and "sparse24" in report
    # the printed summary: per model recipe, params, bytes, clean and robust accuracy per attack, latency, throughput
    for column in ("recipe", "params", "bytes", "clean %", "PGD-3 Linf eps=0.1 %", "ms @1", "samples/s @64"):
        assert column in first.stdout
    trained = int(re.search(r"baselines: (\d+) trained, 0 from cache", first.stdout).group(1))
    assert trained >= 8  # capacity widths x {standard, adversarial} + compact widths

    # a second run into a fresh directory reuses every cached baseline and fine-tuned model
    second = _robcomp("run", "--quick", "--out", str(tmp_path / "out2"), "--no-progress", cache=cache)
    assert second.returncode == 0, second.stderr
    assert f"baselines: 0 trained, {trained} from cache" in second.stdout
    again = {r["point_id"]: r for r in map(json.loads, (tmp_path / "out2" / "results.jsonl").read_text().splitlines())
             if "point_id" in r}
    assert all(again[r["point_id"]]["clean_accuracy"] == r["clean_accuracy"] for r in points)
    # no wall-time comparison (it failed under load): what was reused is the proof
    assert all(r["finetune"]["cached"] for r in again.values() if r.get("finetune") and r["finetune"]["method"])
    assert all(r["baseline"]["cached"] for r in again.values())


def test_print_config_prints_the_shipped_study(capsys, tmp_path):
    import tomllib

    from robcomp.study.spec import default_spec, parse_spec

    assert main(["run", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert parse_spec(tomllib.loads(text)) == default_spec()
    custom = tmp_path / "my.toml"
    custom.write_text(text.replace("seeds = [0, 1, 2]", "seeds = [7]"))
    assert main(["run", "--config", str(custom), "--print-config"]) == 0
    assert "seeds = [7]" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["run", "--quick", "--recipes", "foo"], "unknown recipe 'foo'"),
    (["run", "--quick", "--recipes", "int4_weight_only:group_size=100"], "group_size must be one of"),
    (["run", "--quick", "--models", "resnet"], "unknown ['resnet']"),
    (["run", "--config", "/nonexistent/study.toml"], "cannot read"),
    (["run", "--config", "BAD_TOML"], "is not valid TOML"),
    (["run", "--config", "BAD_KEY"], "unknown key(s) ['epoch']"),
    (["run", "--quick", "--seed", "-1"], "--seed must be a non-negative integer"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    (tmp_path / "bad.toml").write_text("[study\nname = 1")
    (tmp_path / "key.toml").write_text("[train]\nepoch = 3\n[[experiment]]\nname='a'\nkind='capacity'\n")
    args = [{"BAD_TOML": str(tmp_path / "bad.toml"), "BAD_KEY": str(tmp_path / "key.toml")}.get(a, a) for a in args]
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


@pytest.mark.parametrize("args, message", [
    (["run", "--quick", "--out", ""], "--out is empty"),
    (["bench", "--out", ""], "--out is empty"),
    (["bench", "--out", "BLOCKED/sub/bench.json"], "cannot write there"),
    (["bench", "--out", "DIR"], "is a directory"),
])
def test_bad_out_is_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BLOCKED").write_text("a file, not a directory")
    (tmp_path / "DIR").mkdir()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robcomp: error:") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BLOCKED", "DIR"]


def test_help_and_version_are_plain_and_do_not_import_torch():
    code = ("import sys, contextlib, io\nfrom robcomp.cli import main\n"
            "for argv in (['--help'], ['--version'], ['run', '--help']):\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try:\n            main(argv)\n        except SystemExit:\n            pass\n"
            "    print(buf.getvalue())\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import robcomp
    assert f"robcomp {robcomp.__version__}" in done.stdout
    assert "--no-progress" in done.stdout and "``" not in done.stdout
    assert done.stdout.strip().endswith("TORCH False")


def test_env_reports_cpu_model_and_installed_versions(capsys):
    from importlib import metadata

    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch_pruning"] == metadata.version("torch-pruning")
    assert info["cpu"] and info["device_name"] == info["cpu"]
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        if names:
            assert info["cpu"] == names[0]


def test_corrupt_middle_line_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text('{"type": "study_spec"}\n{"point_id": \n{"point_id": "b"}\n')
    for args in (["report", str(tmp_path)], ["run", "--quick", "--out", str(tmp_path)]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "results.jsonl:2 is not valid JSON" in err[0], err


def test_quick_run_uses_its_own_default_directory(tmp_path, monkeypatch):
    import robcomp.study.runner

    seen = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(robcomp.study.runner, "run_study", lambda spec, out, **kw: seen.append((spec.name, out)))
    assert main(["run", "--quick", "--no-progress"]) == 0
    assert main(["run", "--no-progress"]) == 0
    assert [out for _, out in seen] == ["robcomp-out-quick", "robcomp-out"]
