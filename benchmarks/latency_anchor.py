"""How far apart two latency measurements of the same models land: alone (each model timed on its own, as
profiles taken at different moments are) against anchored (each timed interleaved with the study's anchor,
the way `vmoe-nas search` measures trials).

The pair is a dense 28x28 ViT and its Mobile V-MoE of the same FLOPs (E=4, k=1, last block), the kind of
pair a study's "beats dense at equal latency" rests on; the anchor is fashion-quick's smallest dense ViT.
Each repetition profiles both models alone, then both anchored. Reported per method: the MoE/dense
latency ratio of every repetition and its spread (largest over smallest). Goal: anchored spread <= 1.05.

    .venv/bin/python benchmarks/latency_anchor.py [--repeats 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from nas.study import load_study_config
from profilers import device_info, profile
from search_spaces import ArchConfig, MoEConfig

OUT = Path("results/benchmarks/latency_anchor.json")
GOAL = 1.05


def models() -> tuple[ArchConfig, ArchConfig, ArchConfig]:
    space = load_study_config("fashion-quick").space
    anchor = space.smallest_dense(image_size=28, in_channels=1, num_classes=10)
    dense = replace(anchor, depth=4, width=48, num_heads=3, mlp_ratio=4.0)
    moe = replace(dense, moe=MoEConfig(num_experts=4, top_k=1, layers=(3,)))
    return anchor, dense, moe


def summary(ratios: list[float]) -> dict:
    return {"ratios": ratios, "median": statistics.median(ratios), "spread": max(ratios) / min(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    anchor, dense, moe = models()
    alone, anchored, medians = [], [], {"dense": [], "moe": []}
    for repeat in range(args.repeats):
        d, m = profile(dense), profile(moe)
        medians["dense"].append(d.latency.median)
        medians["moe"].append(m.latency.median)
        alone.append(m.latency.median / d.latency.median)
        d, m = profile(dense, anchor=anchor), profile(moe, anchor=anchor)
        anchored.append(m.anchor.ratio / d.anchor.ratio)
        print(f"repeat {repeat + 1}/{args.repeats}: alone {alone[-1]:.3f}, anchored {anchored[-1]:.3f}")
    result = {
        "models": {"anchor": anchor.name, "dense": dense.name, "moe": moe.name},
        "protocol": "onnxruntime, 1 thread, batch 1, profilers' default warm-up / min_runs / min_time_s",
        "medians_alone_ms": medians,
        "alone": summary(alone),
        "anchored": summary(anchored),
        "goal_anchored_spread": GOAL,
        "device": device_info(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"MoE/dense latency ratio over {args.repeats} repeats: alone spread {result['alone']['spread']:.3f} "
          f"(median {result['alone']['median']:.3f}), anchored spread {result['anchored']['spread']:.3f} "
          f"(median {result['anchored']['median']:.3f}); goal <= {GOAL}. Written to {OUT}")


if __name__ == "__main__":
    main()
