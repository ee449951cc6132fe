"""Is a difference between two means real at this number of seeds? Paired t-tests over seeds.

Study points share seeds (a compressed point and its dense parent, two recipes on the same base),
so differences are paired by seed and tested with a two-sided paired t-test (``scipy.stats``,
installed with scikit-learn). With one seed nothing can be tested and the text says so. A
difference that is the same for every seed (zero spread) is exact, not noise: significant when
non-zero.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

__all__ = ["Comparison", "compare_paired", "compare_to_threshold", "ALPHA"]

ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    mean_diff: float  # mean over seeds of (a - b), or of (value - threshold)
    n: int            # paired seeds
    p: float | None   # None: not testable (fewer than 2 seeds)
    test: str

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA

    def text(self) -> str:
        """E.g. "significant: paired t-test over 3 seeds, p = 0.012" or "no significant difference at
        3 seeds (paired t-test, p = 0.41)"."""
        if self.p is None:
            return f"not testable with {self.n} seed{'s' * (self.n != 1)}"
        if self.significant:
            return f"significant: {self.test} over {self.n} seeds, p = {self.p:.2g}"
        return f"no significant difference at {self.n} seeds ({self.test}, p = {self.p:.2g})"


def _one_sample(diffs: list[float], alternative: str, test: str) -> Comparison:
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else float("nan")
    if n < 2:
        return Comparison(mean, n, None, test)
    if statistics.pstdev(diffs) < 1e-12:  # identical for every seed: exact, not noise
        exact = mean > 0 if alternative == "greater" else abs(mean) > 1e-12
        return Comparison(mean, n, 0.0 if exact else 1.0, test)
    from scipy import stats

    p = float(stats.ttest_1samp(diffs, 0.0, alternative=alternative).pvalue)
    return Comparison(mean, n, p if math.isfinite(p) else None, test)


def compare_paired(a: dict, b: dict) -> Comparison:
    """``a`` and ``b`` map seed -> value; the seeds both have are paired (two-sided test)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]
    return _one_sample(diffs, "two-sided", "paired t-test")


def compare_to_threshold(values: list[float], threshold: float) -> Comparison:
    """Is the mean of per-seed ``values`` above ``threshold``? (one-sided one-sample t-test)"""
    return _one_sample([v - threshold for v in values if v is not None], "greater", "one-sided t-test")
