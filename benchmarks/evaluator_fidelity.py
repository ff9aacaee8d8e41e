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
would reach against a reference of this many seeds (`--seed-sd`). The proxies share the first reference
seed's weights and data order: `--reference-seeds 1 2` scores them against seeds of their own. `--batch-size`,
`--lr`, `--no-distill`, `--no-sandwich`, `--random-subnets`, `--supernet-seed` and `--finetune-steps` make
variants (each its own JSON file, which keeps the step counts scored before; a supernet recipe its own
checkpoint). `reference --seed S` adds seed S's long run of each
architecture (after the first seed's): `score` averages the seeds every architecture has and measures a seed's
sd from them; `rescore` re-scores the tables written before against the reference as it is now, no training.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nas.config import write_atomically
from nas.processes import interruptible, interruption_name
from nas.study import load_study_config
from nas.trainer import TrainingInterrupted, train
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
    store, seed = load_reference(), long.seed if args.seed is None else args.seed
    if seed != long.seed and (any(a.name not in store["archs"] for a in archs)
                              or store.get("reference_recipe") != long.to_dict()):
        raise SystemExit(f"--seed {seed}: train seed {long.seed}'s reference of every architecture first, with "
                         f"this recipe ({args.steps} steps, fashion-quick's as it is now)")
    store.update(study=STUDY, reference_steps=args.steps, batch_size=ctx.recipe.batch_size,
                 proxy_recipe=proxy.to_dict(), reference_recipe=long.to_dict(), order=[a.name for a in archs])
    for index, arch in enumerate(archs):
        with claimed(CHECKPOINTS / arch.config_hash(), seed) as checkpoints:
            # Checked inside the claim: another process may have finished it since (and let go of its claim).
            entry = load_reference()["archs"].get(arch.name)
            if checkpoints is None or (entry is not None and seed in reference_accuracies(entry, long.seed)):
                continue
            if seed == long.seed:
                run = entry = train_reference(ctx, arch, proxy, long, checkpoints)
            else:
                run = train_another_seed(ctx, arch, dataclasses.replace(long, seed=seed), checkpoints)
            with open(CHECKPOINTS.with_suffix(".lock"), "a") as lock:  # processes on other cores write it too
                fcntl.flock(lock, fcntl.LOCK_EX)
                done = load_reference()["archs"]
                if seed != long.seed:
                    entry = {**done[arch.name], "other_seeds": {**done[arch.name].get("other_seeds", {}),
                                                                str(seed): run}}
                store["archs"] = {**done, arch.name: entry}
                write_atomically(REFERENCE, json.dumps(store, indent=1) + "\n")  # kept as soon as it is done
        print(f"[{index + 1}/{len(archs)}] {arch.name}, seed {seed}: reference {run['reference']:.4f} "
              f"({run['wall_time_s']:.0f} s)", flush=True)


def reference_accuracies(entry: dict, first_seed: int) -> dict[int, float]:
    """An architecture's reference accuracy by seed: its first run's (the recipe's seed) and any other seed's."""
    others = entry.get("other_seeds", {})
    return {first_seed: entry["reference"], **{int(seed): run["reference"] for seed, run in others.items()}}


def train_another_seed(ctx, arch, long, checkpoints: Path) -> dict:
    """The long run alone, with the recipe's seed (weights and data order) changed: a seed-averaged reference."""
    tick = time.perf_counter()
    run = train(arch, ctx.dataset, long, superclasses=ctx.groups_for(arch),
                checkpoint_dir=checkpoints / f"reference-seed{long.seed}")
    return {"reference": run.val_accuracy, "wall_time_s": round(time.perf_counter() - tick, 1)}


@contextlib.contextmanager
def claimed(checkpoints: Path, seed: int):
    """`checkpoints` while this process holds its lock on `seed`'s runs, or None while another does. The lock goes
    with its process (kill -9 included), so a killed run's architecture is taken up by the next process to reach
    it."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    with open(checkpoints / f"claim-seed{seed}.lock", "a") as lock:
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


def noise_ceiling(reference: np.ndarray, seed_sd: float, seeds: int = 1, *, draws: int = 4000, seed: int = 0) -> dict:
    """The Kendall tau a perfect evaluator would reach against a reference averaged over `seeds` seeds: the
    architectures' true accuracies (the reference shrunk to its spread less the seeds' noise) against themselves
    plus the noise of a mean of `seeds` runs, each of sd `seed_sd`. Mean and the 95% range over `draws` simulated
    references."""
    from scipy.stats import kendalltau

    rng = np.random.default_rng(seed)
    variance, noise = reference.var(ddof=1), seed_sd / np.sqrt(seeds)
    if seed_sd < 0 or noise**2 >= variance:
        raise SystemExit(f"--seed-sd {seed_sd:g}: must be >= 0 and, over sqrt {seeds} (seeds averaged), below the "
                         f"reference's own sd ({variance**0.5:.4f})")
    true = reference.mean() + (reference - reference.mean()) * np.sqrt((variance - noise**2) / variance)
    taus = [kendalltau(true, true + rng.normal(0.0, noise, len(true))).statistic for _ in range(draws)]
    return {"kendall_tau": float(np.mean(taus)), "range_95": [float(np.percentile(taus, 2.5)),
                                                              float(np.percentile(taus, 97.5))],
            "seed_sd": seed_sd, "seeds": seeds}


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
    names = sorted(store["archs"])
    reference, _ = seed_averaged(store, args.reference_seeds)
    for sd in args.seed_sd:  # before training: a bad --seed-sd
        noise_ceiling(reference.mean(axis=1), sd, reference.shape[1], draws=1)
    archs = [ArchConfig.from_dict(store["archs"][n]["arch"]) for n in names]
    evaluators, supernets = {}, {}
    given = {"batch_size": args.batch_size, "lr": args.lr, "seed": args.supernet_seed,
             "finetune_steps": args.finetune_steps}
    options = {"distill": not args.no_distill, **({"sandwich": False} if args.no_sandwich else {}),
               **{k: v for k, v in given.items() if v is not None}}
    variant = "".join([f"_b{args.batch_size}" if args.batch_size is not None else "",
                       f"_lr{args.lr:g}" if args.lr is not None else "",
                       "_nodistill" if args.no_distill else "", "_nosandwich" if args.no_sandwich else "",
                       f"_rs{args.random_subnets}"
                       if args.random_subnets != 2 else "",
                       f"_seed{args.supernet_seed}" if args.supernet_seed is not None else "",
                       f"_ft{args.finetune_steps}" if args.finetune_steps is not None else ""])
    output = OUTPUT.with_name(f"{OUTPUT.stem}{variant}.json")
    earlier = earlier_scores(output, store)  # before training: what an unreadable table loses is said first
    for steps in args.supernet_steps:
        trained = train_supernet(build_context(supernet_config(steps, args.random_subnets, **options)),
                                 progress=args.progress)
        key = f"{steps}{variant}"
        supernets[key] = {"random_subnets": args.random_subnets, **options,
                          "largest_accuracy": trained.largest_accuracy,
                          "smallest_accuracy": trained.smallest_accuracy, "wall_time_s": trained.wall_time_s,
                          "train_images": trained.train_images}
        for count in args.val_images:  # the same supernet scored on the first `count` validation images
            ctx = build_context(supernet_config(steps, args.random_subnets, val_images=count or None, **options))
            tick = time.perf_counter()
            inherited = {name: score(ctx, trained.net, arch)["accuracy"] for name, arch in zip(names, archs)}
            finetuned = len(names) * (args.finetune_steps or 0) * ctx.recipe.batch_size
            evaluators[f"supernet_{key}" + (f"_val{count}" if count else "")] = (inherited,
                                                                              trained.train_images + finetuned)
            supernets[key][f"scoring_s_per_arch_val{count or len(ctx.dataset.val)}"] = round(
                (time.perf_counter() - tick) / len(names), 3)
    write_table(store, args, *merged(earlier, evaluators, supernets), output)


def run_rescore(args) -> None:
    """Each table `score` wrote before, its supernets' scores against the reference as it is now (more seeds, a
    choice of seeds): no training."""
    store = load_reference()
    tables = sorted(OUTPUT.parent.glob(f"{OUTPUT.stem}*.json"))
    if not tables:
        raise SystemExit(f"no {OUTPUT.parent}/{OUTPUT.stem}*.json: run `score` first")
    for table in tables:
        try:
            write_table(store, args, *stored_scores(table, store), table)
        except UnusableTable as why:
            print(f"{table}: skipped, {why}")


class UnusableTable(Exception):
    """A stored table whose scores cannot be read again; the message says why."""


def stored_scores(table: Path, store: dict) -> tuple[dict, dict]:
    """A table's supernet scores ({name: ({arch: score}, training images)}) and its supernets."""
    try:
        before = json.loads(table.read_text())
        missing = sorted(set(store["archs"]) - set(before["archs"]))
        evaluators = {name: e["training_images"] for name, e in before["evaluators"].items()}
        supernets = dict(before["supernets"])
    except KeyError as error:
        raise UnusableTable(f"written by an older evaluator_fidelity.py (no {error})") from None
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise UnusableTable(f"unreadable ({type(error).__name__}: {error})") from None
    if missing:
        raise UnusableTable(f"it scored no {', '.join(missing)}")
    return ({name: ({n: before["archs"][n][name] for n in store["archs"]}, images)
             for name, images in evaluators.items() if name.startswith("supernet")}, supernets)


