"""Result records and the reports rendered from them (markdown, self-contained HTML, PNG plots)."""
from robcomp.report.markdown import format_table, render_markdown, summary_rows
from robcomp._io import write_text_atomic
from robcomp.report.results import append_record, read_records


def render_report(directory, records=None):
    """Render ``report.md``, ``report.html`` and ``plots/`` of a study directory (lazy import: matplotlib)."""
    from robcomp.report.render import render_report as _render

    return _render(directory, records)


__all__ = ["append_record", "read_records", "write_text_atomic", "render_markdown", "summary_rows", "format_table",
           "render_report"]
