"""Start-up cost of the command line: `vmoe-nas describe PRESET` against `python -c "import torch"`.

describe reads one YAML file and builds the model to count its parameters, so torch is its floor; every
other import (Optuna, pandas, SQLAlchemy, fvcore, ONNX, httpx) would be start-up paid for nothing. The two
commands run interleaved, `--rounds` times each, in fresh interpreters; reported: each one's median wall
time and the median of the per-round ratios. Goal: describe at most 1.5x the import of torch.

    .venv/bin/python benchmarks/cli_startup.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("results/benchmarks/cli_startup.json")
GOAL = 1.5
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "vmoe-nas describe": [sys.executable, "-m", "nas.cli", "describe", "vit-6x64"],
}


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def heavy_imports() -> list[str]:
    """The modules describe should not load, among those it does."""
    script = ("import sys; from nas.cli import main; main(['describe', 'vit-6x64']); "
              "print(' '.join(sorted(m for m in sys.modules if '.' not in m)))")
    loaded = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    heavy = {"optuna", "pandas", "sqlalchemy", "plotly", "fvcore", "onnx", "onnxruntime", "httpx", "starlette"}
    return sorted(heavy & set(loaded.stdout.split()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            times[name].append(wall_time(command))
    ratios = [d / t for d, t in zip(times["vmoe-nas describe"], times["import torch"])]
    result = {
        "median_s": {name: statistics.median(values) for name, values in times.items()},
        "ratio_median": statistics.median(ratios), "ratios": ratios, "goal": GOAL,
        "heavy_imports_of_describe": heavy_imports(), "rounds": args.rounds,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"import torch {result['median_s']['import torch']:.2f} s, describe "
          f"{result['median_s']['vmoe-nas describe']:.2f} s: ratio {result['ratio_median']:.2f} (goal <= {GOAL}); "
          f"heavy modules loaded: {', '.join(result['heavy_imports_of_describe']) or 'none'}; wrote {OUT}")


if __name__ == "__main__":
    main()
