"""How well does each evaluator rank architectures the way long standalone training does?

Draws architectures from fashion-quick's space, stratified over FLOPs (dense and MoE separately), trains each
standalone at a long budget as the reference, and scores them with the cheap evaluators:

- the multi-fidelity search's proxies: the accuracy at 100 and at 300 steps of fashion-quick's recipe (one
  300-step run evaluated at 100, as the search's first rung does: the schedule spans the last rung);
- the supernet's inherited-weight accuracy (`vmoe-nas supernet` over the same space, then `score`).

Two phases, both resumable:

    python benchmarks/evaluator_fidelity.py reference [--archs 24 --steps 1500]   # hours on 1 thread; one per core
    python benchmarks/evaluator_fidelity.py score [--supernet-steps 75 150 300 600]  # the table

`reference` appends each architecture's runs to benchmarks/fidelity_reference.json as soon as they finish
(committed in the repo: a later change to an evaluator re-scores without retraining). Processes started side by
side (one per core) share the work: each trains the next architecture that no other one holds. `score` reads it,
scores the finished ones with the supernet and writes results/benchmarks/evaluator_fidelity.json: Kendall tau
and Spearman rho of the reference against each evaluator with bootstrap 95% intervals over architectures,
top-5 overlap, the training images each evaluator spent, and the noise ceiling: the tau a perfect evaluator
would reach against a one-seed reference (`--seed-sd`). `--batch-size`, `--lr`, `--no-distill` and
`--random-subnets` change the supernet's recipe (each variant its own checkpoint and JSON file).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import time
from pathlib import Path

import numpy as np
import torch

from nas.config import write_atomically
from nas.study import load_study_config
from nas.trainer import train
from nas.trial import build_context
from profilers import analytic_flops
from profilers.latency_calibration import space_architectures
from search_spaces import ArchConfig

REFERENCE = Path(__file__).parent / "fidelity_reference.json"
OUTPUT = Path("results/benchmarks/evaluator_fidelity.json")
CHECKPOINTS = Path("results/benchmarks/fidelity-checkpoints")
STUDY = "fashion-quick"
PROXY_RUNGS = (100, 300)  # fashion-quick's rungs


def stratified(archs: list[ArchConfig], count: int, seed: int = 0) -> list[ArchConfig]:
    """`count` architectures, a third dense and the rest MoE, each kind one per FLOPs stratum (equal-count
    bins of its kind sorted by FLOPs), in a shuffled order so that any prefix spans the FLOPs range."""
    rng = np.random.default_rng(seed)
    picked = []
    for kind_archs, n in (([a for a in archs if not a.is_moe], count // 3),
                          ([a for a in archs if a.is_moe], count - count // 3)):
        ordered = sorted(kind_archs, key=lambda a: (analytic_flops(a), a.name))
        for stratum in np.array_split(np.arange(len(ordered)), n):
            picked.append(ordered[int(rng.choice(stratum))])
    return [picked[i] for i in rng.permutation(len(picked))]


def load_reference() -> dict:
    return json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {"archs": {}}


def run_reference(args) -> None:
    cfg = load_study_config(STUDY)
    ctx = build_context(cfg, progress=False)
    data = ctx.dataset
    archs = stratified(space_architectures(cfg.space, image_size=data.image_size, in_channels=data.in_channels,
                                   num_classes=data.num_classes), args.archs)
    proxy = proxy_recipe(ctx)
    # Checkpointed every 250 steps (and the proxy at its rungs): a killed run resumes inside an architecture.
    long = dataclasses.replace(ctx.recipe, steps=args.steps, eval_every=250, num_threads=1)
    store = load_reference()
    store.update(study=STUDY, reference_steps=args.steps, batch_size=ctx.recipe.batch_size,
                 proxy_recipe=proxy.to_dict(), reference_recipe=long.to_dict(), order=[a.name for a in archs])
    for index, arch in enumerate(archs):
        with claimed(CHECKPOINTS / arch.config_hash()) as checkpoints:
            # Checked inside the claim: another process may have finished it since (and let go of its claim).
            if checkpoints is None or arch.name in load_reference()["archs"]:
                continue
            entry = train_reference(ctx, arch, proxy, long, checkpoints)
            with open(CHECKPOINTS.with_suffix(".lock"), "a") as lock:  # processes on other cores write it too
                fcntl.flock(lock, fcntl.LOCK_EX)
                store["archs"] = {**load_reference()["archs"], arch.name: entry}
                write_atomically(REFERENCE, json.dumps(store, indent=1) + "\n")  # kept as soon as it is done
        print(f"[{index + 1}/{len(archs)}] {arch.name}: reference {entry['reference']:.4f} proxy "
              f"{entry['proxy']} ({entry['wall_time_s']:.0f} s)", flush=True)


@contextlib.contextmanager
def claimed(checkpoints: Path):
    """`checkpoints` while this process holds its lock, or None while another does. The lock goes with its
    process (kill -9 included), so a killed run's architecture is taken up by the next process to reach it."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    with open(checkpoints / "claim.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield checkpoints


