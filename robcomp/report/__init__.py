"""Result records and the reports rendered from them."""
from robcomp.report.markdown import format_table, render_markdown, summary_rows
from robcomp.report.results import append_record, read_records, write_text_atomic

__all__ = ["append_record", "read_records", "write_text_atomic", "render_markdown", "summary_rows", "format_table"]
