"""What the multi-seed comparisons share: running jobs in parallel worker processes and comparing two arms over seeds.

Used by ``compare_fipo_dapo.py`` and ``long_reasoning_study.py``. Where two arms share their seeds (the same warm
start, prompts and order per seed) the design is paired, and the tests read it so: the per-seed differences, with
the paired t-test, the Wilcoxon signed-rank test and a percentile bootstrap CI of their mean (resampling seeds).
Unpaired comparisons keep Welch's t-test (unequal variances) and a bootstrap that resamples each arm on its own.
With one value per seed and arm, n = the number of seeds, so a handful of seeds detects only large effects.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import random
import statistics


def run_jobs(function, jobs: list[tuple], workers: int) -> list:
    """``[function(*job) for job in jobs]``, in ``workers`` spawned processes when ``workers`` > 1, in job order."""
    if workers <= 1:
        return [function(*job) for job in jobs]
    context = multiprocessing.get_context("spawn")  # fork would copy torch's threads and state
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(function, *zip(*jobs)))


def defined(values: list[float]) -> list[float]:
    """The values that are not NaN (e.g. the accuracy of full chains in a run that wrote none)."""
    return [v for v in values if v == v]


def mean_std(values: list[float], percent: bool = False) -> str:
    """Mean ± sample standard deviation over seeds, of the defined values (their count when some are not)."""
    kept = defined(values)
    if not kept:
        return "n/a"
    mean, std = statistics.mean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0
    text = f"{mean:.1%} ± {std:.1%}" if percent else f"{mean:+.3f} ± {std:.3f}"
    return text if len(kept) == len(values) else f"{text} (n = {len(kept)})"


def welch_t_test(a: list[float], b: list[float]) -> tuple[float, float]:
    """(t, two-sided p) of Welch's t-test for mean(a) != mean(b); (nan, nan) with fewer than 2 values or no spread."""
    if len(a) < 2 or len(b) < 2 or statistics.variance(a) + statistics.variance(b) == 0:
        return float("nan"), float("nan")
    from scipy import stats

    result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def bootstrap_ci(a: list[float], b: list[float], *, level: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(a) - mean(b), resampling the seeds of each arm independently."""
    rng = random.Random(seed)
    differences = sorted(statistics.mean(rng.choices(a, k=len(a))) - statistics.mean(rng.choices(b, k=len(b)))
                         for _ in range(resamples))
    tail = (1 - level) / 2
    return differences[int(tail * resamples)], differences[min(resamples - 1, math.ceil((1 - tail) * resamples) - 1)]


def significance_row(label: str, a: list[float], b: list[float], *, percent: bool = False) -> str:
    """A markdown table row: the difference in means, its 95 % bootstrap CI, Welch's t and p, and the verdict (over
    the defined values)."""
    a, b = defined(a), defined(b)
    if not a or not b:
        return f"| {label} | n/a | n/a | n/a | n/a | n/a |"
    difference = statistics.mean(a) - statistics.mean(b)
    low, high = bootstrap_ci(a, b)
    t, p = welch_t_test(a, b)
    show = (lambda v: f"{100 * v:+.1f} pt") if percent else (lambda v: f"{v:+.3f}")
    verdict = "yes" if p < 0.05 else "no" if p == p else "n/a"  # p == p: not nan
    return f"| {label} | {show(difference)} | [{show(low)}, {show(high)}] | {t:.2f} | {p:.3f} | {verdict} |"


def paired_t_test(differences: list[float]) -> tuple[float, float]:
    """(t, two-sided p) of the paired t-test: t = mean(d) / (sd(d) / sqrt(n)) on n - 1 degrees of freedom; (nan, nan)
    with fewer than 2 pairs or no spread."""
    n = len(differences)
    if n < 2 or statistics.stdev(differences) == 0:
        return float("nan"), float("nan")
    from scipy import stats

    t = statistics.mean(differences) / (statistics.stdev(differences) / math.sqrt(n))
    return t, float(2 * stats.t.sf(abs(t), n - 1))


def wilcoxon_p(differences: list[float]) -> float:
    """Two-sided p of the Wilcoxon signed-rank test (zero differences dropped; exact for small samples without ties,
    scipy's rule); nan when no difference is non-zero."""
    if not any(differences):
        return float("nan")
    from scipy import stats

    return float(stats.wilcoxon(differences).pvalue)


def paired_bootstrap_ci(differences: list[float], *, level: float = 0.95, resamples: int = 10_000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean per-seed difference, resampling seeds (each keeps both of its arms)."""
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(differences, k=len(differences))) for _ in range(resamples))
    tail = (1 - level) / 2
    return means[int(tail * resamples)], means[min(resamples - 1, math.ceil((1 - tail) * resamples) - 1)]


def paired_significance_row(label: str, a: dict, b: dict, *, percent: bool = False) -> str:
    """A markdown row for arms that share seeds (``{seed: value}`` each): the mean of the per-seed differences a - b
    over the seeds where both are defined, its paired bootstrap CI, the paired t-test, the Wilcoxon test, on how many
    seeds a is ahead, and the verdict (paired t at 5 %)."""
    differences = [a[seed] - b[seed] for seed in sorted(a.keys() & b.keys())
                   if a[seed] == a[seed] and b[seed] == b[seed]]  # both defined (not NaN)
    if not differences:
        return f"| {label} | n/a | 0 | n/a | n/a | n/a | n/a | n/a | n/a |"
    show = (lambda v: f"{100 * v:+.1f} pt") if percent else (lambda v: f"{v:+.3f}")
    low, high = paired_bootstrap_ci(differences)
    t, p = paired_t_test(differences)
    ahead = sum(d > 0 for d in differences)
    verdict = "yes" if p < 0.05 else "no" if p == p else "n/a"
    return (f"| {label} | {show(statistics.mean(differences))} | {len(differences)} | [{show(low)}, {show(high)}] | "
            f"{t:.2f} | {p:.3f} | {wilcoxon_p(differences):.3f} | {ahead}/{len(differences)} | {verdict} |")


PAIRED_HEADER = ("| quantity | mean difference | pairs | 95 % paired bootstrap CI | paired t | p (paired t) "
                 "| p (Wilcoxon) | ahead on | significant at 5 % (paired t)? |\n|---|---|---|---|---|---|---|---|---|")

SIGNIFICANCE_HEADER = ("| quantity | difference of means | 95 % bootstrap CI | Welch t | p (two-sided) "
                       "| significant at 5 %? |\n|---|---|---|---|---|---|")
