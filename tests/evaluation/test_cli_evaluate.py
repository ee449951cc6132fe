"""``robcomp evaluate``: a saved zoo model evaluated from the command line gives rc.evaluate's record,
in one process and in two torchrun (gloo) processes, example by example; bad input is one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import robcomp as rc
from robcomp.attacks import FGSM, PGD
from robcomp.cli import main
from robcomp.zoo.data import load_digits_split
from robcomp.zoo.models import build_model

ROOT = Path(__file__).resolve().parents[2]
N, BATCH = 90, 16  # 6 batches, the last one short
ARGS = ["--limit", str(N), "--batch-size", str(BATCH), "--attacks", "fgsm", "pgd:steps=3", "--eps", "0.1",
        "--device", "cpu"]
ACCURACY_KEYS = ("examples", "clean_accuracy", "robust_accuracy", "robust_accuracy_by_eps",
                 "worst_case_robust_accuracy", "counts", "not_applicable", "attacks")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A briefly trained MLP (clean accuracy well above chance, so the attacks have work), saved."""
    torch.manual_seed(int.from_bytes(os.urandom(2), "little"))  # fresh weights every run
    model = build_model("mlp", 24)
    x, y = load_digits_split()[:2]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return rc.save(model.eval(), tmp_path_factory.mktemp("model") / "mlp.safetensors")


@pytest.fixture(scope="module")
def single(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "sub" / "record.json"
    assert main(["evaluate", str(saved), *ARGS, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_single_process_equals_rc_evaluate(saved, single, capsys):
    x, y = load_digits_split()[2:]
    x, y = x[:N], y[:N]
    model = rc.load(saved)
    direct = rc.evaluate(model, (x, y), attacks=[FGSM(eps=0.1), PGD(eps=0.1, steps=3)], batch_size=BATCH,
                         device="cpu", per_example=True)
    for key in (*ACCURACY_KEYS, "per_example"):
        assert single[key] == direct[key], key
    with torch.no_grad():  # independent of evaluate: the clean outcomes from a plain forward pass
        assert single["per_example"]["clean"] == (model(x).argmax(-1) == y).int().tolist()
    assert 0.3 < single["clean_accuracy"] and single["worst_case_robust_accuracy"] < single["clean_accuracy"]


def test_eps_completes_attacks_without_one(saved, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["evaluate", str(saved), "--limit", "20", "--attacks", "fgsm", "pgd:steps=2,eps=0.05", "--eps",
                 "8/255", "--out", str(out), "--device", "cpu"]) == 0
    eps = [a["eps"] for a in json.loads(out.read_text())["attacks"]]
    assert eps == [8 / 255, 0.05]
    line, = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("clean accuracy ") and "robust accuracy" in line and str(out) in line


def test_two_torchrun_processes_equal_one(saved, single, tmp_path):
    out, state = tmp_path / "record.json", tmp_path / "state" / "eval.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "robcomp.cli", "evaluate", str(saved), *ARGS, "--out", str(out),
                           "--state", str(state)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = json.loads(out.read_text())
    for key in (*ACCURACY_KEYS, "per_example"):
        assert sharded[key] == single[key], key
    assert sharded["distributed"]["world_size"] == 2 and sharded["distributed"]["backend"] == "gloo"
    summary = [line for line in done.stdout.splitlines() if line.startswith("clean accuracy")]
    assert len(summary) == 1 and "2 ranks" in summary[0]  # rank 0 alone prints
    assert sorted(p.name for p in state.parent.iterdir()) == ["eval.rank0-of-2.json", "eval.rank1-of-2.json"]


@pytest.mark.parametrize("args, message", [
    (["--attacks", "foo"], "--attacks: unknown attack 'foo'"),
    (["--attacks", "pgd:steps"], "not of the form key=value"),
    (["--attacks", "fgsm", "fgsm:eps=0.1"], "two attacks have the same name"),
    (["--eps", "8/0"], "--eps '8/0' is not a number"),
    (["--eps", "-0.1"], "--eps must be positive"),
    (["--data", "imagenet"], "--data: unknown data 'imagenet'"),
    (["--data", "cifar10:MISSING"], "CIFAR-10 test batches not found"),
    (["--data", "mnist:MISSING"], "MNIST file t10k-images-idx3-ubyte[.gz] not found"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--limit", "0"], "--limit must be a positive integer"),
    (["--out", "BLOCKED/sub/r.json"], "--out 'BLOCKED/sub/r.json': cannot write there"),
    (["--out", "DIR"], "is a directory"),
    (["--state", ""], "--state is empty"),
    (["--device", "tpu"], "--device:"),
    (["MODEL=missing.safetensors"], "MODEL: no such model file"),
    (["MODEL=BLOCKED"], "is not a safetensors file"),
    (["MODEL=WIDE"], "the model does not take this data's inputs (1, 8, 8)"),
])
def test_bad_input_one_line_exit_2_nothing_written(saved, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BLOCKED").write_text("a file, not a directory")
    (tmp_path / "DIR").mkdir()
    rc.save(build_model("mlp", 8, input_shape=(3, 4, 4)), tmp_path / "wide.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    model = {"MODEL=missing.safetensors": "missing.safetensors", "MODEL=BLOCKED": "BLOCKED",
             "MODEL=WIDE": "wide.safetensors"}.get(args[0], str(saved))
    args = [a for a in args if not a.startswith("MODEL=")]
    assert main(["evaluate", model, "--limit", "8", "--out", "record.json", "--state", "state.json", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robcomp: error:") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_too_few_batches_for_the_ranks_is_refused_before_the_process_group(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")  # no MASTER_ADDR: reaching init_from_env would fail differently
    assert main(["evaluate", str(saved), "--limit", "5", "--batch-size", "2", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 batches of --batch-size 2 for 4 ranks" in err[0], err
    assert not any(tmp_path.iterdir())


def test_a_state_of_another_evaluation_is_one_line(saved, tmp_path, capsys):
    state = tmp_path / "state.json"
    assert main(["evaluate", str(saved), "--limit", "8", "--attacks", "fgsm", "--state", str(state)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(saved), "--limit", "8", "--attacks", "pgd:steps=1", "--state", str(state),
                 "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robcomp: error: --state") and "different evaluation" in err[0], err
    assert not (tmp_path / "r.json").exists()
