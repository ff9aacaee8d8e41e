"""The one latency protocol every backend uses: warm-up calls, then timed calls until both a minimum
count and a minimum time are reached; robust statistics of the per-call times. `measure_interleaved`
times several models in alternating blocks, so machine drift (frequency, neighbours) hits them alike and
their ratios hold where absolute times do not."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from time import perf_counter

import numpy as np

from nas.config import ConfigError
from profilers._errors import ProfileError

# Defaults sized for the search: ~1 s per architecture, enough runs for a stable median.
MAX_BATCH = 256  # images per timed call: past it an input is a typo (1e9 images would be 600 GB)
MAX_THREADS = 256
WARMUP = 10
MIN_RUNS = 30
MIN_TIME_S = 1.0
BLOCK = 5  # calls of one model in a row when interleaving: short, so drift is shared; >1, so caches stay warm
# What a latency is: the median of the per-call times, or their 5th percentile, the time a call takes when
# nothing else runs on its core. On a shared machine the second repeats where the first drifts (a second
# measurement within +-5% of the first for 100% of architectures, against 92%: benchmarks/latency_repeatability.py).
STATISTICS = ("median", "p5")


def check_statistic(name: str, statistic: str) -> None:
    """One ConfigError naming `name` unless `statistic` is one of STATISTICS."""
    if statistic not in STATISTICS:
        raise ConfigError(name, f"must be one of {', '.join(STATISTICS)}, got {statistic!r}")


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency in milliseconds."""

    median: float
    p10: float
    p90: float
    mean: float
    std: float
    cv: float  # std / mean: above ~0.1 the machine was busy, so compare medians or re-measure
    runs: int
    p5: float | None = None  # None: measured before this was kept (a stored record, an older agent)

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}  # p5 where it was kept

    def value(self, statistic: str) -> float:
        """The latency as `statistic` (one of STATISTICS) defines it."""
        value = getattr(self, statistic) if statistic in STATISTICS else None
        if value is None:  # p5 from an agent of an older vmoe-nas
            raise ProfileError(f"latency statistic {statistic!r} is not in this measurement (it has "
                               f"{', '.join(s for s in STATISTICS if getattr(self, s) is not None)}): update the "
                               "profiler agent, or use statistic median")
        return value

    @classmethod
    def from_dict(cls, data: dict) -> LatencyStats:
        """From `to_dict`'s form, written by this or another vmoe-nas (a stored record, a remote agent's reply):
        a statistic a newer one adds is left out, so adding one does not break older readers."""
        known = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is MISSING)
        if missing:
            raise ProfileError(f"a latency without {', '.join(missing)}: {data!r}")
        return cls(**{key: value for key, value in data.items() if key in known})

    @classmethod
    def from_times(cls, times_s: list[float]) -> LatencyStats:
        ms = np.asarray(times_s) * 1e3
        mean = float(ms.mean())
        std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
        p5, p10, median, p90 = (float(v) for v in np.percentile(ms, [5, 10, 50, 90]))
        return cls(median=median, p10=p10, p90=p90, mean=mean, std=std, cv=std / mean if mean else 0.0, runs=len(ms),
                   p5=p5)


def measure_latency(
    fn: Callable[[], object], *, warmup: int = WARMUP, min_runs: int = MIN_RUNS, min_time_s: float = MIN_TIME_S
) -> LatencyStats:
    """Time `fn()` (which must block until its result is ready): `warmup` untimed calls (allocators,
    lazy initialisation, caches), then timed calls until at least `min_runs` calls AND `min_time_s`
    seconds of them, so that a fast model gets many runs and a slow one still gets `min_runs`."""
    return measure_interleaved([fn], warmup=warmup, min_runs=min_runs, min_time_s=min_time_s, block=1)[0]


def measure_interleaved(
    fns: Sequence[Callable[[], object]], *, warmup: int = WARMUP, min_runs: int = MIN_RUNS,
    min_time_s: float = MIN_TIME_S, block: int = BLOCK,
) -> list[LatencyStats]:
    """`measure_latency` for several functions at once: `warmup` calls of each, then rounds of `block`
    timed calls of each in turn, until every one has `min_runs` calls and the first `min_time_s` seconds."""
    times = time_interleaved(fns, warmup=warmup, min_runs=min_runs, min_time_s=min_time_s, block=block)
    return [LatencyStats.from_times(own) for own in times]


def time_interleaved(
    fns: Sequence[Callable[[], object]], *, warmup: int = WARMUP, min_runs: int = MIN_RUNS,
    min_time_s: float = MIN_TIME_S, block: int = BLOCK,
) -> list[list[float]]:
    """`measure_interleaved`'s per-call seconds of each function, for statistics it does not report."""
    if min_runs < 1:
        raise ValueError(f"min_runs must be >= 1, got {min_runs}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    elapsed = 0.0  # of the first function's timed calls
    while len(times[0]) < min_runs or elapsed < min_time_s:
        for fn, own in zip(fns, times):
            for _ in range(block):
                start = perf_counter()
                fn()
                own.append(perf_counter() - start)
        elapsed += sum(times[0][-block:])
    return times
