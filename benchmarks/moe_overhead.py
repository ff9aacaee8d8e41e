"""Inference latency of per-image MoE (E=10 in the last 2 blocks, k=1 and k=2) against the dense model
of the same shape, on ONNX Runtime (1 thread) and eager torch (1 thread), at batch 1 and 8.

k=1 has the dense model's FLOPs (plus a router of C*E), so its latency ratio to dense is the overhead
of routing: the goal is at most 1.03 on ONNX Runtime at batch 1. The three models of a shape take
turns, a chunk of calls each per round (so drifting load from other processes hits all alike); each
chunk is timed with `profilers.measure_latency`, and a ratio is the median over rounds of the MoE's
chunk median over dense's chunk median in the same round.

    .venv/bin/python benchmarks/moe_overhead.py [--rounds 15] [--calls 10] [--shapes vit-6x64 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from profilers import device_info, export_onnx, measure_latency, ort_inference
from search_spaces import ArchConfig, MoEConfig, build_model, load_arch

OUT = Path("results/benchmarks/moe_overhead.json")
SHAPES = ("vit-12x192", "vit-6x64", "fmnist-vit-6x64")  # 224/16, 224/16 and a 28x28 model
BATCHES = (1, 8)
GOAL = 1.03
WARMUP_CALLS = 5


def variants(dense: ArchConfig) -> dict[str, ArchConfig]:
    last_two = (dense.depth - 2, dense.depth - 1)
    moe = {f"moe_k{k}": replace(dense, moe=MoEConfig(num_experts=10, top_k=k, layers=last_two)) for k in (1, 2)}
    return {"dense": dense, **moe}


def torch_runner(model: torch.nn.Module, batch: int):
    cfg = model.cfg
    images = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)

    def run():
        with torch.inference_mode():
            model(images)

    return run


def interleaved(runners: dict, rounds: int, calls: int) -> dict:
    """Per model: latency (ms, median over rounds of each chunk's median and p10) and the median over
    rounds of its ratio to dense in the same round. Under load from other processes a run is sometimes
    preempted, more often the longer it is: the p10 (runs that were not) is then the steadier figure."""
    for run in runners.values():  # first calls of a fresh session or model: allocators, arenas, caches
        for _ in range(WARMUP_CALLS):
            run()
    chunks = {name: [] for name in runners}
    for index in range(rounds):
        names = list(runners)[index % len(runners):] + list(runners)[: index % len(runners)]  # rotate who goes first
        for name in names:
            chunks[name].append(measure_latency(runners[name], warmup=1, min_runs=calls, min_time_s=0))

    def summary(name: str, stat: str) -> dict:
        mine, dense = ([getattr(s, stat) for s in chunks[n]] for n in (name, "dense"))
        return {f"{stat}_ms": round(statistics.median(mine), 4),
                f"ratio_{stat}": round(statistics.median(a / b for a, b in zip(mine, dense)), 4)}

    return {name: {**summary(name, "median"), **summary(name, "p10")} for name in runners}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10, help="timed calls per model per round")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="dense presets whose shape to compare")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"rounds": args.rounds, "calls_per_round": args.calls, "threads": 1, "device": device_info(), "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            models = {name: build_model(cfg).eval() for name, cfg in variants(load_arch(shape)).items()}
            paths = {name: export_onnx(model, Path(tmp) / f"{shape}-{name}.onnx") for name, model in models.items()}
            results = report["shapes"][shape] = {"arch": {n: m.cfg.name for n, m in models.items()}}
            for batch in BATCHES:
                for backend in ("onnxruntime", "torch"):
                    runners = {
                        name: torch_runner(model, batch) if backend == "torch"
                        else ort_inference(paths[name], batch=batch, threads=1, provider=None)[1]
                        for name, model in models.items()
                    }
                    row = results[f"{backend}_batch{batch}"] = interleaved(runners, args.rounds, args.calls)
                    ratios = "  ".join(
                        f"{n} {r['median_ms']:.3f} ms (x{r['ratio_median']:.3f}, p10 x{r['ratio_p10']:.3f})"
                        for n, r in row.items())
                    print(f"{shape:>16} {backend:>11} batch {batch}: {ratios}", flush=True)
    report["routing_overhead"] = {  # the goal: k=1 within GOAL of dense, on ONNX Runtime at batch 1
        shape: {key: r["onnxruntime_batch1"]["moe_k1"][key] for key in ("ratio_median", "ratio_p10")}
        | {"goal": GOAL, "met": r["onnxruntime_batch1"]["moe_k1"]["ratio_median"] <= GOAL}
        for shape, r in report["shapes"].items()
    }
    overhead = report["routing_overhead"].items()
    print("routing overhead (k=1 / dense, ONNX Runtime, batch 1): "
          + ", ".join(f"{shape} x{r['ratio_median']:.3f} (p10 x{r['ratio_p10']:.3f})" for shape, r in overhead))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
