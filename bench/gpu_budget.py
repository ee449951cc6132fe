"""Time accounting of the GPU suite: one wall-clock budget split into phases that cannot starve
each other, and a record of every planned case that did not run.

The suite must fit one call of the device tool (10 minutes, with the machine's start inside a
15-minute session), so it plans its phases in priority order, each with a *share* of seconds.
A phase may use its own share plus whatever earlier phases left unused, but never the shares of
the phases after it: ``deadline = now + (budget left - shares of the later phases)``. A phase
checks its deadline before each case (cooperative); :func:`hard_deadline` also interrupts a case
that runs past it (``SIGALRM``, main thread only), for phases where a single case can hang on
compilation. What a phase did not reach is recorded by :meth:`Phase.skip`, never dropped.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Callable, Iterable


class PhaseTimeout(BaseException):
    """Raised inside a case that ran past its phase's hard deadline. A BaseException, like
    KeyboardInterrupt, so that a case's own ``except Exception`` (a failed check is recorded, not
    raised) does not turn the interruption into a failure."""


class Budget:
    """``total_s`` seconds from construction, split over the planned phases ``[(name, share_s)]``."""

    def __init__(self, total_s: float, plan: Iterable[tuple[str, float]] = (),
                 clock: Callable[[], float] = time.monotonic):
        if total_s < 0:
            raise ValueError(f"total_s must be >= 0 seconds, got {total_s}")
        self.clock = clock
        self.t0 = clock()
        self.total_s = float(total_s)
        self.plan = [(name, float(share)) for name, share in plan]
        names = [n for n, _ in self.plan]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        self.skipped: list[dict] = []
        self.phases: list[dict] = []  # name, share_s, granted_s, used_s, cases_run, cases_skipped

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def remaining(self) -> float:
        return max(0.0, self.total_s - self.elapsed())

    def exhausted(self) -> bool:
        return self.remaining() <= 0

    def reserved_after(self, name: str) -> float:
        """Seconds promised to the phases planned after ``name``."""
        names = [n for n, _ in self.plan]
        if name not in names:
            raise ValueError(f"phase {name!r} is not in the plan {names}")
        return sum(share for _, share in self.plan[names.index(name) + 1:])

    def phase(self, name: str) -> "Phase":
        granted = max(0.0, self.remaining() - self.reserved_after(name))
        share = dict(self.plan)[name]
        return Phase(self, name, share, granted)


class Phase:
    """One phase's deadline and its bookkeeping; a context manager that records its time used."""

    def __init__(self, budget: Budget, name: str, share_s: float, granted_s: float):
        self.budget, self.name = budget, name
        self.start = budget.clock()
        self.deadline = self.start + granted_s
        self.info = {"phase": name, "share_s": round(share_s, 1), "granted_s": round(granted_s, 1),
                     "used_s": None, "cases_run": 0, "cases_skipped": 0}
        budget.phases.append(self.info)

    def remaining(self) -> float:
        return max(0.0, self.deadline - self.budget.clock())

    def expired(self) -> bool:
        return self.remaining() <= 0

    def skip(self, what, reason: str = "time budget") -> None:
        self.budget.skipped.append({"phase": self.name, "what": what, "reason": reason})
        self.info["cases_skipped"] += 1

    def run(self, cases: list, run_one: Callable[[object], None], *, describe: Callable[[object], object] = str,
            on_skip: Callable[[object], None] | None = None,
            on_error: Callable[[object, Exception], None] | None = None, hard: bool = False) -> None:
        """``run_one(case)`` for each case while time is left; the rest are skipped (``on_skip(case)``
        lets the caller mark what a skipped case would have produced). An exception of a case goes
        to ``on_error(case, exc)`` (re-raised without one), so one broken case ends only itself.
        With ``hard`` a case still running at the deadline is interrupted and listed as skipped."""
        def skip(case, reason="time budget"):
            self.skip(describe(case), reason)
            if on_skip is not None:
                on_skip(case)

        for i, case in enumerate(cases):
            if self.expired():
                for rest in cases[i:]:
                    skip(rest)
                return
            try:
                with hard_deadline(self.remaining()) if hard else contextlib.nullcontext():
                    run_one(case)
            except PhaseTimeout:
                skip(case, "interrupted at the phase's hard time cap")
                for rest in cases[i + 1:]:
                    skip(rest)
                return
            except Exception as e:
                if on_error is None:
                    raise
                on_error(case, e)
            self.info["cases_run"] += 1

    def __enter__(self) -> "Phase":
        return self

    def __exit__(self, *exc) -> None:
        self.info["used_s"] = round(self.budget.clock() - self.start, 1)


@contextlib.contextmanager
def hard_deadline(seconds: float):
    """Raise :class:`PhaseTimeout` in the body once ``seconds`` have passed (``SIGALRM``). Outside
    the main thread, or where SIGALRM does not exist, the body runs uninterrupted."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return
    if seconds <= 0:
        raise PhaseTimeout("no time left")

    def on_alarm(signum, frame):
        raise PhaseTimeout(f"hard deadline of {seconds:.1f} s reached")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
