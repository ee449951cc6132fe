"""Summary table and ``report.md`` from evaluation records."""
from __future__ import annotations

from robcomp._io import write_text_atomic

__all__ = ["summary_rows", "format_table", "render_markdown"]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _attack_names(records: list[dict]) -> list[str]:
    names: list[str] = []
    for r in records:
        for name in r.get("robust_accuracy", {}):
            if name not in names:
                names.append(name)
    return names


def summary_rows(records: list[dict], *, extra: bool = False) -> tuple[list[str], list[list[str]]]:
    """One row per record: model, training, recipe (and regime where recorded), params, bytes,
    the two compression ratios (bytes and non-zero weights, never merged into one), clean and robust accuracy per attack, latency and throughput per batch size.
    ``extra`` adds the experiment and seed columns of study records."""
    attacks = _attack_names(records)
    batch_sizes = sorted({int(b) for r in records for b in r.get("latency", {})})
    has_regime = any("regime" in r for r in records)
    head = (["experiment"] if extra else []) + ["model", "training", "recipe"] + (["regime"] if has_regime else [])
    head += (["seed"] if extra else []) + ["params", "bytes", "bytes x", "nonzero x", "clean %"]
    head += [f"{a} %" for a in attacks]
    for b in batch_sizes:
        head += [f"ms @{b}", f"p90 ms @{b}", f"samples/s @{b}"]
    rows = []
    for r in records:
        model = r.get("model_name", r.get("model") or "-")
        if r.get("width") is not None:
            model = f"{model}-{r['width']}"
        row = ([r.get("experiment", "-")] if extra else []) + [model, r.get("training", "-"), r.get("recipe", "-")]
        row += [r.get("regime", "-")] if has_regime else []
        row += [str(r.get("seed", "-"))] if extra else []
        row += [str(r["parameters"]), str(r["model_bytes"]),
                _ratio(r.get("bytes_ratio")), _ratio(r.get("nonzero_ratio")), _pct(r["clean_accuracy"])]
        row += [_pct(r["robust_accuracy"].get(a)) for a in attacks]
        for b in batch_sizes:
            lat = r.get("latency", {}).get(str(b))
            row += ["-", "-", "-"] if lat is None else [f"{lat['median_ms']:.3f}", f"{lat['p90_ms']:.3f}",
                                                      f"{lat['throughput_per_s']:.0f}"]
        rows.append(row)
    return head, rows


def format_table(head: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def render_markdown(records: list[dict], path, *, title: str = "robcomp report", notes: list[str] = ()) -> str:
    head, rows = summary_rows(records)
    env = records[0]["env"] if records else {}
    lines = [f"# {title}", ""]
    if env:
        lines += [f"Measured on {env.get('device_name')} ({env.get('device')}, {env.get('cpu_count')} CPUs, "
                  f"{env.get('torch_threads')} torch threads), torch {env.get('torch')}, triton {env.get('triton')}, "
                  f"robcomp {env.get('robcomp')}, {env.get('date')}.", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "Accuracy columns are percentages of the test set; a robust example is one classified correctly "
              "clean and under the attack. `bytes x` is dense model bytes / stored bytes (below 1: the compressed "
              "model stores more, e.g. masks); `nonzero x` is dense / non-zero weights the model computes with. "
              "Latencies are medians "
              "(and 90th percentiles) over repeated forward passes on random inputs.", "",
              format_table(head, rows, markdown=True), ""]
    grads = {k: v for r in records for k, v in r.get("input_gradients", {}).items() if v != "exact"}
    if grads:
        lines += ["Layers whose input gradient is a straight-through estimate: " + ", ".join(sorted(grads)), ""]
    text = "\n".join(lines)
    write_text_atomic(path, text)
    return text
