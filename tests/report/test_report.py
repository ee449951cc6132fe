"""The report: findings computed from the data, re-rendering from results only, the hardware
section from pytest-benchmark JSON, a self-contained HTML file."""
import copy
import json
import re

import pytest

from robcomp.cli import main
from robcomp.report.bench import bench_rows, peak_for
from robcomp.report.findings import analyse, pareto_front
from robcomp.study.runner import run_study
from robcomp.study.spec import quick_spec


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    run_study(quick_spec(), out, progress=False, echo=lambda *a: None)
    return out


def _rec(role, recipe, regime, seed, clean, robust, ratio, **kw):
    return {"experiment": "s", "kind": "sweep", "role": role, "recipe": recipe, "regime": regime, "seed": seed,
            "model_name": "mlp", "width": 8, "base": "adversarial", "status": "ok", "clean_accuracy": clean,
            "robust_accuracy_by_eps": {"Linf eps=0.1": robust}, "compression_ratio": ratio, "nonzero_ratio": ratio,
            "bytes_ratio": 1.0, **kw}


def _sweep_spec():
    return {"headline_eps": 0.1, "critical_drop": 0.03,
            "experiments": [{"name": "s", "kind": "sweep", "title": "S", "question": "", "regimes": ["post"],
                             "x": "nonzero_ratio", "models": ["mlp"]}]}


@pytest.mark.parametrize("robust_first", [True, False])
def test_sweep_finding_is_computed_from_the_data(robust_first):
    records = []
    for seed in (0, 1):
        records.append(_rec("dense", "dense", "dense", seed, 0.95, 0.80, 1.0))
        # ratio 2: one metric drops by 10 points, the other by 1; ratio 10: both drop
        a, b = (0.94, 0.70) if robust_first else (0.85, 0.79)
        records.append(_rec("compressed", "p(2)", "post", seed, a, b, 2.0))
        records.append(_rec("compressed", "p(10)", "post", seed, 0.5, 0.3, 10.0))
    (section,) = analyse(_sweep_spec(), records)
    if robust_first:
        assert "breaks before clean accuracy in 1 of 1 regimes" in section.finding
        assert "robust 2x, clean 10x (robustness first)" in section.finding
    else:
        assert "never breaks before clean accuracy" in section.finding
        assert "robust 10x, clean 2x (accuracy first)" in section.finding
    assert "2 seeds" in section.finding
    rows = section.tables[0].rows
    assert rows[0][1] == "p(2)" and "±" in rows[0][3]


def test_pareto_front():
    pts = [{"label": "a", "latency": 1.0, "robust": 0.5}, {"label": "b", "latency": 2.0, "robust": 0.7},
           {"label": "c", "latency": 3.0, "robust": 0.6}, {"label": "d", "latency": 0.5, "robust": 0.4}]
    assert [p["label"] for p in pareto_front(pts)] == ["d", "a", "b"]


def test_report_rerenders_from_results_only(study_dir, capsys):
    md = (study_dir / "report.md").read_text()
    for name in ("report.md", "report.html"):
        (study_dir / name).unlink()
    for png in (study_dir / "plots").glob("*.png"):
        png.unlink()
    assert main(["report", str(study_dir)]) == 0
    assert (study_dir / "report.md").read_text() == md
    assert (study_dir / "report.html").exists() and len(list((study_dir / "plots").glob("*.png"))) >= 6
    assert "rendered from" in capsys.readouterr().out


