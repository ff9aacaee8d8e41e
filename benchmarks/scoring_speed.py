"""Scoring speed of the one-shot evaluator: N candidates of fashion-quick's space, each sampled, validated,
costed (FLOPs) and scored with the weights it inherits from a trained supernet, as a `kind: supernet` trial
does apart from its storage writes and its latency (measured per trial by the profiler, or predicted by the
fitted latency model: neither is timed here).

    python benchmarks/scoring_speed.py [--candidates 1000 --val-images 2000 --processes 2 --threads 1]

`--processes` score side by side, each its share of the candidates on `--threads` threads, as a study's
workers do with `vmoe-nas search --workers 2` (the presets run one worker of all cores). Uses the supernet
`evaluator_fidelity.py score` trains (same steps: resumed or trained here if absent). Writes
results/benchmarks/scoring_speed_val<N>.json: total seconds, per-candidate median and p90. Goal: 1,000
candidates in at most 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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

RESULTS = Path("results/benchmarks")


def context(args):
    return build_context(supernet_config(args.supernet_steps, 2, val_images=args.val_images or None), progress=False)


def score_share(args, index: int) -> dict:
    """Score this process's share of the candidates (drawn from its own seed): per-candidate seconds."""
    ctx = context(args)
    net = train_supernet(ctx).net  # finished: loaded from its checkpoint
    torch.set_num_threads(args.threads)
    data = ctx.dataset
    dims = {"image_size": data.image_size, "in_channels": data.in_channels, "num_classes": data.num_classes}
    generator = torch.Generator().manual_seed(index)
    count = len(range(index, args.candidates, args.processes))
    seconds, accuracies, invalid = [], [], 0
    while len(seconds) < count:
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
    return {"seconds": seconds, "accuracies": accuracies, "invalid": invalid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--val-images", type=int, default=2000, help="0: the whole validation split")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="per process")
    parser.add_argument("--supernet-steps", type=int, default=600)
    args = parser.parse_args()
    train_supernet(context(args))  # trained (or resumed) once, before the scorers load it
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        shares = pool.starmap(score_share, [(args, index) for index in range(args.processes)])
    total = time.perf_counter() - start  # process start-up and supernet loading included
    seconds = [s for share in shares for s in share["seconds"]]
    accuracies = [a for share in shares for a in share["accuracies"]]
    out = {"candidates": args.candidates, "val_images": args.val_images, "processes": args.processes,
           "threads_per_process": args.threads, "supernet_steps": args.supernet_steps, "total_s": round(total, 1),
           "median_s": round(float(np.median(seconds)), 4), "p90_s": round(float(np.percentile(seconds, 90)), 4),
           "invalid_redrawn": sum(share["invalid"] for share in shares),
           "accuracy_range": [float(min(accuracies)), float(max(accuracies))],
           "goal": "1,000 candidates in <= 300 s on 2 cores", "load_average": list(np.round(
               np.loadtxt("/proc/loadavg", usecols=(0, 1, 2)), 2)) if Path("/proc/loadavg").exists() else None}
    output = RESULTS / f"scoring_speed_val{args.val_images}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{args.candidates} candidates scored in {total:.0f} s ({args.processes} processes x {args.threads} "
          f"threads, {args.val_images} val images; per candidate median {out['median_s']:.3f} s, p90 "
          f"{out['p90_s']:.3f} s); wrote {output}")


if __name__ == "__main__":
    main()
