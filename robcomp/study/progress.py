"""Study progress on stderr: a tqdm bar on a terminal, plain lines (one per point) otherwise,
so a log file gets readable lines instead of carriage-return redraws."""
from __future__ import annotations

import sys
import time

__all__ = ["study_progress", "progress_mode", "LineProgress"]


class LineProgress:
    """The subset of tqdm the study uses, printing ``desc [done/total] item (elapsed)`` lines."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", stream=None):
        self.total, self.n, self.desc = total, initial, desc
        self.stream = stream if stream is not None else sys.stderr
        self._item = ""
        self._t0 = time.perf_counter()
        self._print(f"{initial} of {total} points already done")

    def _print(self, text: str) -> None:
        print(f"{self.desc} [{self.n}/{self.total}] {text}", file=self.stream, flush=True)

    def set_postfix_str(self, text: str) -> None:
        self._item = text

    def update(self, n: int = 1) -> None:
        self.n += n
        self._print(f"{self._item} done ({time.perf_counter() - self._t0:.0f} s)")

    def close(self) -> None:
        pass


def study_progress(total: int, initial: int, desc: str, mode: str):
    """``mode``: "bar" (tqdm), "lines" (:class:`LineProgress`) or "off"."""
    from tqdm.auto import tqdm

    if mode == "lines":
        return LineProgress(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, disable=mode == "off", unit="point")


def progress_mode(enabled: bool, stream=None) -> str:
    """"off" when disabled, "bar" when ``stream`` (default stderr) is a terminal, else "lines"."""
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return "off"
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"
