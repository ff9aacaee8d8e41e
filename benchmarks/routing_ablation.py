"""Routing ablation at equal FLOPs: dense vs per-image MoE routed end-to-end (router loss weight 0) vs per-image
routed by super-class (0.3, the paper's default) vs per-token (V-MoE), over n seeds with common random numbers.

All MoE arms have E = the data set's super-class count, k=1 and MoE in the last 2 blocks, so each does the
dense model's work plus a router. Every MoE arm is compared with dense, paired by seed (`nas.stats`: mean
gain, 95% t-interval, McNemar mid-p Holm-adjusted over the three pairs, verdict). For the per-image arms the
table also gives how well their routing on val lines up with the super-classes (mutual information, bits;
log2(E) is perfect, 0 is none). Writes results/benchmarks/routing_ablation.{json,md}.

    .venv/bin/python benchmarks/routing_ablation.py [--data synthetic] [--seeds 3] [--steps 500]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from _paired import compare, report, run_arms, table

from nas.data import load_dataset
from nas.recipe import TrainRecipe
from search_spaces import ArchConfig, MoEConfig

OUT = Path("results/benchmarks/routing_ablation")


def arms(data, depth: int, width: int, mlp_ratio: float) -> dict[str, ArchConfig]:
    groups = int(data.superclasses.max()) + 1
    moe = MoEConfig(num_experts=groups, top_k=1, layers=(depth - 2, depth - 1), router_loss_weight=0.3)
    base = ArchConfig(image_size=data.image_size, in_channels=data.in_channels, patch_size=4,
                      num_classes=data.num_classes, depth=depth, width=width, num_heads=max(1, width // 16),
                      mlp_ratio=mlp_ratio, moe=moe)
    return {
        "dense": base.dense(),
        "per_image_end_to_end": replace(base, moe=replace(moe, router_loss_weight=0.0)),
        "per_image_superclass": base,
        "per_token": replace(base, moe=replace(moe, routing="per_token")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic", help="a data set with super-classes (synthetic[:...])")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--mlp-ratio", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT, help="writes OUT.json and OUT.md")
    args = parser.parse_args()

    data = load_dataset(args.data)
    recipe = TrainRecipe(steps=args.steps, batch_size=128, lr=args.lr, augment=False, eval_every=10**9,
                         num_threads=args.threads)
    results = run_arms(arms(data, args.depth, args.width, args.mlp_ratio), data, recipe, args.seeds)
    pairs = compare(results, "dense")
    markdown = table(results, pairs, "dense")
    moe = results["per_image_superclass"]["arch"]["moe"]
    heading = (f"Routing ablation on `{args.data}`: {args.steps} steps of batch 128, lr {args.lr:g}, seeds "
               f"0-{args.seeds - 1}; depth {args.depth}, width {args.width}, MLP ratio {args.mlp_ratio:g}; "
               f"MoE arms E={moe['num_experts']}, k=1, blocks {moe['layers']}.")
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(f"{heading}\n\n{markdown}\n")
    args.out.with_suffix(".json").write_text(json.dumps({"data": args.data, "recipe": recipe.to_dict(),
                                                         "seeds": args.seeds, **report(results, pairs)}, indent=1))
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
