"""Statistics over seeds: mean ± sample std, and a paired confidence interval of the change vs a baseline.

Seeds are the unit of evidence. A variant is compared with the baseline seed by seed (same seed:
same data order and, where the architecture allows, the same initial weights of shared parts):
for every seed both finished, the percentage change ``100 (v_s - b_s) / |b_s|``; the interval is the
Student t-interval of the mean of these paired changes. scipy is not a dependency: the t quantile
comes from a table (df 1..30) and a Cornish-Fisher expansion beyond, accurate to 1e-3 there.
A percentile bootstrap of the same mean is available as an alternative (`bootstrap_ci`).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

# Two-sided 95 %: the 0.975 quantile of Student's t for df = 1..30.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975  # Cornish-Fisher expansion of t around the normal quantile
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample std); None where undefined (no values; std of a single value)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass(frozen=True)
class PairedChange:
    """The change of a variant vs the baseline in percent, over the seeds both have."""

    seeds: tuple[int, ...]  # seeds with a finite value for both
    changes: tuple[float, ...]  # per seed: 100 (v - b) / |b|
    mean: float | None  # mean of `changes`
    ci95: tuple[float, float] | None  # t-interval of `mean`; None with fewer than 2 seeds

    @property
    def n(self) -> int:
        return len(self.changes)

    @property
    def distinguishable(self) -> bool | None:
        """True when the interval excludes 0 (the difference is larger than seed noise); None without one."""
        if self.ci95 is None:
            return None
        return self.ci95[0] > 0 or self.ci95[1] < 0


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """95 % Student t-interval of the mean of `values`; None with fewer than 2 values."""
    if len(values) < 2:
        return None
    m, sd = statistics.fmean(values), statistics.stdev(values)
    half = t_quantile_975(len(values) - 1) * sd / math.sqrt(len(values))
    return (m - half, m + half)


def bootstrap_ci(values: list[float], n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float] | None:
    """95 % percentile-bootstrap interval of the mean of `values`; None with fewer than 2 values."""
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(n_resamples))
    return (means[int(0.025 * (n_resamples - 1))], means[int(math.ceil(0.975 * (n_resamples - 1)))])


def paired_change(variant: dict[int, float], baseline: dict[int, float], method: str = "t") -> PairedChange:
    """Percentage change of `variant` vs `baseline` (both {seed: final metric}), paired by seed."""
    seeds = tuple(sorted(s for s in variant if s in baseline and baseline[s] != 0
                         and math.isfinite(variant[s]) and math.isfinite(baseline[s])))
    changes = tuple(100.0 * (variant[s] - baseline[s]) / abs(baseline[s]) for s in seeds)
    if method not in ("t", "bootstrap"):
        raise ValueError(f"unknown interval method {method!r}; accepted: t, bootstrap")
    ci = t_interval(list(changes)) if method == "t" else bootstrap_ci(list(changes))
    return PairedChange(seeds, changes, statistics.fmean(changes) if changes else None, ci)
