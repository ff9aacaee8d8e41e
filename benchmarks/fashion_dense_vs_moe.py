"""Fashion-MNIST: a dense ViT and the per-image Mobile V-MoE of the same shape and FLOPs, same short budget.

`fmnist-vmoe-6x64` (4 experts, k=1, in the last 2 of 6 blocks) against its dense twin `fmnist-vit-6x64`:
with k=1 each image runs one expert MLP per block, so both do the same work but for the router's 64x4
multiply-adds. The MoE's 4 super-classes are discovered from a small dense model's confusion matrix (and
cached in results/superclasses/). Both train with one recipe and an epoch budget, so machine load changes
the wall time but not the result. Writes results/benchmarks/fashion_dense_vs_moe.json.

    .venv/bin/python benchmarks/fashion_dense_vs_moe.py [--epochs 1] [--data-dir DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from nas.data import load_dataset
from nas.recipe import TrainRecipe
from nas.superclasses import DISCOVERY_RECIPE, superclasses_for
from nas.trainer import train
from search_spaces import build_model, count_params, load_arch

OUT = Path("results/benchmarks/fashion_dense_vs_moe.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=1.0, help="budget per model (~2-3 min each on 2 cores)")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: $VMOE_NAS_DATA_DIR or Debian's)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    data = load_dataset("fashion-mnist", data_dir=args.data_dir)
    moe = load_arch("fmnist-vmoe-6x64")
    discovery = replace(DISCOVERY_RECIPE, num_threads=args.threads)
    superclasses = superclasses_for(data, moe.moe.num_experts, cache_dir="results/superclasses", recipe=discovery,
                                    progress=True)
    # No augmentation: on a budget this short it costs accuracy (see nas.superclasses.DISCOVERY_RECIPE).
    recipe = TrainRecipe(epochs=args.epochs, batch_size=128, lr=2e-3, augment=False, eval_every="epoch",
                         num_threads=args.threads)
    report = {
        "recipe": recipe.to_dict(),
        "superclasses": {"groups": [[data.class_names[c] for c in g] for g in superclasses.groups],
                         "source": superclasses.source},
        "models": {},
    }
    for cfg in (moe.dense(), moe):
        result = train(cfg, data, recipe, superclasses=superclasses.class_to_group, progress=True)
        total, active = count_params(build_model(cfg))
        row = {"arch": cfg.name, "params_total": total, "params_active": active,
               **{k: v for k, v in result.to_dict().items() if k != "loss_curve"}}
        report["models"]["per_image_moe" if cfg.is_moe else "dense"] = row
        print(f"{cfg.name}: val top-1 {result.val_accuracy:.4f}  router {result.router_accuracy}  "
              f"{result.wall_time_s:.0f} s  {result.images_per_s:.0f} images/s")
    models = report["models"]
    report["val_accuracy_moe_minus_dense"] = round(models["per_image_moe"]["val_accuracy"]
                                                   - models["dense"]["val_accuracy"], 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
