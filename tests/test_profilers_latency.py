"""The measurement protocol, on a fake clock: warm-up untimed, then runs until both minimums are met."""

import numpy as np
import pytest

import profilers._latency as latency  # private on purpose: its clock is replaced where the protocol reads it
from profilers import LatencyStats, measure_interleaved, measure_latency


class FakeClock:
    """`perf_counter` for the protocol; each call of `fn` advances it by the next duration."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def __call__(self):
        return self.now

    def fn(self):
        self.now += self.durations[self.calls % len(self.durations)]
        self.calls += 1


@pytest.fixture
def clock(monkeypatch):
    def install(durations):
        fake = FakeClock(durations)
        monkeypatch.setattr(latency, "perf_counter", fake)
        return fake

    return install


def test_warmup_runs_are_not_timed(clock):
    fake = clock([5.0, 5.0] + [0.001] * 4)  # two slow first calls: a cold cache
    stats = measure_latency(fake.fn, warmup=2, min_runs=4, min_time_s=0)
    assert fake.calls == 6 and stats.runs == 4
    assert stats.median == pytest.approx(1.0) and stats.p90 == pytest.approx(1.0)


def test_runs_until_both_the_minimum_count_and_time(clock):
    fake = clock([0.01])
    assert measure_latency(fake.fn, warmup=0, min_runs=5, min_time_s=0).runs == 5  # count binds
    assert measure_latency(fake.fn, warmup=0, min_runs=5, min_time_s=0.5).runs == 50  # time binds
    slow = clock([1.0])
    assert measure_latency(slow.fn, warmup=0, min_runs=3, min_time_s=0.5).runs == 3


def test_statistics_are_in_milliseconds():
    times = [0.001, 0.002, 0.003, 0.004, 0.010]
    stats = LatencyStats.from_times(times)
    ms = np.array(times) * 1e3
    assert stats.median == pytest.approx(3.0)
    assert (stats.p5, stats.p10, stats.p90) == pytest.approx(tuple(np.percentile(ms, [5, 10, 90])))
    assert stats.p5 == pytest.approx(1.2)  # a fifth of the way from 1 ms to 2 ms, numpy's linear interpolation
    assert stats.mean == pytest.approx(4.0) and stats.std == pytest.approx(ms.std(ddof=1))
    assert stats.cv == pytest.approx(stats.std / stats.mean) and stats.runs == 5
    assert set(stats.to_dict()) == {"median", "p5", "p10", "p90", "mean", "std", "cv", "runs"}


def test_a_single_run_has_zero_spread():
    stats = LatencyStats.from_times([0.002])
    assert (stats.median, stats.std, stats.cv, stats.runs) == (2.0, 0.0, 0.0, 1)


def test_min_runs_must_be_positive():
    with pytest.raises(ValueError, match="min_runs"):
        measure_latency(lambda: None, min_runs=0)


def test_interleaved_runs_alternate_in_blocks_until_the_first_has_both_minimums(clock):
    fake = clock([0.01])
    order = []
    fns = [lambda: (order.append("a"), fake.fn()), lambda: (order.append("b"), fake.fn())]
    a, b = measure_interleaved(fns, warmup=1, min_runs=4, min_time_s=0.1, block=3)
    assert order[:2] == ["a", "b"]  # one warm-up call each, untimed
    assert order[2:] == (["a"] * 3 + ["b"] * 3) * 4  # 0.1 s of "a" needs 10 runs: 4 rounds of 3
    assert a.runs == b.runs == 12 and a.median == b.median == pytest.approx(10.0)


def test_interleaving_keeps_the_ratio_through_drift(clock):
    fake = clock([0.0])
    calls = []

    def model(ms):
        def run():
            calls.append(ms)
            fake.now += ms * (2 if len(calls) > 40 else 1) / 1e3  # halfway, the machine runs at half speed
        return run

    fast, slow = measure_interleaved([model(1), model(2)], warmup=0, min_runs=40, min_time_s=0, block=5)
    assert (fast.median, slow.median) == (pytest.approx(1.5), pytest.approx(3.0))  # both drifted alike
    assert slow.median / fast.median == pytest.approx(2.0)
    with pytest.raises(ValueError, match="block"):
        measure_interleaved([model(1)], block=0)
