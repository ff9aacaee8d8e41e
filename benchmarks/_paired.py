"""Shared by the paired benchmarks: train arms over seeds with common random numbers, compare each with a baseline.

Seed i of every arm uses recipe seed i, so the arms of one seed see the same batches in the same order (and
start from the same random stream); with `shared_init`, as in `vmoe-nas confirm`, an MoE also starts from its
dense twin's initial weights of that seed in every parameter they share (`nas.confirm.twin_init`).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from nas import stats
from nas.confirm import twin_init
from nas.datasets import Dataset
from nas.evaluation import per_image_correct
from nas.recipe import TrainRecipe
from nas.trainer import train
from profilers import analytic_flops
from search_spaces import ArchConfig, build_model, count_params


def run_arms(arms: dict[str, ArchConfig], data: Dataset, recipe: TrainRecipe, seeds: int, *, superclasses=None,
             shared_init: bool = False, log=print) -> dict[str, dict]:
    """Every arm trained with seeds 0..seeds-1 (all arms of a seed before the next seed). Per arm: its
    architecture, FLOPs, parameters, per-seed runs and (n_seeds, n_val) correctness."""
    groups = data.superclasses[data.val.labels.numpy()] if data.superclasses is not None else None
    out = {name: {"arch": cfg.to_dict(), "name": cfg.name, "flops": analytic_flops(cfg),
                  "params": dict(zip(("total", "active"), count_params(build_model(cfg)))), "runs": [], "correct": []}
           for name, cfg in arms.items()}
    for seed in range(seeds):
        for name, cfg in arms.items():
            tick = time.perf_counter()
            result = train(cfg, data, replace(recipe, seed=seed), superclasses=superclasses,
                           init_from=twin_init(cfg, seed) if shared_init else None)
            correct = per_image_correct(result.model, data)
            run = {"seed": seed, "val_accuracy": result.val_accuracy, "router_accuracy": result.router_accuracy,
                   "expert_load": result.expert_load, "wall_time_s": round(time.perf_counter() - tick, 1)}
            if groups is not None:
                run["val_accuracy_by_group"] = [round(float(correct[groups == g].mean()), 4)
                                                for g in range(int(groups.max()) + 1)]
                if result.model.router is not None:
                    run.update(routing(result.model, data, groups))
            out[name]["runs"].append(run)
            out[name]["correct"].append(correct)
            log(f"seed {seed} {name:>16}: val {result.val_accuracy:.4f}  router {result.router_accuracy}  "
                f"{run['wall_time_s']:.0f} s")
    for arm in out.values():
        arm["correct"] = np.stack(arm["correct"])
    return out


@torch.inference_mode()
def routing(model, data: Dataset, groups: np.ndarray) -> dict:
    """How a per-image router's choices on val line up with the super-classes."""
    logits = model(data.normalize(data.val.images), with_aux=True).router_logits
    experts = logits.argmax(-1).numpy()
    return {"routing_mi_bits": round(stats.mutual_information(experts, groups), 4),
            "routing_purity": round(stats.purity(experts, groups), 4)}


def compare(results: dict[str, dict], baseline: str, *, margin: float = 0.0) -> list[stats.PairedResult]:
    """Every other arm against `baseline`, paired by seed, Holm-adjusted over the family."""
    return stats.holm_adjusted([
        stats.paired(arm["correct"], results[baseline]["correct"], name=name, cost="flops", margin=margin)
        for name, arm in results.items() if name != baseline
    ])


def report(results: dict[str, dict], pairs: list[stats.PairedResult]) -> dict:
    """JSON-ready: arms without their correctness arrays, and the pairs."""
    arms = {name: {k: v for k, v in arm.items() if k != "correct"} for name, arm in results.items()}
    return {"arms": arms, "pairs": [p.to_dict() for p in pairs]}


def table(results: dict[str, dict], pairs: list[stats.PairedResult], baseline: str) -> str:
    """Markdown: one row per arm, its mean val accuracy, routing measures and its gain over the baseline."""
    by_name = {p.name: p for p in pairs}
    lines = ["| arm | FLOPs | val top-1 (mean over seeds) | routing MI (bits) | gain vs " + baseline
             + " (95% CI) | p (Holm) | verdict |", "|---|---|---|---|---|---|---|"]
    for name, arm in results.items():
        mean = arm["correct"].mean()
        mi = [r["routing_mi_bits"] for r in arm["runs"] if "routing_mi_bits" in r]
        mi_text = f"{np.mean(mi):.2f}" if mi else "-"
        p = by_name.get(name)
        gain = (f"{100 * p.gain_mean:+.2f} pt [{100 * p.ci_low:+.2f}, {100 * p.ci_high:+.2f}]" if p else "-")
        lines.append(f"| {name} | {arm['flops'] / 1e6:.2f}M | {mean:.4f} | {mi_text} | {gain} | "
                     f"{f'{p.p_holm:.2g}' if p else '-'} | {p.verdict if p else 'baseline'} |")
    return "\n".join(lines)
