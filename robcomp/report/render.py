"""Render a study directory's report from its ``results.jsonl`` alone: ``report.md``,
``report.html`` (self-contained) and ``plots/*.png``.

The last ``study_spec`` header in the results file says which experiments (sections) the report
has and which points belong to them; point records are matched by ``point_id``. Benchmark JSON
files in ``DIR/bench/`` (put there by ``robcomp report DIR --bench FILE.json``) or at
``DIR/bench.json`` fill the hardware efficiency section.
"""
from __future__ import annotations

import os
from pathlib import Path

from robcomp.report.bench import bench_rows, is_baseline, load_bench, study_hardware_rows
from robcomp.report.findings import Section, analyse
from robcomp.report.html import render_html
from robcomp.report.markdown import format_table, summary_rows
from robcomp.report.plots import plot_hardware, plot_section
from robcomp._io import write_text_atomic
from robcomp.report.results import STUDY_RECORD, read_records
from robcomp.report.sweep import plot_sweep, sweep_finding, sweep_record, sweep_table

__all__ = ["render_report", "summary_text", "bench_files", "split_records"]

def split_records(records: list[dict]) -> tuple[dict | None, list[dict]]:
    """``(last spec header or None, point records deduplicated by point_id, first kept)``."""
    headers = [r for r in records if r.get("type") == STUDY_RECORD]
    seen, points = set(), []
    for r in records:
        if r.get("type") == STUDY_RECORD:
            continue
        pid = r.get("point_id")
        if pid is not None:
            if pid in seen:
                continue
            seen.add(pid)
        points.append(r)
    return (headers[-1]["spec"] if headers else None), points


def bench_files(directory: Path) -> list[Path]:
    files = sorted((directory / "bench").glob("*.json")) if (directory / "bench").is_dir() else []
    if (directory / "bench.json").is_file():
        files.append(directory / "bench.json")
    return files


def _fmt(v, digits=3, pct=False) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if pct else f"{v:.{digits}g}"


def _speedup(v: float) -> str:
    """Two decimals, but a large slowdown keeps two significant digits (0.0012, never 0.00)."""
    return f"{v:.2f}" if v >= 0.1 else f"{v:.2g}"


def _study_rows(records: list[dict]) -> list[dict]:
    """The study's hardware rows, per base (how the dense parent was trained) when the efficiency
    points have more than one: each row named with its base, its speedup against the dense model of
    that base."""
    bases = list(dict.fromkeys(r.get("base") for r in records if r.get("kind") == "efficiency"))
    if len(bases) <= 1:
        return study_hardware_rows(records)
    rows = []
    for base in bases:
        for row in study_hardware_rows([r for r in records if r.get("base") == base]):
            name, sep, rest = row["name"].rpartition(" @ batch ")
            row["name"] = f"{name} ({base} base){sep}{rest}" if sep else f"{row['name']} ({base} base)"
            rows.append(row)
    return rows