def test_html_is_self_contained_with_sortable_tables(study_dir):
    html = (study_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched from a network
    assert "<link" not in html and "@import" not in html
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(imgs) >= 6 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert html.count('<table class="sortable">') >= 7 and "addEventListener('click'" in html
    assert html.count('class="finding"') >= 6


def test_pngs_are_real_images(study_dir):
    for png in (study_dir / "plots").glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png


def _bench_json(device):
    def bench(name, impl, ms, speedup=None):
        extra = {"device": device, "impl": impl, "ms": ms, "bytes": 2 * 4096 * 4096, "flops": 2 * 16 * 4096 * 4096,
                 "shape": {"M": 16, "K": 4096, "N": 4096}, "dtype": "float16"}
        if speedup:
            extra["speedup_vs_dense"] = speedup
        return {"name": name, "group": "lowbit", "stats": {"median": ms / 1e3}, "extra_info": extra}
    return {"machine_info": {"machine": "x86_64"}, "benchmarks": [bench("test_dense", "dense", 0.05),
                                                                  bench("test_int4", "triton", 0.02, 2.5)]}


def test_bench_rows_peaks_and_unknown_devices():
    h100 = bench_rows(_bench_json("NVIDIA H100 80GB HBM3"))
    assert peak_for("NVIDIA H100 80GB HBM3") == (3350.0, 989.0)
    row = h100[1]
    assert row["speedup"] == 2.5 and row["gbps"] == pytest.approx(2 * 4096 * 4096 / 0.02 / 1e6)
    assert row["bw_pct"] == pytest.approx(100 * row["gbps"] / 3350) and row["compute_pct"] > 0
    unknown = bench_rows(_bench_json("Some Future GPU"))
    assert unknown[1]["bw_pct"] is None and unknown[1]["peak"] == "peak unknown"
    plain = bench_rows({"benchmarks": [{"name": "x", "stats": {"median": 0.001}}]})  # any pytest-benchmark JSON
    assert plain[0]["ms"] == pytest.approx(1.0) and plain[0]["gbps"] is None


def test_report_folds_in_benchmark_json(study_dir, tmp_path, capsys):
    good = tmp_path / "bench-h100.json"
    good.write_text(json.dumps(_bench_json("NVIDIA H100 80GB HBM3")))
    other = tmp_path / "bench-cpu.json"
    other.write_text(json.dumps(_bench_json("Mystery Accelerator")))
    assert main(["report", str(study_dir), "--bench", str(good), str(other)]) == 0
    md = (study_dir / "report.md").read_text()
    hw = md.split("## Hardware efficiency", 1)[1].split("\n## ", 1)[0]
    assert "test_int4" in hw and "2.50x dense" in hw and "peak unknown" in hw
    assert "3350 GB/s, 989 TFLOP/s" in hw
    assert "From the study's efficiency points" in hw and "batch 1" in hw
    assert (study_dir / "bench" / "bench-h100.json").exists()  # kept: a later re-render shows it too
    assert main(["report", str(study_dir)]) == 0
    assert "test_int4" in (study_dir / "report.md").read_text()


def test_report_bad_input_one_line_exit_2(study_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    before = (study_dir / "report.md").read_text()
    assert main(["report", str(study_dir), "--bench", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robcomp: error:") and "is not JSON" in err[0]
    assert (study_dir / "report.md").read_text() == before
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no results file" in capsys.readouterr().err


def test_partial_results_render_with_missing_points(study_dir, tmp_path, capsys):
    lines = (study_dir / "results.jsonl").read_text().splitlines()
    out = tmp_path / "partial"
    out.mkdir()
    (out / "results.jsonl").write_text("\n".join(lines[:10]) + "\n" + lines[10][: len(lines[10]) // 2])
    assert main(["report", str(out)]) == 0  # a torn last line (not written by robcomp) is ignored
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robcomp: warning:") and "results.jsonl:11: ignoring a partial" in err[0]
    md = (out / "report.md").read_text()
    assert "Points: 9 of" in md


def test_sections_degrade_gracefully_without_points():
    spec = copy.deepcopy(_sweep_spec())
    (section,) = analyse(spec, [])
    assert "nothing to compare" in section.finding


def _eff_rec(base, recipe, regime, seed, robust, ms):
    return {"experiment": "e", "kind": "efficiency", "role": "dense" if recipe == "dense" else "compressed",
            "recipe": recipe, "regime": regime, "seed": seed, "model_name": "mlp", "width": 8, "base": base,
            "status": "ok", "clean_accuracy": 0.95, "robust_accuracy_by_eps": {"Linf eps=0.1": robust},
            "model_bytes": 1000 if recipe == "dense" else 500, "bytes_ratio": 1.0 if recipe == "dense" else 2.0,
            "latency": {"1": {"median_ms": ms, "throughput_per_s": 1 / ms}}, "env": {"device_name": "cpu"}}


def test_efficiency_two_bases_are_never_mixed(tmp_path):
    from robcomp.report.plots import plot_section
    spec = {"headline_eps": 0.1, "critical_drop": 0.03,
            "experiments": [{"name": "e", "kind": "efficiency", "title": "E", "question": "", "models": ["mlp"],
                             "bases": ["standard", "adversarial"], "regimes": ["matched"]}]}
    records = []
    for seed in (0, 1):
        # standard: dense 0.55 robust at 1 ms; adversarial: dense 0.85 robust at 2 ms (its own reference)
        records += [_eff_rec("standard", "dense", "dense", seed, 0.55, 1.0),
                    _eff_rec("standard", "q", "finetune", seed, 0.56, 0.5),
                    _eff_rec("adversarial", "dense", "dense", seed, 0.85, 2.0),
                    _eff_rec("adversarial", "q", "adv_finetune", seed, 0.80, 0.5)]
    (s,) = analyse(spec, records)
    pts = s.plot["points"]
    assert sorted((p["base"], p["label"]) for p in pts) == [("adversarial", "dense"), ("adversarial", "q"),
                                                           ("standard", "dense"), ("standard", "q")]
    dense = {p["base"]: p for p in pts if p["label"] == "dense"}
    assert dense["standard"]["robust"] == pytest.approx(0.55) and dense["standard"]["robust_ms"][1] == 0
    assert dense["adversarial"]["robust"] == pytest.approx(0.85)
    q = {p["base"]: p for p in pts if p["label"] == "q"}
    assert q["standard"]["speedup"][1][0] == pytest.approx(2.0)  # vs the standard dense
    assert q["adversarial"]["speedup"][1][0] == pytest.approx(4.0)  # vs the adversarial dense
    # one Pareto front per base (a single mixed front would hold only std q and adv dense)
    assert s.plot["bases"] == ["adversarial", "standard"]  # the more robust dense base first
    assert s.plot["fronts"] == {"adversarial": ["q [adversarial]", "dense [adversarial]"],
                                "standard": ["q [standard]"]}
    assert s.finding.index("adversarial base") < s.finding.index("standard base")
    assert "q (4.00 ± 0.00x its dense)" in s.finding and "q (2.00 ± 0.00x its dense)" in s.finding
    table = s.tables[0]
    assert table.head[0] == "base" and [r[0] for r in table.rows] == ["adversarial"] * 2 + ["standard"] * 2
    png = plot_section(s.plot, tmp_path / "e.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a single-base experiment keeps the plain layout: no base column, one front
    spec["experiments"][0]["bases"] = ["adversarial"]
    (s1,) = analyse(spec, [r for r in records if r["base"] == "adversarial"])
    assert s1.tables[0].head[0] == "recipe" and s1.plot["front"] == ["q", "dense"]
    assert "the fastest recipe at batch 1 is q" in s1.finding


def _pair_records(p_robust, q_robust):
    """Equal-bytes records: one pruning and one quantisation point per seed."""
    recs = []
    for seed, (pr, qr) in enumerate(zip(p_robust, q_robust)):
        for label, fam, rob in (("chprune", "pruning", pr), ("int4", "quantisation", qr)):
            recs.append({"experiment": "e", "kind": "equal_bytes", "role": "compressed", "recipe": label,
                         "regime": "post", "family": fam, "seed": seed, "status": "ok", "model_bytes": 100_000,
                         "clean_accuracy": 0.9, "robust_accuracy_by_eps": {"Linf eps=0.1": rob}})
    return recs


_EQ_SPEC = {"headline_eps": 0.1, "critical_drop": 0.03,
            "experiments": [{"name": "e", "kind": "equal_bytes", "title": "E", "question": ""}]}


def test_equal_bytes_finding_says_when_the_difference_is_noise():
    # 84.1 +- 0.3 vs 82.9 +- 1.1 over 3 seeds: the gap is inside the spread
    (noisy,) = analyse(_EQ_SPEC, _pair_records([0.838, 0.841, 0.844], [0.818, 0.840, 0.829]))
    assert "no difference in robust accuracy" in noisy.finding and "no significant difference at 3 seeds" in noisy.finding
    assert "keeps more" not in noisy.finding
    (clear,) = analyse(_EQ_SPEC, _pair_records([0.90, 0.91, 0.92], [0.80, 0.80, 0.83]))
    assert "pruning keeps more robust accuracy" in clear.finding and "significant: paired t-test over 3 seeds" in clear.finding


def test_sweep_robust_first_needs_a_significant_drop():
    records = []
    for seed, drop in enumerate((0.005, 0.08, 0.02)):  # mean drop 3.5 points, spread 3.9: past 3 points by chance
        records.append(_rec("dense", "dense", "dense", seed, 0.95, 0.80, 1.0))
        records.append(_rec("compressed", "p(2)", "post", seed, 0.95, 0.80 - drop, 2.0))
        records.append(_rec("compressed", "p(10)", "post", seed, 0.5, 0.3, 10.0))
    (section,) = analyse(_sweep_spec(), records)
    assert "in no regime significantly" in section.finding and "not significant at 3 seeds" in section.finding
    assert ("robust 2x, clean 10x (robustness first; the robust drop (3.5 points) is not significantly past 3 at "
            "3 seeds (one-sided t-test, p = ") in section.finding


def test_summary_shows_bytes_and_nonzero_ratios_separately():
    from robcomp.report.markdown import summary_rows

    rec = {"model_name": "mlp", "width": 256, "training": "standard", "recipe": "magnitude_prune(sparsity=0.5)",
           "parameters": 85002, "model_bytes": 421936, "bytes_ratio": 340016 / 421936, "nonzero_ratio": 1.93,
           "compression_ratio": 1.93, "clean_accuracy": 0.976, "robust_accuracy": {}}
    head, (row,) = summary_rows([rec])
    assert "size x" not in head
    assert row[head.index("bytes x")] == "0.81" and row[head.index("nonzero x")] == "1.93"


def test_hardware_best_speedup_excludes_the_baseline_and_devices_are_named_once():
    from robcomp.report.bench import is_baseline

    data = _bench_json("x86_64")
    data["machine_info"]["cpu"] = {"brand_raw": "AMD EPYC 7B13"}
    data["benchmarks"][0]["extra_info"]["speedup_vs_dense"] = 1.0  # dense timed against itself
    data["benchmarks"][1]["extra_info"]["speedup_vs_dense"] = 0.0012  # a 800x slowdown
    rows = bench_rows(data)
    assert {r["device"] for r in rows} == {"AMD EPYC 7B13"}
    assert is_baseline(rows[0]) and not is_baseline(rows[1])


def test_report_finding_never_names_dense_as_best(tmp_path, capsys):
    data = _bench_json("NVIDIA H100 80GB HBM3")
    data["benchmarks"][0]["extra_info"]["speedup_vs_dense"] = 1.0
    data["benchmarks"][1]["extra_info"]["speedup_vs_dense"] = 0.0012
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "b.json").write_text(json.dumps(data))
    (tmp_path / "results.jsonl").write_text("")
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "best kernel speedup 0.0012x (test_int4)" in report and "0.00x" not in report


# ------------------------------------------------------------------------------ kernel sweep
def _md_table_after(md: str, caption_start: str) -> list[list[str]]:
    """The rows of the Markdown table that follows the caption starting with ``caption_start``."""
    lines = md.split("\n")
    i = next(i for i, line in enumerate(lines) if line.startswith(caption_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _sweep_cells(rows: list[list[str]]) -> dict:
    head, body = rows[0], rows[2:]
    batches = [int(h.rsplit(" ", 1)[1]) for h in head[2:]]
    return {(r[0], int(r[1].split(" x ")[0]), m): cell for r in body for m, cell in zip(batches, r[2:])}


def test_kernel_sweep_table_and_plot_match_the_record(study_dir, tmp_path):
    """The quick study records a sweep; report.md's sweep table shows every measured cell as the
    record's dense_ms / ms with the path it ran, the plot is a PNG embedded in report.html, and a
    changed record changes the table (it is read from results.jsonl, not measured again)."""
    from robcomp.report import read_records
    from robcomp.report.render import render_report

    records = read_records(study_dir / "results.jsonl")
    sweeps = [r for r in records if r.get("type") == "kernel_sweep"]
    assert len(sweeps) == 1
    rec = sweeps[0]
    assert rec["threads"] == quick_spec().threads and rec["dtype"] == "float32" and rec["device"].startswith("cpu")
    assert rec["env"]["torch"] and rec["env"]["date"]
    assert len(rec["rows"]) == len(rec["sizes"]) * len(rec["batches"]) * len(rec["formats"])
    md = (study_dir / "report.md").read_text()
    cells = _sweep_cells(_md_table_after(md, "Kernel sweep: one compressed layer"))
    measured = 0
    for r in rec["rows"]:
        cell = cells[(r["format"], r["K"], r["M"])]
        if r["status"] != "ok":
            assert cell == r["status"]
            continue
        measured += 1
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"], rel=1e-9)
        value, path = re.fullmatch(r"([0-9.e+-]+)x \((\w+)\)", cell).groups()
        assert float(value) == pytest.approx(r["speedup"], rel=0.01, abs=0.006) and path == r["path"]
    assert measured >= 0.8 * len(rec["rows"])
    for size in rec["sizes"]:
        for m in rec["batches"]:
            dense_ms = next(r["dense_ms"] for r in rec["rows"] if (r["K"], r["M"]) == (size, m))
            assert float(cells[("dense fp32 (ms)", size, m)].split()[0]) == pytest.approx(dense_ms, rel=1e-3)
    png = study_dir / "plots" / "kernel_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import base64
    html = (study_dir / "report.html").read_text()
    assert base64.b64encode(png.read_bytes()).decode() in html
    assert "![Hardware efficiency](plots/kernel_sweep.png)" in md
    # the hardware finding names the formats faster than dense at the largest size, from the record
    big, m0 = max(rec["sizes"]), min(rec["batches"])
    n_fast = sum(1 for r in rec["rows"] if r["status"] == "ok" and r["K"] == big and r["M"] == m0 and r["speedup"] > 1)
    assert f"batch {m0}: {n_fast} of " in md
    # poison one measured row: the re-rendered table follows the record
    poisoned = copy.deepcopy(records)
    sweep = next(r for r in poisoned if r.get("type") == "kernel_sweep")
    row = next(r for r in sweep["rows"] if r["status"] == "ok")
    row["speedup"], row["path"] = 123.0, "reference"
    out = tmp_path / "poisoned"
    out.mkdir()
    render_report(out, poisoned)
    cells = _sweep_cells(_md_table_after((out / "report.md").read_text(), "Kernel sweep: one compressed layer"))
    assert cells[(row["format"], row["K"], row["M"])] == "123.00x (reference)"


def test_kernel_sweep_measures_every_cell_and_skips_what_a_format_cannot_take():
    import torch

    from robcomp.evaluation.kernel_sweep import run_kernel_sweep
    from robcomp.compression.handlers import layer_type_for
    from robcomp.recipes import parse_recipe

    formats = {"int8_weight_only": "int8_weight_only", "int4_weight_only(g128)": "int4_weight_only:group_size=128"}
    rec = run_kernel_sweep([64, 128], [1, 3], formats=formats, budget_s=0.01)
    assert rec["type"] == "kernel_sweep" and rec["sizes"] == [64, 128] and rec["batches"] == [1, 3]
    by = {(r["format"], r["K"], r["M"]): r for r in rec["rows"]}
    assert len(by) == 8
    for m in (1, 3):
        skipped = by[("int4_weight_only(g128)", 64, m)]  # 64 is not a multiple of the group size
        assert skipped["status"] == "skipped" and "group_size=128" in skipped["reason"]
        for key in (("int8_weight_only", 64, m), ("int8_weight_only", 128, m), ("int4_weight_only(g128)", 128, m)):
            r = by[key]
            assert r["status"] == "ok" and r["ms"] > 0 and r["dense_ms"] > 0
            assert r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"])
            layer = layer_type_for(parse_recipe(formats[key[0]])).from_linear(torch.nn.Linear(key[1], key[1]))
            assert r["path"] in layer.paths(torch.device("cpu"), torch.float32)
            assert 0 < r["layer_bytes"] < r["dense_layer_bytes"]
    with pytest.raises(ValueError, match="sizes"):
        run_kernel_sweep([], [1])
    with pytest.raises(ValueError, match="budget_s"):
        run_kernel_sweep([64], [1], budget_s=0)
