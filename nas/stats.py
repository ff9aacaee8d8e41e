"""Paired statistics for a verdict that holds: does an MoE beat its dense twin, over seeds, beyond noise?

A comparison is one pair of arms (an MoE and the dense model it is matched with, at equal FLOPs or latency)
trained with the same n seeds; seed i of both arms shares its recipe seed, so the same batch order (common
random numbers) and the gain of seed i is a paired difference. Inputs are per-image correctness on one
validation split, (n_seeds, n_images) booleans per arm; everything else derives from them.

- Gain: MoE accuracy minus dense accuracy, per seed; its mean and a Student t-interval over seeds, the
  spread that a rerun would see (at short budgets, seed-to-seed sd ~1.3 points on Fashion-MNIST).
- p-value: McNemar's exact test, mid-p, on the images one arm got right and the other wrong, summed over
  seeds. Chosen over a paired bootstrap over images because it is exact for the small discordant counts
  of a small val split, deterministic (no resampling seed: the same runs give the same p) and costs two
  counts. The mid-p version, because the exact test is conservative (Fagerland, Lydersen and Laake, 2013).
  It treats the n x N image pairs as independent, which the same images across seeds are not, so it is
  optimistic on its own; the t-interval carries the seed-to-seed spread and both must agree.
- Holm-Bonferroni over every pair of a study, so the more pairs are compared, the stronger each win must be.
- Verdict: `beats` when the interval lies above +margin and the Holm-adjusted p is below alpha; `loses`
  when it lies below -margin (same p condition); `ties` otherwise, including n=1 seed (no interval).
  `decided_by` names the test that made a `ties`: a tiny p_holm beside `ties` means the interval decided.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

VERDICTS = ("beats", "ties", "loses")


@dataclass(frozen=True)
class PairedResult:
    """One pair's comparison; accuracies and gains are fractions (0.013 = 1.3 points)."""

    name: str  # which pair, e.g. the MoE's architecture name
    cost: str  # what the arms are matched on: "flops", "latency", ...
    gains: tuple[float, ...]  # per seed, MoE minus dense accuracy
    gain_mean: float
    gain_sd: float  # sample sd over seeds (NaN for one seed)
    ci_low: float  # t-interval of the mean gain (-inf/inf for one seed: nothing known about the spread)
    ci_high: float
    confidence: float
    n_seeds: int
    n_images: int
    moe_only: int  # image-seed pairs the MoE got right and dense wrong
    dense_only: int  # and the other way round
    p_value: float  # McNemar mid-p, two-sided
    p_holm: float  # Holm-adjusted over the study's pairs (= p_value for a family of one)
    margin: float
    alpha: float
    verdict: str

    def to_dict(self) -> dict:
        """JSON-ready: non-finite numbers become None (JSON has no infinities)."""
        return {k: _json_number(v) for k, v in asdict(self).items()}


