"""Training throughput (images/s) of a 28x28 model: dense vs per-image MoE (k=1, same shape) vs per-token MoE.

One training step = forward with routing losses, backward, AdamW step, on random 28x28 batches, timed through
`nas.trainer`'s own step so that the number is the search's cost. Models take turns a few steps at a time
(so drifting machine load hits all alike); reported are each model's median step time and the median over
rounds of its step time divided by dense's in the same round, which is robust to load shared with other
processes. Goal: per-image MoE within 1.15x of dense step time.

    .venv/bin/python benchmarks/train_throughput.py [--rounds 30] [--steps 2] [--batch-size 128] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from nas.data import Dataset, Split
from nas.trainer import TrainRecipe, _Run, available_cores
from search_spaces import load_arch

OUT = Path("results/benchmarks/train_throughput.json")


def models() -> dict:
    dense, moe = load_arch("fmnist-vit-6x64"), load_arch("fmnist-vmoe-6x64")
    per_token = replace(moe, moe=replace(moe.moe, routing="per_token"))
    return {"dense": dense, "per_image_moe": moe, "per_token_moe": per_token}


def random_dataset(n: int) -> Dataset:
    """Random 28x28 images in 10 classes (4 super-classes): step time does not depend on the pixels."""
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (n,), generator=g))
    return Dataset("random-28", split, split, split, 10, tuple(map(str, range(10))), (0.5,), (0.29,),
                   np.arange(10) % 4, flip_ok=True)


def step_time(run: _Run, steps: int) -> float:
    tick = time.perf_counter()
    for _ in range(steps):
        run.step()
    return (time.perf_counter() - tick) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores; 1 on a busy machine, where "
                        "oversubscribed threads wait on each other and swamp the comparison)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads or available_cores())
    data = random_dataset(args.batch_size * 64)
    recipe = TrainRecipe(steps=10**9, batch_size=args.batch_size)  # the budget is never reached here
    runs = {name: _Run(cfg, data, recipe, torch.as_tensor(data.superclasses), None) for name, cfg in models().items()}
    for run in runs.values():
        step_time(run, 3)  # warm-up: allocator, first-call dispatch
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(step_time(run, args.steps))
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = {name: statistics.median(a / b for a, b in zip(t, times["dense"])) for name, t in times.items()}
    report = {
        "batch_size": args.batch_size, "rounds": args.rounds, "steps_per_round": args.steps,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "models": {name: {"arch": runs[name].cfg.name, "step_ms": round(1e3 * median[name], 2),
                          "images_per_s": round(args.batch_size / median[name], 1),
                          "step_time_vs_dense": round(ratio[name], 3),
                          "step_ms_per_round": [round(1e3 * t, 2) for t in times[name]]} for name in runs},
        "goal": "per_image_moe step time <= 1.15x dense",
    }
    report["goal_met"] = report["models"]["per_image_moe"]["step_time_vs_dense"] <= 1.15
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, row in report["models"].items():
        print(f"{name:>14}: {row['images_per_s']:>8.1f} images/s  {row['step_ms']:>7.2f} ms/step  "
              f"{row['step_time_vs_dense']:.3f}x dense")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