def _hardware(records: list[dict], directory: Path, plots: Path,
              sweep: dict | None = None) -> tuple[Section, Path | None, Path | None]:
    """The hardware section, its bandwidth plot and the kernel sweep's plot (``sweep``: the run's
    kernel_sweep record, robcomp.evaluation.kernel_sweep)."""
    study = _study_rows(records)
    rows_b = []
    notes = []
    for f in bench_files(directory):
        try:
            rows_b += bench_rows(load_bench(f), source=f.name)
        except ValueError as e:
            notes.append(f"skipped {f.name}: {e}")
    head = ["benchmark", "device", "impl", "shape / batch", "ms", "speedup vs", "GB/s", "TFLOP/s", "% peak BW",
            "% peak FLOP/s", "peak"]

    def row(r, shape):
        return [r["name"], r["device"], r.get("impl", ""), shape, _fmt(r["ms"], 4),
                "-" if r["speedup"] is None else f"{_speedup(r['speedup'])}x {r.get('speedup_vs') or ''}".strip(),
                _fmt(r["gbps"]), _fmt(r["tflops"]), _fmt(r["bw_pct"], pct=True) if r["bw_pct"] is not None else
                ("peak unknown" if r["peak"] == "peak unknown" else "-"),
                _fmt(r["compute_pct"], pct=True) if r["compute_pct"] is not None else
                ("peak unknown" if r["peak"] == "peak unknown" else "-"), r["peak"]]
    tables = [sweep_table(sweep)] if sweep else []
    if study:
        tables.append(("From the study's efficiency points (first seed): time per forward pass at each batch size, "
                       "speedup vs the dense model timed in the same run, bytes moved per call (stored weights + "
                       "fp32 inputs and logits), achieved GB/s and TFLOP/s (2·MACs·batch / time).", head,
                       [row(r, f"batch {r['batch']}") for r in study]))
    if rows_b:
        tables.append(("From pytest-benchmark JSON (" + ", ".join(sorted({r['source'] for r in rows_b})) + ").",
                       head + ["group"], [row(r, r["shape"]) + [r["group"]] for r in rows_b]))
    plot = plot_hardware(rows_b or study, plots / "hardware.png") if (rows_b or study) else None
    if rows_b:
        # the baseline timed against itself (speedup 1 by construction) is no candidate
        best = max((r for r in rows_b if r["speedup"] is not None and not is_baseline(r)),
                   key=lambda r: r["speedup"], default=None)
        known = [r for r in rows_b if r["bw_pct"] is not None]
        finding = (f"{len(rows_b)} benchmarks" + (f"; best kernel speedup {_speedup(best['speedup'])}x ({best['name']})"
                                                   if best else "")
                   + (f"; highest bandwidth {max(r['bw_pct'] for r in known):.0f}% of peak" if known else
                      "; device peak unknown, so no roofline percentage") + ".")
    elif study:
        dev = study[0]["device"]
        # whole-model speedups are the Efficiency section's (mean over seeds); not repeated here as a
        # second, first-seed-only "best speedup"
        best = max(study, key=lambda r: r["gbps"] or 0)
        finding = (f"No benchmark JSON folded in (run 'robcomp bench', then 'robcomp report DIR --bench FILE.json'); "
                   f"from the study's first-seed timings on {dev} (device peak unknown, so no roofline %): highest "
                   f"achieved bandwidth {best['gbps']:.3g} GB/s ({best['name']}); whole-model speedups are in the "
                   "Efficiency section.")
    else:
        finding = "No timing available."
    if sweep:
        finding = sweep_finding(sweep) + " " + finding
    sweep_png = plot_sweep(sweep, plots / "kernel_sweep.png") if sweep else None
    sec = Section("hardware", "Hardware efficiency", "Where do the compressed kernels stand against the hardware?",
                  finding, "hardware", None, [], notes)
    sec.tables = tables  # tuples are fine for the writers below
    return sec, plot, sweep_png


def summary_text(records: list[dict]) -> str:
    """The console summary: one row per model of the efficiency experiment (first seed) — recipe,
    parameters, bytes, clean and robust accuracy per attack, latency and throughput — then the
    findings."""
    spec, points = split_records(records)
    ok = [r for r in points if r.get("status", "ok") == "ok" and "clean_accuracy" in r]
    eff = [r for r in ok if r.get("kind") == "efficiency"] or ok
    if eff and "seed" in eff[0]:
        s0 = min(r["seed"] for r in eff)
        eff = [r for r in eff if r["seed"] == s0]
    head, rows = summary_rows(eff)
    out = [format_table(head, rows)] if rows else ["(no finished point)"]
    if spec:
        ids = _point_ids(spec)
        for s in analyse(spec, points, ids):
            out.append(f"\n[{s.title}] {s.finding}")
    return "\n".join(out)


def _point_ids(spec: dict) -> set[str] | None:
    from robcomp.study.spec import spec_from_dict

    try:
        return {p.id for p in spec_from_dict(spec).points()}
    except (ValueError, TypeError, KeyError):
        return None


def _tables(section) -> list[tuple[str, list, list]]:
    return [(t.caption, t.head, t.rows) if hasattr(t, "caption") else t for t in section.tables]