def _json_number(value):
    if isinstance(value, (list, tuple)):
        return [_json_number(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def t_interval(diffs: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student t-interval of the mean of paired differences. One value: (d, -inf, inf);
    no spread (all equal): (d, d, d)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.ndim != 1 or not len(diffs):
        raise ValueError(f"diffs must be a non-empty 1-D array, got shape {diffs.shape}")
    mean = float(diffs.mean())
    if len(diffs) == 1:
        return mean, -math.inf, math.inf
    sem = float(diffs.std(ddof=1)) / math.sqrt(len(diffs))
    if sem == 0:
        return mean, mean, mean
    from scipy import stats  # deferred: importing scipy sets process-wide warning filters (tests/test_search.py)

    low, high = stats.t.interval(confidence, len(diffs) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def mcnemar_midp(b: int, c: int) -> float:
    """Two-sided mid-p of McNemar's exact test from the discordant counts b and c: under no difference each
    discordant pair goes either way with probability 1/2. 1 when there is none."""
    n = b + c
    if n == 0:
        return 1.0
    low = min(b, c)  # the exact p doubles P(X <= low); the mid-p counts P(X = low) only half
    from scipy import stats  # deferred: importing scipy sets process-wide warning filters (tests/test_search.py)

    return float(min(1.0, 2 * stats.binom.cdf(low, n, 0.5) - stats.binom.pmf(low, n, 0.5)))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input's order: the i-th smallest of m is multiplied by
    m - i (i from 0), made non-decreasing in that order, capped at 1."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def verdict(ci_low: float, ci_high: float, p: float, *, margin: float = 0.0, alpha: float = 0.05) -> str:
    """`beats`, `loses` or `ties` (see the module docstring)."""
    if p < alpha and ci_low > margin:
        return "beats"
    if p < alpha and ci_high < -margin:
        return "loses"
    return "ties"


def decided_by(ci_low: float | None, ci_high: float | None, p: float, *, margin: float = 0.0,
               alpha: float = 0.05) -> str:
    """Which test made the verdict: "both" for `beats` and `loses` (each needs both); for `ties`, the one
    that did not clear ("interval": it holds the margin band although p_holm < alpha; "McNemar": p_holm >=
    alpha although the interval is clear of it; "both"; "one seed": no interval). None bounds: one seed."""
    if ci_low is None or ci_high is None or not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "one seed"
    interval_clear = ci_low > margin or ci_high < -margin
    p_clear = p < alpha
    if interval_clear and p_clear:
        return "both"
    return "interval" if p_clear else "McNemar" if interval_clear else "both"


def paired(moe_correct: np.ndarray, dense_correct: np.ndarray, *, name: str = "", cost: str = "flops",
           margin: float = 0.0, confidence: float = 0.95, alpha: float = 0.05) -> PairedResult:
    """One pair from per-image correctness, (n_seeds, n_images) booleans per arm, row i of both trained with
    seed i. Its `p_holm` is its own p; `holm_adjusted` adjusts a family of pairs."""
    moe, dense = (np.asarray(a, dtype=bool) for a in (moe_correct, dense_correct))
    if moe.ndim != 2 or moe.shape != dense.shape or not moe.size:
        raise ValueError(f"{name or 'pair'}: moe_correct and dense_correct must both be (n_seeds, n_images), "
                         f"got {moe.shape} and {dense.shape}")
    gains = moe.mean(1) - dense.mean(1)  # (n_seeds,)
    mean, low, high = t_interval(gains, confidence)
    b, c = int((moe & ~dense).sum()), int((~moe & dense).sum())
    p = mcnemar_midp(b, c)
    return PairedResult(
        name=name, cost=cost, gains=tuple(gains.tolist()), gain_mean=mean,
        gain_sd=float(gains.std(ddof=1)) if len(gains) > 1 else math.nan, ci_low=low, ci_high=high,
        confidence=confidence, n_seeds=len(gains), n_images=moe.shape[1], moe_only=b, dense_only=c, p_value=p,
        p_holm=p, margin=margin, alpha=alpha, verdict=verdict(low, high, p, margin=margin, alpha=alpha),
    )


def holm_adjusted(results: Sequence[PairedResult]) -> list[PairedResult]:
    """The pairs of one study with Holm-adjusted p-values and their verdicts redone on them."""
    adjusted = holm([r.p_value for r in results])
    return [replace(r, p_holm=float(p), verdict=verdict(r.ci_low, r.ci_high, float(p), margin=r.margin,
                                                        alpha=r.alpha))
            for r, p in zip(results, adjusted)]


def arm_interval(accuracies: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t-interval; NaN for one seed) of one arm's accuracies over seeds."""
    mean, low, high = t_interval(np.asarray(accuracies))
    return mean, (high - low) / 2 if math.isfinite(high) else math.nan


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """Plug-in mutual information, in bits, of two label arrays (e.g. chosen expert and super-class per
    image): 0 when independent, log2(groups) when one determines the other and groups are equally likely."""
    a, b = np.unique(np.asarray(a), return_inverse=True)[1], np.unique(np.asarray(b), return_inverse=True)[1]
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    independent = joint.sum(1, keepdims=True) @ joint.sum(0, keepdims=True)
    seen = joint > 0
    return float((joint[seen] * np.log2(joint[seen] / independent[seen])).sum())


def purity(experts: np.ndarray, groups: np.ndarray) -> float:
    """Share of images whose expert's most common group is their own group (1: each expert sees one group)."""
    experts, groups = np.asarray(experts), np.asarray(groups)
    return float(sum(np.bincount(groups[experts == e]).max() for e in np.unique(experts)) / len(experts))


__all__ = ["VERDICTS", "PairedResult", "arm_interval", "decided_by", "holm", "holm_adjusted", "mcnemar_midp",
           "mutual_information", "paired", "purity", "t_interval", "verdict"]
