"""Search efficiency: does the one-shot study reach the multi-fidelity study's front for less compute?

Both studies search fashion-quick's space (264 architectures) on Fashion-MNIST for accuracy and FLOPs:

- multi-fidelity: fashion-quick as `make run` runs it (its 7 enqueued architectures, then TPE; 12 trials of
  100 steps, the best third of each kind continued to 300), the confirmation off;
- one-shot: a supernet of S steps (sandwich rule, 4 subnets a step, distillation), then `--trials` candidates
  (NSGA-II, fashion-quick's 7 enqueued first) scored with the weights they inherit on the first 2,000 validation
  images (fashion-oneshot now scores on 1,000, which ranks alike: evaluator_fidelity.py); one study per S.

Each study's picks are its (accuracy, FLOPs) front, at most P of them in preference order (rank, then crowding),
one row per P of `--picks` (fewer picks: less standalone training, a front of fewer points). Every pick is then
trained standalone from scratch at fashion-quick's top rung (300 steps, its recipe, seed 0, 1 thread: the same
run as `evaluator_fidelity.py`'s 300-step proxy, whose results are reused), and the front's hypervolume is
computed from those standalone accuracies against one reference point for all studies (accuracy 0; 1.1 x the
largest FLOPs of the space). Latency is left out: measured latency drifts between
processes, FLOPs are exact, and so each study's cost is its training alone.

Compute is counted in training images: the multi-fidelity study's trials (steps reached x batch, reused
duplicates 0), the supernet's (steps x batch x subnets a step), and, separately, the one-shot picks' standalone
runs (a multi-fidelity pick reached the top rung in the search: its standalone run is that trial's own).

    python benchmarks/evaluator_fidelity.py ...                 # not needed first; shares the 300-step runs
    python benchmarks/search_efficiency.py [--supernet-steps 75 150 300 600 --trials 300 --picks 1 2 4 8]

Writes results/benchmarks/search_efficiency.json and prints one row per study. Goal: a one-shot study reaches
the multi-fidelity study's hypervolume with at most a third of its compute. Resumable: the studies are stored
under results/ and the standalone runs in results/benchmarks/search_efficiency_standalone.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from evaluator_fidelity import PROXY_RUNGS, REFERENCE, STUDY, proxy_recipe, supernet_config, supernet_evaluator

from nas import record as records
from nas.fronts import hypervolume, preference_order
from nas.objectives import objectives_for
from nas.pareto import analyze
from nas.search import run_search
from nas.study import load_study_config
from nas.trainer import train
from nas.trial import build_context
from profilers import analytic_flops
from profilers.latency_calibration import space_architectures
from search_spaces import ArchConfig

OUTPUT = Path("results/benchmarks/search_efficiency.json")
STANDALONE = Path("results/benchmarks/search_efficiency_standalone.json")
OBJECTIVES = ["accuracy", "flops"]
STANDALONE_STEPS = PROXY_RUNGS[-1]  # fashion-quick's top rung, the budget its confirmation retrains at


def multi_fidelity_config():
    return load_study_config(STUDY, study_name=f"{STUDY}-multifidelity", objectives=OBJECTIVES,
                             confirm={"enabled": False})


def one_shot_config(steps: int, trials: int):
    # evaluator_fidelity's study name and supernet of the same steps: the supernet is trained once for both.
    evaluator = supernet_evaluator(steps, 2, num_threads=None, val_images=2000)
    return load_study_config(STUDY, study_name=supernet_config(steps, 2).study_name, objectives=OBJECTIVES,
                             sampler="nsga2", n_trials=trials, evaluator=evaluator, confirm={"enabled": False})


def searched(label: str, cfg, picks: int) -> dict:
    """Run (or resume) the study of `cfg`: its front, its first `picks` front members in preference order (rank,
    then crowding) and the training images its search spent."""
    study = run_search(cfg, progress=True)
    frame = analyze(study, objectives=OBJECTIVES).trials
    front = frame[frame["on_front"]].reset_index(drop=True)
    order = preference_order(front[["accuracy", "flops"]].to_numpy(float), [True, False])[:picks]
    return {"label": label, "study": cfg.study_name, "evaluator": cfg.evaluator_kind,
            "trials": int(frame["eligible"].sum()), "front_size": len(front),
            "picks": [records.read(study.trials[int(n)]).arch for n in front.loc[order, "trial"]],
            "search_images": search_images(cfg, study)}


def search_images(cfg, study) -> int:
    """Training images the search spent: per trial steps reached x batch (a reused duplicate trains nothing), or
    the supernet's steps x batch x subnets a step."""
    recipe = cfg.recipe()
    if cfg.evaluator_kind == "supernet":
        return recipe.steps * recipe.batch_size * cfg.supernet.subnets_per_step
    steps = [r.rung or 0 for r in records.read_all(study) if r.arch is not None and r.duplicate_of is None]
    return int(sum(steps)) * recipe.batch_size


# ---------------------------------------------------------------- standalone evaluation of the picks


def standalone_key(arch: ArchConfig) -> str:
    return f"{arch.name}-n{STANDALONE_STEPS}-s0"


