"""``results.jsonl``: one JSON object per line, appended atomically.

Each append rewrites the file into a temporary sibling and renames it over the original, so a
reader (or a crash) sees either the old file or the new one, never half a line. A last line that
is not valid JSON (a crash of a writer that appended in place, a truncated copy) is the one
damage a crash can cause: readers asked to tolerate it skip it, and the next append drops it.
Any other bad line is an error naming the file and line number.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from robcomp._io import append_text_atomic

__all__ = ["append_record", "read_records", "STUDY_RECORD"]

#: ``type`` of the header record that stores the study spec in results.jsonl
STUDY_RECORD = "study_spec"


def _parse(path: Path, text: str, tolerate_partial_last_line: bool) -> tuple[list[dict], int]:
    """Records and the character offset where the valid part of ``text`` ends."""
    records, end, offset = [], 0, 0
    lines = text.splitlines(keepends=True)
    for lineno, line in enumerate(lines, 1):
        offset += len(line)
        if not line.strip():
            end = offset
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_partial_last_line and lineno == len(lines):
                warnings.warn(f"{path}:{lineno}: ignoring a partial last line ({len(line)} characters; "
                              "a writer was interrupted); it is dropped at the next append", stacklevel=3)
                break
            raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg} at column {e.colno}): repair or "
                             "delete that line; every other line holds one finished result") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno} holds a JSON {type(record).__name__}, not a result record (an object)")
        records.append(record)
        end = offset
    return records, end


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one line; a partial last line left by an interrupted writer is dropped."""
    path = Path(path)

    def finished_lines(old: str) -> str:
        old = old[:_parse(path, old, tolerate_partial_last_line=True)[1]]
        return old + "\n" if old and not old.endswith("\n") else old

    append_text_atomic(path, json.dumps(record, sort_keys=True) + "\n", keep=finished_lines)


def read_records(path: str | os.PathLike, *, tolerate_partial_last_line: bool = False) -> list[dict]:
    """Records of a results file, in file order. ``tolerate_partial_last_line`` skips (with a
    warning) a last line that is not valid JSON; any other bad line raises ValueError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}")
    return _parse(path, path.read_text(encoding="utf-8"), tolerate_partial_last_line)[0]