def proxy_recipe(ctx):
    """fashion-quick's recipe for one 300-step run evaluated at each rung, on 1 thread: its proxies, and the
    standalone run search_efficiency.py trains its picks with (so each reuses the other's results)."""
    return dataclasses.replace(ctx.recipe, steps=PROXY_RUNGS[-1], eval_every=PROXY_RUNGS[0], num_threads=1)


def train_reference(ctx, arch, proxy, long, checkpoints: Path) -> dict:
    groups, data = ctx.groups_for(arch), ctx.dataset
    tick = time.perf_counter()
    proxy_run = train(arch, data, proxy, superclasses=groups, checkpoint_dir=checkpoints / "proxy")
    reference_run = train(arch, data, long, superclasses=groups, checkpoint_dir=checkpoints / "reference")
    return {"arch": arch.to_dict(), "flops": analytic_flops(arch), "moe": arch.is_moe,
            "reference": reference_run.val_accuracy, "reference_steps": long.steps,
            "proxy": {str(step): acc for step, acc in proxy_run.evals if step in PROXY_RUNGS},
            "wall_time_s": round(time.perf_counter() - tick, 1)}


def rank_agreement(reference: np.ndarray, scores: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> dict:
    """Kendall tau and Spearman rho of `scores` against `reference`, each with a bootstrap 95% interval
    (architectures resampled with replacement), and the overlap of their top 5."""
    from scipy.stats import kendalltau, spearmanr

    rng = np.random.default_rng(seed)
    n = len(reference)
    draws = {"kendall_tau": [], "spearman_rho": []}
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        if len(set(reference[pick])) < 2 or len(set(scores[pick])) < 2:
            continue  # a resample of one distinct value has no ranking
        draws["kendall_tau"].append(kendalltau(reference[pick], scores[pick]).statistic)
        draws["spearman_rho"].append(spearmanr(reference[pick], scores[pick]).statistic)
    top = min(5, n)
    out = {"kendall_tau": float(kendalltau(reference, scores).statistic),
           "spearman_rho": float(spearmanr(reference, scores).statistic),
           "top5_overlap": len(set(np.argsort(-reference)[:top]) & set(np.argsort(-scores)[:top])), "n": n}
    for name, values in draws.items():
        out[f"{name}_ci"] = [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]
    return out


def noise_ceiling(reference: np.ndarray, seed_sd: float, *, draws: int = 4000, seed: int = 0) -> dict:
    """The Kendall tau a perfect evaluator would reach against a one-seed reference: the architectures' true
    accuracies (the reference shrunk to its spread less a seed's variance) against themselves plus one seed's
    noise of sd `seed_sd`. Mean and the 95% range over `draws` simulated references."""
    from scipy.stats import kendalltau

    rng = np.random.default_rng(seed)
    variance = reference.var(ddof=1)
    if seed_sd < 0 or seed_sd**2 >= variance:
        raise SystemExit(f"--seed-sd {seed_sd:g}: must be >= 0 and below the reference's own sd ({variance**0.5:.4f})")
    true = reference.mean() + (reference - reference.mean()) * np.sqrt(max(variance - seed_sd**2, 0.0) / variance)
    taus = [kendalltau(true, true + rng.normal(0.0, seed_sd, len(true))).statistic for _ in range(draws)]
    return {"kendall_tau": float(np.mean(taus)), "range_95": [float(np.percentile(taus, 2.5)),
                                                              float(np.percentile(taus, 97.5))], "seed_sd": seed_sd}


def supernet_evaluator(steps: int, random_subnets: int, **options) -> dict:
    """A supernet evaluator of fashion-quick's recipe (lr, batch; `options` override), `steps` supernet steps."""
    quick = load_study_config(STUDY).recipe()
    return {"kind": "supernet", "steps": steps, "batch_size": quick.batch_size, "lr": quick.lr, "augment": False,
            "eval_every": max(steps // 4, 1), "random_subnets": random_subnets, "distill": True, "num_threads": 1,
            **options}


def supernet_config(steps: int, random_subnets: int, **options):
    """fashion-quick's study with a supernet evaluator, named by its steps: search_efficiency.py's one-shot
    study of the same steps trains (or finds) the same supernet."""
    return load_study_config(STUDY, study_name=f"{STUDY}-oneshot-{steps}",
                             evaluator=supernet_evaluator(steps, random_subnets, **options), confirm={"enabled": False})


def multi_fidelity_images(kinds: list[bool], batch: int) -> int:
    """What fashion-quick's search spends at least to rank architectures of these kinds (MoE or not): each trains
    to the first rung, the best third of its kind (`nas.rung_policy.MOASHA`: at least one) on to the last."""
    promoted = sum(max(1, count // 3) for count in (kinds.count(True), kinds.count(False)) if count)
    return (len(kinds) * PROXY_RUNGS[0] + promoted * (PROXY_RUNGS[-1] - PROXY_RUNGS[0])) * batch


def tau_gain(reference: np.ndarray, better: np.ndarray, worse: np.ndarray, *, resamples: int = 2000,
             seed: int = 0) -> dict:
    """Kendall tau of `better` minus that of `worse`, both against `reference`, with a paired bootstrap 95%
    interval (the same resampled architectures for both)."""
    from scipy.stats import kendalltau

    rng = np.random.default_rng(seed)
    n, draws = len(reference), []
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        if len(set(reference[pick])) > 1:
            draws.append(kendalltau(reference[pick], better[pick]).statistic
                         - kendalltau(reference[pick], worse[pick]).statistic)
    point = kendalltau(reference, better).statistic - kendalltau(reference, worse).statistic
    return {"difference": float(point),
            "ci": [float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))]}


def run_score(args) -> None:
    """Score the finished references with a supernet of each of `--supernet-steps` (trained here on first use,
    resumable, shared with search_efficiency.py's one-shot studies) and with the proxies."""
    from nas.supernet import score, train_supernet

    store = load_reference()
    done = store["archs"]
    if len(done) < 3:
        raise SystemExit(f"{len(done)} reference architectures finished: too few to rank; score again later")
    names = sorted(done)
    archs = [ArchConfig.from_dict(done[n]["arch"]) for n in names]
    reference = np.array([done[n]["reference"] for n in names])
    ceilings = {f"{sd:g}": noise_ceiling(reference, sd) for sd in args.seed_sd}  # before training: a bad --seed-sd
    batch = store["batch_size"]
    evaluators = {
        "proxy_100": (np.array([done[n]["proxy"]["100"] for n in names]), len(names) * 100 * batch),
        "proxy_300": (np.array([done[n]["proxy"]["300"] for n in names]), len(names) * 300 * batch),
    }
    supernets = {}
    given = {"batch_size": args.batch_size, "lr": args.lr}
    options = {"distill": not args.no_distill, **{k: v for k, v in given.items() if v is not None}}
    variant = "".join([f"_b{args.batch_size}" if args.batch_size is not None else "",
                       f"_lr{args.lr:g}" if args.lr is not None else "",
                       "_nodistill" if args.no_distill else "", f"_rs{args.random_subnets}"
                       if args.random_subnets != 2 else ""])
    for steps in args.supernet_steps:
        trained = train_supernet(build_context(supernet_config(steps, args.random_subnets, **options)),
                                 progress=args.progress)
        key = f"{steps}{variant}"
        supernets[key] = {"random_subnets": args.random_subnets, **options,
                          "largest_accuracy": trained.largest_accuracy,
                          "smallest_accuracy": trained.smallest_accuracy, "wall_time_s": trained.wall_time_s}
        for count in args.val_images:  # the same supernet scored on the first `count` validation images
            ctx = build_context(supernet_config(steps, args.random_subnets, val_images=count or None, **options))
            tick = time.perf_counter()
            inherited = np.array([score(ctx, trained.net, arch)["accuracy"] for arch in archs])
            name = f"supernet_{key}" + (f"_val{count}" if count else "")
            evaluators[name] = (inherited, trained.train_images)
            supernets[key][f"scoring_s_per_arch_val{count or len(ctx.dataset.val)}"] = round(
                (time.perf_counter() - tick) / len(names), 3)
    search_images = multi_fidelity_images([done[n]["moe"] for n in names], batch)
    out = {"study": STUDY, "n_archs": len(names), "reference_steps": store["reference_steps"], "reference_seeds": 1,
           "multi_fidelity_search_images": search_images, "supernets": supernets, "evaluators": {},
           "archs": {n: {"flops": done[n]["flops"], "moe": done[n]["moe"], "reference": done[n]["reference"],
                         "proxy": done[n]["proxy"], **{e: float(v[0][i]) for e, v in evaluators.items()
                                                       if e.startswith("supernet")}}
                     for i, n in enumerate(names)},
           "goal": "tau(supernet) >= 0.7 and above tau(proxy_100), with <= 1/5 of the multi-fidelity search's images",
           "noise_ceiling": ceilings}
    for name, (scores, images) in evaluators.items():
        out["evaluators"][name] = {**rank_agreement(reference, scores), "training_images": int(images),
                                   "images_over_multi_fidelity": round(images / search_images, 3)}
        if name.startswith("supernet"):
            out["evaluators"][name]["tau_over_proxy_100"] = tau_gain(reference, scores, evaluators["proxy_100"][0])
    output = OUTPUT.with_name(f"{OUTPUT.stem}{variant}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(names)} architectures, reference {store['reference_steps']} steps (1 seed); the multi-fidelity "
          f"search ranks them with {search_images:,} training images")
    print(f"{'evaluator':>20} {'tau [95% CI]':>22} {'rho [95% CI]':>22} {'top-5':>6} {'train images':>13} {'/ m-f':>6}")
    for name, e in out["evaluators"].items():
        tau, rho = e["kendall_tau_ci"], e["spearman_rho_ci"]
        print(f"{name:>20} {e['kendall_tau']:+.2f} [{tau[0]:+.2f}, {tau[1]:+.2f}] {e['spearman_rho']:+.2f} "
              f"[{rho[0]:+.2f}, {rho[1]:+.2f}] {e['top5_overlap']:>6} {e['training_images']:>13,} "
              f"{e['images_over_multi_fidelity']:>6.2f}")
    for ceiling in out["noise_ceiling"].values():
        low, high = ceiling["range_95"]
        print(f"a perfect evaluator against this 1-seed reference (seed sd {100 * ceiling['seed_sd']:.2f} points): "
              f"tau {ceiling['kendall_tau']:.2f} [{low:.2f}, {high:.2f}]")
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    reference = commands.add_parser("reference", help="train the reference and proxy runs (resumable)")
    reference.add_argument("--archs", type=int, default=24)
    reference.add_argument("--steps", type=int, default=1500)
    score = commands.add_parser("score", help="rank agreement of each evaluator with the reference")
    score.add_argument("--supernet-steps", type=int, nargs="+", default=[75, 150, 300, 600])
    score.add_argument("--random-subnets", type=int, default=2)
    score.add_argument("--batch-size", type=int, help="the supernet's batch (default: fashion-quick's, 128)")
    score.add_argument("--lr", type=float, help="the supernet's learning rate (default: fashion-quick's, 3e-3)")
    score.add_argument("--no-distill", action="store_true", help="no in-place distillation from the largest")
    score.add_argument("--val-images", type=int, nargs="+", default=[0],
                       help="validation images each candidate is scored on (0: the whole split); several: each")
    score.add_argument("--seed-sd", type=float, nargs="+", default=[0.0025, 0.0035, 0.005],
                       help="a seed's sd of one reference accuracy, for the noise ceiling (0.0035: the 1,500-step "
                            "gains' sd of ~0.5 points in verdict_stability.py, over sqrt 2); several: each")
    score.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    (run_reference if args.command == "reference" else run_score)(args)


if __name__ == "__main__":
    main()
