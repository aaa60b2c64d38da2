"""How sure a comparison is: the mean ± sample standard deviation of a config's seed reruns, and Welch's 95%
confidence interval of the difference between two configs' means (`report: {seeds: N}`, `tune.py compare`).

Student's t quantile is computed here (the regularized incomplete beta function, inverted by bisection): scipy is not
a dependency of the project.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import pandas as pd

LEVEL = 0.95  # of every confidence interval the tables and figures show
# The family tables' columns over a trial's seed reruns: how many have a test perplexity, the mean and sample sd of
# valid and test perplexity, and the values themselves (as text: "101.20 99.87 100.41", seed by seed).
SEED_COLUMNS = ["seeds", "valid_ppl_mean", "valid_ppl_sd", "valid_ppl_per_seed", "test_ppl_mean", "test_ppl_sd",
                "test_ppl_per_seed"]
PAIR_COLUMNS = ["dataset", "first", "second", "first_test_ppl", "second_test_ppl", "difference", "ci_low", "ci_high",
                "welch_df", "excludes_zero"]


def mean_sd(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1; NaN for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd


def mean_interval(values: list[float], level: float = LEVEL) -> tuple[float, float]:
    """The mean and the half-width of its confidence interval (t with n - 1 degrees of freedom)."""
    mean, sd = mean_sd(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t_quantile((1 + level) / 2, len(values) - 1) * sd / math.sqrt(len(values))


@dataclass(frozen=True)
class Welch:
    """mean(a) - mean(b), its confidence interval, and the Welch-Satterthwaite degrees of freedom."""

    difference: float
    low: float
    high: float
    df: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def welch(a: list[float], b: list[float], level: float = LEVEL) -> Welch:
    """Welch's interval for the difference of two means, variances not assumed equal (NaN with fewer than two
    values on a side)."""
    if len(a) < 2 or len(b) < 2:
        return Welch(mean_sd(a)[0] - mean_sd(b)[0], math.nan, math.nan, math.nan)
    (mean_a, sd_a), (mean_b, sd_b) = mean_sd(a), mean_sd(b)
    va, vb = sd_a ** 2 / len(a), sd_b ** 2 / len(b)  # the squared standard errors of the two means
    difference = mean_a - mean_b
    if va + vb == 0:  # both samples constant: no spread to put an interval on
        return Welch(difference, difference, difference, math.nan)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile((1 + level) / 2, df) * math.sqrt(va + vb)
    return Welch(difference, difference - half, difference + half, df)


def seed_pairs(seed_runs: pd.DataFrame) -> pd.DataFrame:
    """Every pair of configs of one dataset (rows of `seed_runs` grouped by dataset, experiment and family) with at
    least two seed runs each: `first` has the lower mean test perplexity, `difference` = second - first, with
    Welch's interval; PAIR_COLUMNS."""
    rows = []
    finished = seed_runs[seed_runs["test_ppl"].map(_finite).astype(bool)]  # (an empty object mask picks columns)
    for dataset, runs in finished.groupby("dataset", sort=True):
        samples = {f"{experiment}/{family}": group["test_ppl"].astype(float).tolist()
                   for (experiment, family), group in runs.groupby(["experiment", "family"], sort=False)}
        ranked = sorted((k for k, v in samples.items() if len(v) >= 2), key=lambda k: mean_sd(samples[k])[0])
        for first, second in combinations(ranked, 2):
            w = welch(samples[second], samples[first])
            rows.append({"dataset": dataset, "first": first, "second": second,
                         "first_test_ppl": mean_sd(samples[first])[0], "second_test_ppl": mean_sd(samples[second])[0],
                         "difference": w.difference, "ci_low": w.low, "ci_high": w.high, "welch_df": w.df,
                         "excludes_zero": w.excludes_zero})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def seed_statistics(seed_runs: pd.DataFrame) -> pd.DataFrame:
    """SEED_COLUMNS per rerun trial (the index: `of_trial`), over its reruns that have a finite test perplexity."""
    rows = {}
    scored = seed_runs[seed_runs["test_ppl"].map(_finite) & seed_runs["valid_ppl"].map(_finite)]
    for trial_id, runs in scored.sort_values("seed", kind="stable").groupby("of_trial", sort=False):
        row: dict = {"seeds": len(runs)}
        for split in ("valid", "test"):
            values = runs[f"{split}_ppl"].astype(float).tolist()
            row[f"{split}_ppl_mean"], row[f"{split}_ppl_sd"] = mean_sd(values)
            row[f"{split}_ppl_per_seed"] = " ".join(f"{v:.2f}" for v in values)
        rows[trial_id] = row
    return pd.DataFrame.from_dict(rows, orient="index", columns=SEED_COLUMNS)


def mean_sd_text(mean: float, sd: float, per_seed: str) -> str:
    """E.g. "100.49 ± 0.67 (101.20 99.87 100.41)"."""
    return f"{mean:.2f} ± {sd:.2f} ({per_seed})"


# -- Student's t distribution --------------------------------------------------------------------------------


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` (> 0, not necessarily whole) degrees of freedom."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile: p must be in (0, 1) and df > 0 (got p={p}, df={df})")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    high = 1.0
    while t_cdf(high, df) < p:
        high *= 2
    low = 0.0
    for _ in range(200):  # bisection: the interval halves each step, down to float precision
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2, 0.5)  # P(T > |t|)
    return 1 - tail if t >= 0 else tail


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), by its continued fraction (Numerical Recipes' betacf, evaluated with Lentz's method)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point: use the symmetry
        return 1 - regularized_beta(1 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * fraction


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
