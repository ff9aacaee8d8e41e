"""Positive control for the MoE-vs-dense verdict: a data set built so that the per-image MoE must win.

`synthetic:mode=lookup` shows each image's super-class as a coarse pattern and a grey level in one corner;
the class is a random table of the level, one table per super-class with bin boundaries of its own. A dense
MLP must hold all the tables; an expert of a per-image MoE routed by super-class holds one. With 8
super-classes and MLPs narrow enough that the dense twin runs out of room (MLP ratio 0.25), the MoE (E = 8,
k=1, MoE in the last 2 blocks, super-class router loss 0.3) has room for its table: the pair and recipe of
the study `positive-control` (`vmoe-nas search --config positive-control`), without the search around them.
The MoE and its FLOPs twin (the same architecture with E=0) train over n seeds as `vmoe-nas confirm` trains
a pair: seed i of both with recipe seed i (same batches in the same order), the MoE from its twin's initial
weights in every shared parameter; `nas.stats` gives the paired gain, its t-interval, McNemar's p and the
verdict. A verdict machine that has only ever said `ties` is untested on `beats`: this is where it should
say `beats` (`synthetic:mode=specialised`, cues of a different kind per super-class, never made the MoE
win: benchmarks/README.md has both).

Writes results/benchmarks/positive_control.json.

    .venv/bin/python benchmarks/positive_control.py [--seeds 3] [--steps 20000] [--mlp-ratio 0.25]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _paired import compare, report, run_arms, table

from nas.data import load_dataset
from nas.recipe import TrainRecipe
from search_spaces import ArchConfig, MoEConfig

OUT = Path("results/benchmarks/positive_control.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic:mode=lookup,size=8,classes=32,groups=8,bins=48,train=60000,"
                                          "test=10")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20000, help="per model (~5-7 min each on one thread)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--mlp-ratio", type=float, default=0.25, help="narrow, so the dense MLP's width binds")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--margin", type=float, default=0.0, help="gain (fraction) the interval must clear")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    data = load_dataset(args.data)
    groups = int(data.superclasses.max()) + 1
    moe = ArchConfig(image_size=data.image_size, in_channels=data.in_channels, patch_size=4,
                     num_classes=data.num_classes, depth=args.depth, width=args.width, num_heads=args.width // 16,
                     mlp_ratio=args.mlp_ratio,
                     moe=MoEConfig(num_experts=groups, top_k=1, layers=(args.depth - 2, args.depth - 1),
                                   router_loss_weight=0.3))
    recipe = TrainRecipe(steps=args.steps, batch_size=128, lr=args.lr, augment=False, eval_every=10**9,
                         num_threads=args.threads)
    results = run_arms({"dense": moe.dense(), "per_image_moe": moe}, data, recipe, args.seeds, shared_init=True)
    pairs = compare(results, "dense", margin=args.margin)
    print(table(results, pairs, "dense"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": args.data, "class_names": data.class_names, "recipe": recipe.to_dict(),
                                    "seeds": args.seeds, **report(results, pairs)}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
