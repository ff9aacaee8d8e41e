"""Cold `vmoe-nas profile` of 28 px architectures: a fresh interpreter and an empty artifact cache
(VMOE_NAS_CACHE in a new temporary folder) each time, as the first profile of a candidate pays it.

Each round runs, for each architecture (default: a dense and a per-image MoE of Fashion-MNIST's size), the
working tree's code and, with `--baseline REF`, the code of commit REF (unpacked by `git archive` into a
temporary folder and run from there), one after the other: the same load hits both, and the per-round
ratio (working tree over baseline) is the figure that holds on a busy machine. Each process runs the
command line's `main` with timers wrapped around the functions `profile` calls, so that its time splits
into phases (imports, model, FLOPs, export, ONNX Runtime session, timing loop; the rest, interpreter start
and shutdown, is wall time minus the in-process time). Reported: median wall time, median per phase, the
median ratio, and the measured latency medians (the two exports should time alike).

    .venv/bin/python benchmarks/cold_profile.py --baseline b749cc5 [--rounds 5] [--archs fmnist-vit-4x32 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

OUT = Path("results/benchmarks/cold_profile.json")
ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 2.0
ARCHS = ("fmnist-vit-4x32", "fmnist-vmoe-4x32")

# Run in the child: wraps the functions `profile` calls (names both the old and the new code have) in
# timers, runs `vmoe-nas profile ARCH --json` as the command line does (sys.argv), prints the phases as JSON
# on stderr. Imports are timed first, so each later phase holds only the imports it makes lazily.
PHASES = r"""
import json, sys, time
start = time.perf_counter()
phases = {}
import nas.cli, nas.commands, onnxruntime, profilers._backends, profilers._export, profilers._onnxruntime
import profilers._profile
phases["imports"] = time.perf_counter() - start

def timed(module, name, phase):
    function = getattr(module, name)
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - began
    setattr(module, name, wrapper)

timed(profilers._export, "build_model", "build model")
timed(profilers._profile, "count_flops", "FLOPs (fvcore trace)")
timed(profilers._profile, "device_info", "device info")
timed(profilers._export, "export_onnx", "ONNX export")
timed(profilers._onnxruntime, "ort_inference", "ONNX Runtime session")
timed(profilers._backends, "measure_latency", "timing loop")
sys.argv = ["vmoe-nas", "profile", sys.argv[1], "--json"]
try:
    nas.cli.main()
finally:
    phases["in process"] = time.perf_counter() - start
    print(json.dumps(phases), file=sys.stderr)
"""


def unpack(ref: str, into: Path) -> Path:
    """The tree of commit `ref`, unpacked into `into` (the repository itself is not touched)."""
    archive = into / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), ref], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def cold_run(tree: Path, arch: str) -> tuple[float, dict, dict]:
    """One `profile ARCH --json` in a fresh interpreter run from `tree` (so that its packages are the ones
    imported) with an empty cache: its wall time, the JSON it printed and its phases (seconds)."""
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PHASES, arch], cwd=tree,
                              env={**os.environ, "VMOE_NAS_CACHE": cache}, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
    result = json.loads(done.stdout)
    if result["latency_ms"] is None:
        raise RuntimeError(f"{arch}: no latency measured ({result['latency_note']})")
    phases = json.loads(done.stderr.strip().splitlines()[-1])
    phases["interpreter start and exit"] = wall - phases["in process"]
    return wall, result, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--baseline", help="a commit to compare with, run interleaved (e.g. the one before a change)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"working tree": ROOT}
        if args.baseline:
            trees = {f"baseline {args.baseline}": unpack(args.baseline, Path(tmp)), **trees}
        load_before = os.getloadavg()
        walls = {code: {arch: [] for arch in args.archs} for code in trees}
        latency = {code: {arch: [] for arch in args.archs} for code in trees}
        phases = {code: {arch: [] for arch in args.archs} for code in trees}
        for _ in range(args.rounds):
            for arch in args.archs:
                for code, tree in trees.items():
                    wall, result, split = cold_run(tree, arch)
                    walls[code][arch].append(wall)
                    latency[code][arch].append(result["latency_ms"]["median"])
                    phases[code][arch].append(split)
    breakdown = {code: {arch: {name: statistics.median(split[name] for split in splits) for name in splits[0]}
                        for arch, splits in by_arch.items()} for code, by_arch in phases.items()}
    result = {
        "rounds": args.rounds, "archs": args.archs, "goal_s": GOAL_S, "wall_s": walls,
        "median_s": {code: {arch: statistics.median(v) for arch, v in runs.items()} for code, runs in walls.items()},
        "latency_ms_median": {code: {arch: statistics.median(v) for arch, v in runs.items()}
                              for code, runs in latency.items()},
        "breakdown_median_s": breakdown, "phases_s": phases,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(), "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
    }
    if args.baseline:
        old, new = walls.values()
        result["ratio_median"] = {arch: statistics.median(n / o for n, o in zip(new[arch], old[arch]))
                                  for arch in args.archs}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    for code in trees:
        for arch in args.archs:
            split = ", ".join(f"{name} {s:.2f}" for name, s in breakdown[code][arch].items())
            print(f"{code:>20}  {arch:<18} median {result['median_s'][code][arch]:.2f} s (latency "
                  f"{result['latency_ms_median'][code][arch]:.3f} ms); median phases (s): {split}")
    for arch, ratio in result.get("ratio_median", {}).items():
        print(f"{arch}: working tree / baseline, median of per-round ratios {ratio:.3f}")
    print(f"load average {load_before[0]:.2f} before, {result['loadavg_after'][0]:.2f} after, on "
          f"{result['cpus_available']} of {result['cpus']} CPUs (goal {GOAL_S} s on an idle machine); wrote {OUT}")


if __name__ == "__main__":
    main()
