"""Training throughput (images/s): dense vs per-image MoE (k=1, same shape) vs per-token MoE, and timm's
`VisionTransformer` of the dense model's shape in the same training loop.

One training step = forward with routing losses, backward, AdamW step, on random batches held on the device,
timed through `nas.trainer`'s own step so that the number is the search's cost. Models take turns a few steps
at a time (so drifting machine load hits all alike); reported are each model's median step time and the
median over rounds of its step time divided by dense's in the same round, which is robust to load shared with
other processes. Goals: per-image MoE within 1.15x of dense step time; our dense ViT at least 0.95x timm's
images/s.

    .venv/bin/python benchmarks/train_throughput.py [--rounds 30] [--steps 2] [--batch-size 128] [--threads N]
    .venv/bin/python benchmarks/train_throughput.py --dense vit-12x192 --moe vmoe-12x192 --device cuda \
        --precision bf16 --batch-size 256 --rounds 10 --steps 5     # ViT-Tiny at 224 px on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nas.config import ConfigError
from nas.datasets import Dataset, Split
from nas.devices import available_cores, resolve_device
from nas.recipe import TrainRecipe, param_groups
from nas.trainer import Loss, _Run
from search_spaces import ArchConfig, ModelOutput, load_arch

OUT = Path("results/benchmarks/train_throughput.json")


def models(dense: str, moe: str) -> dict:
    dense, moe = load_arch(dense), load_arch(moe)
    per_token = replace(moe, moe=replace(moe.moe, routing="per_token"))
    return {"dense": dense, "per_image_moe": moe, "per_token_moe": per_token}


def random_dataset(cfg: ArchConfig, n: int) -> Dataset:
    """Random images of the architecture's size, 4 super-classes: step time does not depend on the pixels."""
    g = torch.Generator().manual_seed(0)
    shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    split = Split(torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
                  torch.randint(0, cfg.num_classes, (cfg.num_classes,), generator=g).repeat(n)[:n])
    channels = cfg.in_channels
    return Dataset(f"random-{cfg.image_size}", split, split, split, cfg.num_classes,
                   tuple(map(str, range(cfg.num_classes))), (0.5,) * channels, (0.29,) * channels,
                   np.arange(cfg.num_classes) % 4, flip_ok=True)


class TimmInTheLoop(nn.Module):
    """timm's VisionTransformer of `cfg`'s shape, answering the trainer's `with_aux` call like ours."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.vit = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_channels,
                                     num_classes=cfg.num_classes, embed_dim=cfg.width, depth=cfg.depth,
                                     num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)

    def forward(self, images: torch.Tensor, *, with_aux: bool = False):
        logits = self.vit(images)
        return ModelOutput(logits, None, None) if with_aux else logits


def timm_run(cfg: ArchConfig, data: Dataset, recipe: TrainRecipe, device: torch.device) -> _Run:
    """The trainer's run of `cfg` with timm's model in place of ours: the same loop, loss and optimizer."""
    run = _Run(cfg, data, recipe, None, None, device)
    run.model = run.forward = TimmInTheLoop(cfg).to(device)
    run.optimizer = torch.optim.AdamW(param_groups(run.model, recipe.weight_decay), lr=recipe.lr, foreach=True)
    run.loss = Loss(recipe.label_smoothing)
    return run


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
    parser.add_argument("--dense", default="fmnist-vit-6x64", help="dense architecture (preset or YAML)")
    parser.add_argument("--moe", default="fmnist-vmoe-6x64", help="its per-image MoE of the same shape")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads or available_cores())
    try:
        device = resolve_device(args.device)
    except ConfigError as error:  # no such device here: one line, not a traceback
        sys.exit(f"train_throughput.py: error: {error}")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as nas.trainer.train sets it
    cfgs = models(args.dense, args.moe)
    data = random_dataset(cfgs["dense"], args.batch_size * (64 if cfgs["dense"].image_size <= 64 else 4))
    recipe = TrainRecipe(steps=10**9, batch_size=args.batch_size, device=args.device, precision=args.precision)
    groups = torch.as_tensor(data.superclasses)
    runs = {name: _Run(cfg, data, recipe, groups, None, device) for name, cfg in cfgs.items()}
    runs["timm_vit"] = timm_run(cfgs["dense"], data, recipe, device)
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
        "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "precision": str(runs["dense"].amp or torch.float32), "image_size": cfgs["dense"].image_size,
        "machine": platform.processor() or platform.machine(),
        "models": {name: {"arch": runs[name].cfg.name + (" (timm)" if name == "timm_vit" else ""),
                          "step_ms": round(1e3 * median[name], 2),
                          "images_per_s": round(args.batch_size / median[name], 1),
                          "step_time_vs_dense": round(ratio[name], 3),
                          "step_ms_per_round": [round(1e3 * t, 2) for t in times[name]]} for name in runs},
        "goal": "per_image_moe step time <= 1.15x dense; dense images/s >= 0.95x timm_vit's",
    }
    rows = report["models"]
    ours_vs_timm = rows["timm_vit"]["step_time_vs_dense"]  # timm's step time / ours = our images/s / timm's
    report["dense_vs_timm_images_per_s"] = ours_vs_timm
    report["goal_met"] = rows["per_image_moe"]["step_time_vs_dense"] <= 1.15 and ours_vs_timm >= 0.95
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, row in report["models"].items():
        print(f"{name:>14}: {row['images_per_s']:>8.1f} images/s  {row['step_ms']:>7.2f} ms/step  "
              f"{row['step_time_vs_dense']:.3f}x dense")
    print(f"ours (dense) vs timm's ViT: {report['dense_vs_timm_images_per_s']:.3f}x the images/s; wrote {args.out}")


if __name__ == "__main__":
    main()
