"""The statistics a reader needs before trusting a difference in a report table.

- Runs that differ only by their training seed: the mean and the sample standard deviation
  (n - 1) over the seeds, and the standard error of that mean from lm-eval's per-run
  standard errors, sqrt(sum SE_i^2) / k (the runs' item samples are independent estimates).
- A mean over languages (the avg, high and low columns): SE sqrt(sum SE_l^2) / L.
- Two models on the same items: the exact McNemar test (two-sided binomial test on the items
  where exactly one of them is right) for 0/1 scores, and a paired bootstrap over items of
  the difference of the means, resampled within each language when several are averaged.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from fractions import Fraction

RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Stat:
    """A table cell: the mean over k runs (k = 1: one run), their sd and the mean's SE."""

    mean: float
    sd: float | None = None  # None for one run
    se: float | None = None  # None when lm-eval gave no standard error
    k: int = 1


def summarise(values: list[float], ses: list[float | None]) -> Stat:
    return Stat(sum(values) / len(values), statistics.stdev(values) if len(values) > 1 else None,
                se_of_mean(ses), len(values))


def se_of_mean(ses: list[float | None]) -> float | None:
    """The standard error of the mean of len(ses) independent estimates with these SEs."""
    if not ses or any(s is None for s in ses):
        return None
    return math.sqrt(sum(s * s for s in ses)) / len(ses)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b items only the first model gets right, c only the
    second; under no difference each of the b + c discordant items goes either way with 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


@dataclass(frozen=True)
class Paired:
    """first - second on the same items: the difference, its bootstrap CI, the exact McNemar
    p-value (0/1 scores of one run each, else None), and the counts it rests on."""

    diff: float
    low: float
    high: float
    items: int
    p: float | None = None
    b: int | None = None  # items only the first gets right
    c: int | None = None  # items only the second gets right


def paired_bootstrap(strata: list[list[float]], resamples: int = RESAMPLES, level: float = LEVEL,
                     seed: int = 0) -> tuple[float, float, float]:
    """(mean difference, CI low, CI high) of the mean over strata of each stratum's mean
    per-item difference; items are resampled with replacement within each stratum (a
    language keeps its item count), the CI is the percentile interval."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = [np.asarray(s, dtype=float) for s in strata]
    diff = float(np.mean([a.mean() for a in arrays]))
    total = np.zeros(resamples)
    for a in arrays:
        chunk = max(1, 2_000_000 // max(1, a.size))  # bounded memory for long test sets
        means = [a[rng.integers(0, a.size, size=(min(chunk, resamples - i), a.size))].mean(axis=1)
                 for i in range(0, resamples, chunk)]
        total += np.concatenate(means)
    total /= len(arrays)
    tail = (1 - level) / 2
    low, high = np.quantile(total, [tail, 1 - tail])
    return diff, float(low), float(high)


def compare_items(first: list[dict[str, float]], second: list[dict[str, float]], one_run_each: bool,
                  resamples: int = RESAMPLES) -> Paired:
    """Per stratum (language) the per-item scores of two models keyed by item: each item's
    score is the mean over the model's runs (seeds) before the difference is taken. McNemar
    needs one run of each model (an item's mean over seeds is not a 0/1 outcome) and one
    stratum."""
    strata, b, c, binary = [], 0, 0, True
    for x, y in zip(first, second):
        keys = sorted(x)
        strata.append([x[k] - y[k] for k in keys])
        for k in keys:
            if x[k] not in (0, 1) or y[k] not in (0, 1):
                binary = False
            b += x[k] == 1 and y[k] == 0
            c += x[k] == 0 and y[k] == 1
    diff, low, high = paired_bootstrap(strata, resamples)
    items = sum(len(s) for s in strata)
    if binary and one_run_each and len(strata) == 1:
        return Paired(diff, low, high, items, mcnemar_exact(b, c), b, c)
    return Paired(diff, low, high, items)
