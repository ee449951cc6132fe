"""``results.jsonl``: one JSON record per line, appended atomically.

Each append rewrites the file into a temporary sibling and renames it over the original, so a
reader (or a crash) sees either the old file or the new one, never half a line.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["append_record", "read_records", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def append_record(path: str | os.PathLike, record: dict) -> None:
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text_atomic(path, old + json.dumps(record, sort_keys=True) + "\n")


def read_records(path: str | os.PathLike, *, tolerate_partial_last_line: bool = False) -> list[dict]:
    """Records of a results file, in file order. ``tolerate_partial_last_line`` drops a last line
    that is not valid JSON (a file appended to by something other than :func:`append_record`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if tolerate_partial_last_line and lineno == len(lines):
                    break
                raise ValueError(f"{path}:{lineno} is not valid JSON: {e}") from None
    return records