def known_standalone() -> dict[str, float]:
    """Standalone accuracies measured before: this benchmark's, and evaluator_fidelity's 300-step proxies (the
    same run: fashion-quick's recipe for 300 steps, seed 0, 1 thread)."""
    known = json.loads(STANDALONE.read_text()) if STANDALONE.is_file() else {}
    if REFERENCE.is_file():
        for entry in json.loads(REFERENCE.read_text())["archs"].values():
            arch = ArchConfig.from_dict(entry["arch"])
            if str(STANDALONE_STEPS) in entry["proxy"]:
                known.setdefault(standalone_key(arch), entry["proxy"][str(STANDALONE_STEPS)])
    return known


@functools.cache
def _study_context():
    """fashion-quick's data and super-classes, loaded once per process (and per pool worker)."""
    return build_context(load_study_config(STUDY), progress=False)


def _train_standalone(arch_dict: dict) -> float:
    torch.set_num_threads(1)
    ctx = _study_context()
    arch = ArchConfig.from_dict(arch_dict)
    return train(arch, ctx.dataset, proxy_recipe(ctx), superclasses=ctx.groups_for(arch)).val_accuracy


def evaluate_standalone(archs: list[ArchConfig], processes: int) -> dict[str, float]:
    """Standalone accuracy of each of `archs`, training the ones not known yet, `processes` at a time."""
    known = known_standalone()
    distinct = {standalone_key(a): a for a in archs}
    todo = [a for key, a in distinct.items() if key not in known]
    print(f"standalone: {len(distinct)} distinct picks, {len(distinct) - len(todo)} known, {len(todo)} to train "
          f"({processes} at a time)")
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) if processes > 1 else None
    results = (pool.map if pool else map)(_train_standalone, [a.to_dict() for a in todo])
    for arch, accuracy in zip(todo, results):
        known[standalone_key(arch)] = accuracy
        STANDALONE.parent.mkdir(parents=True, exist_ok=True)
        STANDALONE.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        print(f"  {arch.name}: {accuracy:.4f}", flush=True)
    if pool:
        pool.shutdown()
    return known


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernet-steps", type=int, nargs="+", default=[75, 150, 300, 600])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--picks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--processes", type=int, default=2, help="standalone runs at a time (1 thread each)")
    args = parser.parse_args()
    tick = time.perf_counter()
    configs = [("multi-fidelity", multi_fidelity_config())]
    configs += [(f"one-shot {s}", one_shot_config(s, args.trials)) for s in args.supernet_steps]
    studies = [searched(label, cfg, max(args.picks)) for label, cfg in configs]
    # The multi-fidelity study is the baseline with all its picks; each one-shot study once per number of picks.
    studies = studies[:1] + [{**s, "label": f"{s['label']}, {k} picks", "picks": s["picks"][:k]}
                             for s in studies[1:] for k in sorted({min(p, len(s["picks"])) for p in args.picks})]
    standalone = evaluate_standalone([a for s in studies for a in s["picks"]], args.processes)
    data = _study_context().dataset
    space = space_architectures(load_study_config(STUDY).space, image_size=data.image_size,
                                in_channels=data.in_channels, num_classes=data.num_classes)
    reference = np.array([0.0, 1.1 * max(analytic_flops(a) for a in space)])
    objectives = objectives_for(OBJECTIVES)
    batch = load_study_config(STUDY).recipe().batch_size
    rows = []
    for s in studies:
        values = np.array([[standalone[standalone_key(a)], analytic_flops(a)] for a in s["picks"]])
        # A multi-fidelity pick is a trial that trained to the top rung from scratch: its standalone run is the
        # search's own (same recipe and seed: the same accuracy), paid for in its search images.
        evaluation = 0 if s["evaluator"] == "train" else len(s["picks"]) * STANDALONE_STEPS * batch
        rows.append({**{k: v for k, v in s.items() if k != "picks"},
                     "picks": [{"name": a.name, "flops": int(f), "standalone_accuracy": float(acc)}
                               for a, (acc, f) in zip(s["picks"], values)],
                     "hypervolume": hypervolume(values, objectives, reference), "evaluation_images": evaluation,
                     "total_images": s["search_images"] + evaluation})
    base = rows[0]
    for row in rows:
        row["search_compute_ratio"] = row["search_images"] / base["search_images"]
        row["total_compute_ratio"] = row["total_images"] / base["total_images"]
        row["reaches_multi_fidelity"] = bool(row["hypervolume"] >= base["hypervolume"])
    cheapest = min((r for r in rows[1:] if r["reaches_multi_fidelity"]), key=lambda r: r["total_images"],
                   default=None)
    out = {"study": STUDY, "objectives": OBJECTIVES, "standalone_steps": STANDALONE_STEPS, "standalone_seeds": 1,
           "reference_point": {"accuracy": 0.0, "flops": float(reference[1])}, "studies": rows,
           "cheapest_one_shot_reaching": None if cheapest is None else cheapest["label"],
           "goal": "a one-shot study reaches the multi-fidelity hypervolume with <= 1/3 of its total training images",
           "goal_met": bool(cheapest is not None and cheapest["total_compute_ratio"] <= 1 / 3),
           "wall_time_s": round(time.perf_counter() - tick, 1)}
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'study':>26} {'trials':>6} {'picks':>5} {'HV':>7} {'search images':>14} {'ratio':>6} {'with picks':>11}")
    for r in rows:
        print(f"{r['label']:>26} {r['trials']:>6} {len(r['picks']):>5} {r['hypervolume']:.4f} "
              f"{r['search_images']:>14,} {r['search_compute_ratio']:>6.2f} {r['total_compute_ratio']:>11.2f}")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