def earlier_scores(table: Path, store: dict) -> tuple[dict, dict]:
    """The scores a variant's table holds from before, to keep beside new ones (none, saying why, when it
    cannot be read)."""
    if not table.is_file():
        return {}, {}
    try:
        return stored_scores(table, store)
    except UnusableTable as why:
        print(f"{table}: its earlier scores are dropped, {why}")
        return {}, {}


def merged(earlier: tuple[dict, dict], evaluators: dict, supernets: dict) -> tuple[dict, dict]:
    """New scores beside the earlier ones, by steps; a supernet scored again drops all its earlier rows (those of
    every `--val-images` count)."""
    before, before_supernets = earlier
    kept = {name: e for name, e in before.items()
            if not any(name == f"supernet_{key}" or name.startswith(f"supernet_{key}_val") for key in supernets)}
    by_steps = dict(sorted({**kept, **evaluators}.items(), key=lambda item: (int(item[0].split("_")[1]), item[0])))
    return by_steps, {**before_supernets, **supernets}


def seed_averaged(store: dict, seeds: list[int] | None) -> tuple[np.ndarray, list[int]]:
    """Reference accuracies, architectures (sorted by name) by seeds, and the seeds: `seeds`, or the seeds every
    architecture has."""
    if len(store["archs"]) < 3:
        raise SystemExit(f"{len(store['archs'])} reference architectures finished: too few to rank; score again later")
    first = store["reference_recipe"]["seed"]
    runs = [reference_accuracies(store["archs"][n], first) for n in sorted(store["archs"])]
    shared = sorted(set.intersection(*(set(r) for r in runs)))
    chosen = shared if seeds is None else seeds
    if not chosen or set(chosen) - set(shared) or len(set(chosen)) < len(chosen):
        raise SystemExit(f"--reference-seeds {' '.join(map(str, chosen))}: every architecture has seeds "
                         f"{' '.join(map(str, shared))}")
    return np.array([[r[s] for s in chosen] for r in runs]), chosen


