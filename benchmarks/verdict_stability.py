"""Do the confirmation's verdicts hold? A study's pairs confirmed twice, with disjoint seed sets.

Takes a searched study (default: fashion-quick, as `make run` leaves it in results/), selects its pairs as
`vmoe-nas confirm` does, and confirms them with seeds s0..s0+n-1 and again with s0+n..s0+2n-1 (s0: the
study's recipe seed, so the first set is the study's own confirmation and its runs are reused). Reports per
pair whether the two verdicts agree, each interval's half-width and the gain of every seed, and the pair
confirmed over both sets together (2n seeds); the goal at the confirm budget is that the verdicts agree and
every half-width is at most 0.5 points. Runs go to the study's companion confirm study, so a
rerun trains nothing twice. Writes results/benchmarks/verdict_stability.json.

    .venv/bin/python benchmarks/verdict_stability.py [--study fashion-quick] [--seeds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nas import record as records
from nas.confirm import compare, run_missing, settings_for
from nas.pairs import select_pairs
from nas.storage import load_study
from nas.study import StudyConfig

OUT = Path("results/benchmarks/verdict_stability.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="fashion-quick")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--storage", help="Optuna storage URL (default: the study's file under RESULTS_DIR)")
    parser.add_argument("--seeds", type=int, help="seeds per set (default: the study's confirm.seeds)")
    parser.add_argument("--steps", type=int, help="steps per run (default: the study's confirm budget)")
    parser.add_argument("--pairs", type=int, help="MoEs from the top of the MoE front (default: confirm.pairs)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    study = load_study(args.study, storage=args.storage, results_dir=args.results_dir)
    cfg = StudyConfig.from_dict({**records.read_study(study).config, "storage": None, "results_dir": args.results_dir})
    rs = records.read_all(study)
    first = settings_for(cfg, rs, seeds=args.seeds, steps=args.steps)
    pairs = select_pairs(rs, args.pairs or cfg.confirm.pairs, cfg.objectives, band=first.band)  # the capped band
    second = settings_for(cfg, rs, seeds=args.seeds, steps=args.steps, first_seed=first.seeds[-1] + 1)
    both = settings_for(cfg, rs, seeds=2 * len(first.seeds), steps=args.steps, first_seed=first.seeds[0])
    sets, runs = [], {}
    for settings in (first, second):
        runs.update(run_missing(study, cfg, pairs, settings, workers=args.workers, progress=True))
        sets.append(compare(pairs, runs, settings))
    pooled = compare(pairs, runs, both)
    rows = []
    for pair, a, b, ab in zip(pairs, *sets, pooled):
        rows.append({"pair": pair.name, "cost": pair.cost, "verdicts": [a.verdict, b.verdict],
                     "agree": a.verdict == b.verdict, "gain_mean": [a.gain_mean, b.gain_mean],
                     "half_width": [(r.ci_high - r.ci_low) / 2 for r in (a, b)], "gains": list(ab.gains),
                     "both_sets": {"verdict": ab.verdict, "gain_mean": ab.gain_mean, "ci": [ab.ci_low, ab.ci_high]}})
        print(f"{'agree' if rows[-1]['agree'] else 'DIFFER':>6}  {pair.name}: {a.verdict} / {b.verdict}, gain "
              f"{a.gain_mean:+.4f} / {b.gain_mean:+.4f}, half-width {rows[-1]['half_width'][0]:.4f} / "
              f"{rows[-1]['half_width'][1]:.4f}; all {len(ab.gains)} seeds: {ab.verdict}, "
              f"[{ab.ci_low:+.4f}, {ab.ci_high:+.4f}]")
    summary = {"study": args.study, "seeds": [list(first.seeds), list(second.seeds)], "steps": first.steps,
               "pairs": rows, "all_agree": all(r["agree"] for r in rows),
               "max_half_width": max((h for r in rows for h in r["half_width"]), default=None)}
    print(f"verdicts agree on {sum(r['agree'] for r in rows)} of {len(rows)} pairs; widest half-width "
          f"{summary['max_half_width']} (goal: all agree, <= 0.005)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
