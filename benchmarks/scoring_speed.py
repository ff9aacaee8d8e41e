"""Scoring speed of the one-shot evaluator: N candidates of fashion-quick's space, each sampled, validated,
costed (FLOPs) and scored with the weights it inherits from a trained supernet, as a `kind: supernet` trial
does apart from its storage writes and its latency (measured per trial by the profiler, or predicted by the
fitted latency model: neither is timed here).

    python benchmarks/scoring_speed.py [--candidates 1000 --val-images 2000 --threads 2]

Uses the supernet `evaluator_fidelity.py score` trains (same steps: resumed or trained here if absent). Writes
results/benchmarks/scoring_speed.json: total seconds, per-candidate median and p90. Goal: 1,000 candidates in at
most 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from evaluator_fidelity import supernet_config

from nas.supernet import score, train_supernet
from nas.trial import build_context, validate
from profilers import analytic_flops
from search_spaces.mobile_vmoe import InvalidArchitecture
from search_spaces.supernet import random_arch

OUTPUT = Path("results/benchmarks/scoring_speed.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--supernet-steps", type=int, default=600)
    args = parser.parse_args()
    ctx = build_context(supernet_config(args.supernet_steps, 2, val_images=args.val_images))
    net = train_supernet(ctx).net
    torch.set_num_threads(args.threads)
    data = ctx.dataset
    dims = {"image_size": data.image_size, "in_channels": data.in_channels, "num_classes": data.num_classes}
    generator = torch.Generator().manual_seed(0)
    seconds, accuracies, invalid = [], [], 0
    start = time.perf_counter()
    while len(seconds) < args.candidates:
        tick = time.perf_counter()
        arch = random_arch(ctx.cfg.space, generator, **dims)
        try:
            validate(ctx, arch)
        except InvalidArchitecture:
            invalid += 1
            continue
        analytic_flops(arch)
        accuracies.append(score(ctx, net, arch)["accuracy"])
        seconds.append(time.perf_counter() - tick)
    total = time.perf_counter() - start
    out = {"candidates": args.candidates, "val_images": args.val_images, "threads": args.threads,
           "total_s": round(total, 1), "median_s": round(float(np.median(seconds)), 4),
           "p90_s": round(float(np.percentile(seconds, 90)), 4), "invalid_redrawn": invalid,
           "accuracy_range": [float(min(accuracies)), float(max(accuracies))],
           "goal": "1,000 candidates in <= 300 s on 2 cores", "load_average": list(np.round(
               np.loadtxt("/proc/loadavg", usecols=(0, 1, 2)), 2)) if Path("/proc/loadavg").exists() else None}
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{args.candidates} candidates scored in {total:.0f} s (median {out['median_s']:.3f} s, p90 "
          f"{out['p90_s']:.3f} s, {args.threads} threads, {args.val_images} val images); wrote {OUTPUT}")


if __name__ == "__main__":
    main()
