"""How well a latency model predicts architectures it never saw (issue 21's acceptance).

Per space: a latency model is fitted on the space's calibration set (`vmoe-nas latency-model fit`'s choice and
protocol), then `--holdout` architectures of the space that are not in the calibration set, stratified over
its kinds (dense; per-image and per-token MoE at k=1 and k=2), are measured the same way (ONNX Runtime, 1
thread, batch 1, each interleaved with the space's anchor) and predicted. Reported: MAPE, the share within
+-5% and +-10%, Kendall tau of predicted against measured latency ratios with a bootstrap 95% interval, the
same per kind and for a FLOPs-only fit (the proxy the model must beat), the same for a second measurement of
the held-out architectures against the first (the noise floor no model can beat), the time of one prediction (median of
1000) and of the calibration, and the machine's load (`os.getloadavg`) around the measurements.

Spaces: `fashion`, fashion-quick's space (28 px, 1 channel) with per-token routing added so that both
routings are calibrated and held out; `vit-tiny`, a ViT-Tiny-sized space at 224 px (patch 16, 197 tokens,
width 160-224, depth 10-12). Each measurement is appended to a JSON-lines file under `--work`, so an
interrupted run resumes where it stopped. Goals: >= 95% within +-5%, tau >= 0.9, a prediction under 1 ms,
a calibration under 3 minutes on 2 cores. `--budget-min` stops the held-out measurements early on a loaded
machine; the JSON then says how many were measured (`holdout_size` of `holdout_planned`).

`--statistic p5` fits, predicts and measures each timing's 5th percentile instead of its median (and writes
latency_model_p5.json): the statistic that repeats on a shared machine, `profiler.statistic: p5` in a study.

    .venv/bin/python benchmarks/latency_model.py [--spaces fashion,vit-tiny] [--holdout 60] [--size 40]
                                                 [--statistic median|p5]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nas.latency import CALIBRATION_PROTOCOL
from nas.study import load_study_config
from profilers import STATISTICS, analytic_flops, device_info, device_label
from profilers.latency_calibration import (
    Measurer,
    calibrate,
    calibration_set,
    kind,
    space_architectures,
)
from profilers.latency_model import error_figures, fit, fit_ratio
from search_spaces.mobile_vmoe import MobileVMoESpace

OUT = Path("results/benchmarks/latency_model.json")
GOALS = {"within_5": 0.95, "kendall_tau": 0.9, "prediction_ms": 1.0, "calibration_s": 180.0}


def spaces() -> dict[str, tuple[MobileVMoESpace, dict]]:
    fashion = dataclasses.replace(load_study_config("fashion-quick").space, routings=("per_image", "per_token"))
    vit_tiny = MobileVMoESpace(patch_sizes=(16,), depths=(10, 12), widths=(160, 192, 224), head_width=64,
                               mlp_ratios=(3.0, 4.0), num_experts=(0, 4, 8), top_k=(1, 2),
                               placements=("last2", "alternate"), routings=("per_image", "per_token"))
    return {"fashion": (fashion, {"image_size": 28, "in_channels": 1, "num_classes": 10}),
            "vit-tiny": (vit_tiny, {"image_size": 224, "in_channels": 3, "num_classes": 1000})}


def held_out(candidates, calibration, count: int, seed: int = 0):
    """`count` architectures not in the calibration set, the same number of each kind where a kind has enough,
    in an order that takes the kinds in turn (so that a run stopped by `--budget-min` still covers each)."""
    taken = {cfg.config_hash() for cfg in calibration}
    rest = [cfg for cfg in candidates if cfg.config_hash() not in taken]
    rng = np.random.default_rng(seed)
    kinds = sorted({kind(cfg) for cfg in rest})
    chosen: list[list] = []
    for index, name in enumerate(kinds):
        members = [cfg for cfg in rest if kind(cfg) == name]
        share = min(len(members), -(-(count - sum(map(len, chosen))) // (len(kinds) - index)))
        chosen.append([members[i] for i in rng.choice(len(members), share, replace=False)])
    return [cfg for turn in itertools.zip_longest(*chosen) for cfg in turn if cfg is not None]


def bootstrap_tau(predicted: np.ndarray, measured: np.ndarray, resamples: int = 1000, seed: int = 0) -> list[float]:
    from scipy.stats import kendalltau

    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(resamples):
        pick = rng.integers(0, len(measured), len(measured))
        taus.append(kendalltau(predicted[pick], measured[pick]).statistic)
    return [float(v) for v in np.nanpercentile(taus, [2.5, 97.5])]


def figures(predicted: np.ndarray, measured: np.ndarray) -> dict:
    return {**error_figures(predicted, measured), "kendall_tau_95ci": bootstrap_tau(predicted, measured)}


def prediction_ms(model, archs) -> float:
    times = []
    for cfg in (archs * (1000 // len(archs) + 1))[:1000]:
        start = time.perf_counter()
        model.predict(cfg)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def run_space(name: str, space, data: dict, args) -> dict:
    anchor = space.smallest_dense(**data)
    candidates = space_architectures(space, **data)
    calibration = calibration_set(candidates, args.size)
    holdout = held_out(candidates, calibration, args.holdout)
    measurer = Measurer(options=dict(CALIBRATION_PROTOCOL), statistic=args.statistic)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load = {"before": os.getloadavg()}
    start = time.perf_counter()
    points, device = calibrate(calibration, anchor, measurer, resume=work / f"{name}-calibration.jsonl",
                               progress=lambda items: tqdm(items, desc=f"{name} calibration"))
    calibration_s = time.perf_counter() - start  # of this run: 0 when every point came from the resume file
    key = {"backend": "onnxruntime", "threads": 1, "batch": 1, "provider": None, "precision": "fp32",
           "statistic": args.statistic, "device": device_label(device)}
    model = fit(points, key=key, anchor=anchor, device=device, calibration_s=calibration_s)
    deadline = time.monotonic() + 60 * args.budget_min
    until_deadline = lambda items: itertools.takewhile(lambda _: time.monotonic() < deadline, items)  # noqa: E731
    tests, _ = calibrate(holdout, anchor, measurer, resume=work / f"{name}-holdout.jsonl",
                         progress=lambda items: tqdm(until_deadline(items), desc=f"{name} held out", total=len(items)))
    # The noise floor: the same architectures measured again, each in a fresh session, the same way. No model
    # can agree with a measurement better than a second measurement does.
    retests, _ = calibrate([p.arch for p in tests], anchor, measurer, resume=work / f"{name}-retest.jsonl",
                           progress=lambda items: tqdm(until_deadline(items), desc=f"{name} measured again",
                                                       total=len(items)))
    load["after"] = os.getloadavg()
    measured = np.array([p.ratio for p in tests])
    again = np.array([p.ratio for p in retests])  # a run stopped by --budget-min: the first len(again) of them
    predicted = np.array([model.predict_ratio(p.arch) for p in tests])
    flops = lambda ps: np.stack([np.ones(len(ps)), [analytic_flops(p.arch) for p in ps]], axis=1)  # noqa: E731
    flops_fit = flops(tests) @ fit_ratio(flops(points), np.array([p.ratio for p in points]))
    kinds = np.array([kind(p.arch) for p in tests])
    return {
        "space": space.to_dict(), "data": data, "anchor": anchor.name, "anchor_ms": model.anchor_ms,
        "candidates": len(candidates), "calibration_size": len(points), "holdout_planned": len(holdout),
        "holdout_size": len(tests), "holdout_by_kind": {k: int((kinds == k).sum()) for k in sorted(set(kinds))},
        "calibration_s_this_run": calibration_s, "calibration_leave_one_out": model.errors,
        "features": figures(predicted, measured), "flops_only": figures(flops_fit, measured),
        "retest": figures(again, measured[:len(again)]) if len(again) > 1 else None,
        "features_vs_mean_of_two": (figures(predicted[:len(again)], (measured[:len(again)] + again) / 2)
                                    if len(again) > 1 else None),
        "features_by_kind": {k: error_figures(predicted[kinds == k], measured[kinds == k]) for k in sorted(set(kinds))},
        "prediction_ms": prediction_ms(model, [p.arch for p in tests]),
        "median_cv": float(np.median([p.cv for p in tests if p.cv is not None])),
        "loadavg": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spaces", default="fashion,vit-tiny")
    parser.add_argument("--holdout", type=int, default=60)
    parser.add_argument("--size", type=int, default=40)
    parser.add_argument("--statistic", choices=STATISTICS, default="median",
                        help="what a latency is of the per-call times: fitted, predicted and measured")
    parser.add_argument("--work", default="results/benchmarks/latency_model")
    parser.add_argument("--out", type=Path, default=None, help=f"default {OUT}, latency_model_p5.json for p5")
    parser.add_argument("--budget-min", type=float, default=float("inf"),
                        help="stop measuring held-out architectures after this many minutes (a loaded machine)")
    args = parser.parse_args()
    args.out = args.out or (OUT if args.statistic == "median" else OUT.with_name(f"{OUT.stem}_{args.statistic}.json"))
    known = spaces()
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.update(device=device_label(device_info()), cores=os.cpu_count(), protocol=CALIBRATION_PROTOCOL,
                  statistic=args.statistic, goals=GOALS)
    for name in args.spaces.split(","):
        space, data = known[name]
        result[name] = run_space(name, space, data, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        f = result[name]["features"]
        print(f"{name}: MAPE {f['mape']:.1f}%, within 5% {f['within_5']:.0%}, within 10% {f['within_10']:.0%}, "
              f"tau {f['kendall_tau']:.3f} {f['kendall_tau_95ci']}; FLOPs only: MAPE "
              f"{result[name]['flops_only']['mape']:.1f}%; prediction {result[name]['prediction_ms']:.3f} ms")
        r = result[name]["retest"]
        if r is None:
            continue  # --budget-min ran out before a second measurement
        print(f"{name}, measured again (the noise floor): MAPE {r['mape']:.1f}%, within 5% {r['within_5']:.0%}, "
              f"within 10% {r['within_10']:.0%}, tau {r['kendall_tau']:.3f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