def measured_seed_sd(reference: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> dict | None:
    """A seed's sd of one reference accuracy, pooled over architectures, with a bootstrap 95% interval (None with
    one seed)."""
    if reference.shape[1] < 2:
        return None
    variances = reference.var(axis=1, ddof=1)
    rng = np.random.default_rng(seed)
    draws = [np.sqrt(variances[rng.integers(0, len(variances), len(variances))].mean()) for _ in range(resamples)]
    return {"sd": float(np.sqrt(variances.mean())), "ci": [float(np.percentile(draws, 2.5)),
                                                           float(np.percentile(draws, 97.5))]}


def write_table(store: dict, args, evaluators: dict, supernets: dict, output: Path) -> None:
    """Rank agreement of the proxies and `evaluators` ({name: ({arch: score}, training images)}) with the
    reference, the noise ceiling, written to `output` and printed."""
    names = sorted(store["archs"])
    done, batch = store["archs"], store["batch_size"]
    by_seed, chosen = seed_averaged(store, args.reference_seeds)
    reference, seeds = by_seed.mean(axis=1), len(chosen)
    measured = measured_seed_sd(by_seed)
    scores = {"proxy_100": (np.array([done[n]["proxy"]["100"] for n in names]), len(names) * 100 * batch),
              "proxy_300": (np.array([done[n]["proxy"]["300"] for n in names]), len(names) * 300 * batch),
              **{e: (np.array([by_arch[n] for n in names]), images) for e, (by_arch, images) in evaluators.items()}}
    search_images = multi_fidelity_images([done[n]["moe"] for n in names], batch)
    out = {"study": STUDY, "n_archs": len(names), "reference_steps": store["reference_steps"],
           "reference_seeds": chosen, "seed_sd": measured,
           "multi_fidelity_search_images": search_images, "supernets": supernets, "evaluators": {},
           "archs": {n: {"flops": done[n]["flops"], "moe": done[n]["moe"], "reference": float(reference[i]),
                         "proxy": done[n]["proxy"], **{e: float(v[0][i]) for e, v in scores.items()
                                                       if e.startswith("supernet")}}
                     for i, n in enumerate(names)},
           "goal": "tau(supernet) >= 0.7 and above tau(proxy_100), with <= 1/5 of the multi-fidelity search's images",
           "noise_ceiling": {f"{sd:g}": noise_ceiling(reference, sd, seeds) for sd in args.seed_sd}}
    if measured and measured["sd"] ** 2 / seeds < reference.var(ddof=1):  # else the seeds' noise is all the spread
        out["noise_ceiling"]["measured"] = noise_ceiling(reference, measured["sd"], seeds)
    for name, (values, images) in scores.items():
        out["evaluators"][name] = {**rank_agreement(reference, values), "training_images": int(images),
                                   "images_over_multi_fidelity": round(images / search_images, 3)}
        if name.startswith("supernet"):
            out["evaluators"][name]["tau_over_proxy_100"] = tau_gain(reference, values, scores["proxy_100"][0])
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(output, json.dumps(out, indent=1) + "\n")  # a signal mid-write keeps the variant's earlier table
    print(f"{len(names)} architectures, reference {store['reference_steps']} steps ({seeds} seed(s) averaged); the "
          f"multi-fidelity search ranks them with {search_images:,} training images")
    if measured:
        print(f"a seed moves one reference accuracy by {100 * measured['sd']:.2f} points (sd) "
              f"[{100 * measured['ci'][0]:.2f}, {100 * measured['ci'][1]:.2f}]")
    print(f"{'evaluator':>20} {'tau [95% CI]':>22} {'rho [95% CI]':>22} {'top-5':>6} {'train images':>13} {'/ m-f':>6}")
    for name, e in out["evaluators"].items():
        tau, rho = e["kendall_tau_ci"], e["spearman_rho_ci"]
        print(f"{name:>20} {e['kendall_tau']:+.2f} [{tau[0]:+.2f}, {tau[1]:+.2f}] {e['spearman_rho']:+.2f} "
              f"[{rho[0]:+.2f}, {rho[1]:+.2f}] {e['top5_overlap']:>6} {e['training_images']:>13,} "
              f"{e['images_over_multi_fidelity']:>6.2f}")
    for name, ceiling in out["noise_ceiling"].items():
        low, high = ceiling["range_95"]
        print(f"a perfect evaluator against this {seeds}-seed reference (a seed's sd {100 * ceiling['seed_sd']:.2f} "
              f"points{', measured' if name == 'measured' else ''}): tau {ceiling['kendall_tau']:.2f} "
              f"[{low:.2f}, {high:.2f}]")
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    reference = commands.add_parser("reference", help="train the reference and proxy runs (resumable)")
    reference.add_argument("--archs", type=int, default=24)
    reference.add_argument("--steps", type=int, default=1500)
    reference.add_argument("--seed", type=int, help="another seed's long run of every architecture, after the "
                                                    "first seed's (default: the first: fashion-quick's seed, "
                                                    "with the proxies)")
    score = commands.add_parser("score", help="rank agreement of each evaluator with the reference")
    score.add_argument("--supernet-steps", type=int, nargs="+", default=[75, 150, 300, 600])
    score.add_argument("--random-subnets", type=int, default=2)
    score.add_argument("--batch-size", type=int, help="the supernet's batch (default: fashion-quick's, 128)")
    score.add_argument("--lr", type=float, help="the supernet's learning rate (default: fashion-quick's, 3e-3)")
    score.add_argument("--no-distill", action="store_true", help="no in-place distillation from the largest")
    score.add_argument("--no-sandwich", action="store_true", help="each step trains its random subnets only, not "
                                                                  "the largest and smallest (needs --no-distill)")
    score.add_argument("--finetune-steps", type=int, help="steps each candidate trains from its inherited weights "
                                                          "before it is scored (its images counted)")
    score.add_argument("--supernet-seed", type=int, help="the supernet's seed: weights, subnets drawn, data order "
                                                         "(default: fashion-quick's, 0)")
    score.add_argument("--val-images", type=int, nargs="+", default=[0],
                       help="validation images each candidate is scored on (0: the whole split); several: each")
    score.add_argument("--progress", action="store_true")
    rescore = commands.add_parser("rescore", help="the tables `score` wrote, against the reference as it is now")
    for command in (score, rescore):
        command.add_argument("--seed-sd", type=float, nargs="+", default=[0.0025, 0.0035, 0.005],
                             help="a seed's sd of one reference accuracy, for the noise ceiling (0.0035: the 1,500-"
                                  "step gains' sd of ~0.5 points in verdict_stability.py, over sqrt 2; with 2 seeds "
                                  "or more the measured one too); several: each")
        command.add_argument("--reference-seeds", type=int, nargs="+",
                             help="average these reference seeds (default: every seed all architectures have)")
    args = parser.parse_args()
    if getattr(args, "no_sandwich", False) and (not args.no_distill or args.random_subnets < 1):
        parser.error("--no-sandwich needs --no-distill (no largest subnet teaches) and --random-subnets 1 or more")
    torch.set_num_threads(1)
    try:
        with interruptible():  # SIGTERM and SIGHUP stop it like Ctrl-C: checkpoints saved, the store as it was
            {"reference": run_reference, "score": run_score, "rescore": run_rescore}[args.command](args)
    except KeyboardInterrupt as stop:
        saved = f" ({stop.saved()})" if isinstance(stop, TrainingInterrupted) else ""
        print(f"evaluator_fidelity.py {args.command}: stopped by {interruption_name(stop)}; what finished is stored"
              f"{saved}, and the same command resumes from the checkpoints", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