def render_report(directory: str | os.PathLike, records: list[dict] | None = None) -> list[Path]:
    """Write report.md, report.html and plots/*.png into ``directory``; return their paths."""
    directory = Path(directory)
    if records is None:
        records = read_records(directory / "results.jsonl", tolerate_partial_last_line=True)
    spec, points = split_records(records)
    plots = directory / "plots"
    plots.mkdir(exist_ok=True)
    ok = [r for r in points if r.get("status", "ok") == "ok" and "clean_accuracy" in r]
    env = next((r["env"] for r in ok if r.get("env")), {})
    title = f"robcomp study: {spec['name']}" if spec else "robcomp report"
    meta = []
    if env:
        meta.append(f"Measured on {env.get('device_name')} ({env.get('device')}, {env.get('cpu_count')} CPUs, "
                    f"{env.get('torch_threads')} torch threads), torch {env.get('torch')}, triton {env.get('triton')}, "
                    f"robcomp {env.get('robcomp')}.")
    sections: list[Section] = []
    if spec:
        ids = _point_ids(spec)
        n_spec = len(ids) if ids is not None else None
        n_done = sum(1 for r in points if ids is None or r.get("point_id") in ids)
        meta.append(f"{spec.get('description', '')}")
        meta.append(f"Points: {n_done} of {n_spec if n_spec is not None else '?'} finished; seeds "
                    f"{', '.join(map(str, spec['seeds']))}; training {spec['train']['epochs']} epochs "
                    f"(adversarial: PGD-{spec['train']['pgd_steps']} at eps {spec['train']['eps']:g}); fine-tuning "
                    f"{spec['finetune']['epochs']} epochs; attacks {', '.join(spec['attacks'])}.")
        meta.append(f"Conventions: robust accuracy = worst case over the attacks at L∞ eps {spec['headline_eps']:g} "
                    "(an example counts only if classified correctly clean and under every attack); values are "
                    "mean ± std over seeds; drops are measured per seed against the dense parent of the same seed; "
                    f"critical ratio = first tested ratio whose mean drop exceeds {100 * spec['critical_drop']:g} "
                    "points. Regimes: post-training (no retraining), fine-tuned (naive, clean loss), adversarially "
                    "fine-tuned (PGD).")
        sections = analyse(spec, points, ids)
    hw, hw_plot, sweep_png = _hardware(ok, directory, plots, sweep_record(points))
    rendered = []
    for s in sections:
        png = plot_section(s.plot, plots / f"{s.id}.png") if s.plot else None
        rendered.append({"id": s.id, "title": s.title, "question": s.question, "finding": s.finding, "plot": png,
                         "tables": _tables(s), "notes": s.notes})
    rendered.append({"id": "hardware", "title": hw.title, "question": hw.question, "finding": hw.finding,
                     "plot": sweep_png, "plots": [hw_plot] if sweep_png and hw_plot else [],
                     "tables": _tables(hw), "notes": hw.notes})
    if not sweep_png:
        rendered[-1]["plot"] = hw_plot
    head, rows = summary_rows(ok, extra=True)
    flags = sorted({f"{r.get('model', '?')}: {f}" for r in ok for f in r.get("sanity_flags", [])})
    all_notes = ["Accuracy columns are percentages of the test set; `bytes x` is dense bytes / stored bytes (below 1: "
                 "the model stores more than the dense one, e.g. masks); `nonzero x` is dense / non-zero weights; "
                 "latencies are medians (and 90th percentiles) over repeated forward passes."]
    if flags:
        all_notes.append("Sanity flags (see docs/evaluation.md): " + "; ".join(flags))
    else:
        all_notes.append("No sanity flag raised.")
    rendered.append({"id": "all-results", "title": "All results", "question": "", "finding": "", "plot": None,
                     "tables": [("One row per point (model, training, recipe, regime, seed).", head, rows)],
                     "notes": all_notes})
    findings = [(s["id"], s["title"], s["finding"]) for s in rendered if s["finding"] and s["id"] != "all-results"]

    md = [f"# {title}", ""] + [f"{m}  " for m in meta if m] + [""]
    if findings:
        md += ["## Findings", ""] + [f"- **{t}**: {f}" for _, t, f in findings] + [""]
    for s in rendered:
        md += [f"## {s['title']}", ""]
        if s["question"]:
            md += [f"*{s['question']}*", ""]
        if s["finding"]:
            md += [f"**Finding:** {s['finding']}", ""]
        for png in [s["plot"]] + s.get("plots", []):
            if png:
                md += [f"![{s['title']}](plots/{Path(png).name})", ""]
        for caption, h, rws in s["tables"]:
            md += [caption, "", format_table(h, rws, markdown=True), ""]
        md += [f"{n}" for n in s["notes"]] + ([""] if s["notes"] else [])
    paths = []
    write_text_atomic(directory / "report.md", "\n".join(md))
    paths.append(directory / "report.md")
    write_text_atomic(directory / "report.html", render_html(title, [m for m in meta if m], findings, rendered))
    paths.append(directory / "report.html")
    paths += sorted(p for s in rendered for p in [s["plot"]] + s.get("plots", []) if p)
    return paths
