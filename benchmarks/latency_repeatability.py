"""How well does a latency measurement repeat, by statistic? The floor under any latency model's error.

The held-out architectures of `latency_model.py` (per space) are measured twice, each time in a fresh ONNX Runtime
session interleaved with the space's anchor (1 thread, batch 1, `nas.latency.CALIBRATION_PROTOCOL`'s warm-up,
runs and time). Per statistic of the per-call times (median, the tool's; 5th percentile; minimum), the second
measurement's ratio to the anchor is compared with the first's: MAPE, share within +-5% and +-10%, Kendall tau.
A latency model is judged against one such measurement, so it cannot be expected to beat these figures.

    .venv/bin/python benchmarks/latency_repeatability.py [--spaces fashion,vit-tiny] [--holdout 60]

Writes results/benchmarks/latency_repeatability.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from latency_model import held_out, spaces
from tqdm import tqdm

from nas.latency import CALIBRATION_PROTOCOL
from profilers import device_info, device_label
from profilers._export import cached_onnx
from profilers._latency import time_interleaved
from profilers._onnxruntime import ort_inference
from profilers.latency_calibration import calibration_set, space_architectures
from profilers.latency_model import error_figures

OUT = Path("results/benchmarks/latency_repeatability.json")
STATISTICS = {"median": np.median, "p5": lambda t: np.percentile(t, 5), "min": np.min}


def ratios(cfg, anchor) -> dict[str, float]:
    """`cfg`'s latency over the anchor's, per statistic, from one interleaved measurement in fresh sessions."""
    calls = [ort_inference(cached_onnx(c), batch=1, threads=1, provider=None)[1] for c in (cfg, anchor)]
    model, reference = time_interleaved(calls, **CALIBRATION_PROTOCOL)  # the calibration's protocol, per call
    return {name: float(f(model) / f(reference)) for name, f in STATISTICS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spaces", default="fashion,vit-tiny")
    parser.add_argument("--holdout", type=int, default=60)
    parser.add_argument("--size", type=int, default=40)
    args = parser.parse_args()
    out = {"device": device_label(device_info()), "protocol": CALIBRATION_PROTOCOL, "loadavg_before": os.getloadavg()}
    for name in args.spaces.split(","):
        space, data = spaces()[name]
        candidates = space_architectures(space, **data)
        archs = held_out(candidates, calibration_set(candidates, args.size), args.holdout)
        anchor = space.smallest_dense(**data)
        passes = [[ratios(cfg, anchor) for cfg in tqdm(archs, desc=f"{name} pass {p + 1}")] for p in range(2)]
        out[name] = {"anchor": anchor.name, "count": len(archs)}
        for stat in STATISTICS:
            first, second = (np.array([r[stat] for r in p]) for p in passes)
            out[name][stat] = error_figures(second, first)
            f = out[name][stat]
            print(f"{name} {stat:>6}: second vs first measurement: MAPE {f['mape']:.1f}%, within 5% "
                  f"{f['within_5']:.0%}, within 10% {f['within_10']:.0%}, tau {f['kendall_tau']:.3f}")
    out["loadavg_after"] = os.getloadavg()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
