"""The streaming loader: images/s at 224 px (decode + train transform) by worker processes, and the peak
resident memory of a study over an image folder streamed against the same study held in memory.

Both on folders generated here (JPEGs, quality 90): for throughput, photographs' sizes (sides 320-500 px,
ImageNet's are ~400x350 on average) decoded and brought to 224 px by the standard train transform
(random-resized crop, flip, RandAugment) in `--workers` processes; for memory, `--images` images at 256 px in
8 classes, one study (one dense trial, 20 proxy steps at 256 px) run as `vmoe-nas search` in a child process
per mode, whose peak resident set size the kernel reports (`wait4`). Each mode runs its loader in the study's
own process (workers 0), so the figure is one process's; a streamed run with 2 workers is reported beside
it (the largest of its processes).

    .venv/bin/python benchmarks/data_throughput.py [--workers 0 1 2] [--batches 12] [--images 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from nas.data import load_dataset
from nas.devices import available_cores

OUT = Path("results/benchmarks/data_throughput.json")


def write_folder(root: Path, images: int, classes: int, sides: tuple[int, int], seed: int = 0) -> Path:
    """`images` JPEGs in `classes` folders: smooth colour fields plus noise (so JPEG sizes are realistic)."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        base = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR), np.float32)
        pixels = np.clip(field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.JPEG", quality=90)
    return root


def throughput(root: Path, workers: list[int], batches: int, batch_size: int) -> dict:
    rows = {}
    for count in workers:
        data = load_dataset(f"imagefolder:{root}", image_size=224, stream=True, workers=count, val_fraction=0.05)
        n = len(data.train)
        order = lambda step, n=n: torch.arange(step * batch_size, (step + 1) * batch_size) % n  # noqa: E731
        stream = data.train.stream.batches(order, 0, seed=0, augment=True)
        next(stream)  # workers started, first batch decoded
        tick = time.perf_counter()
        for _ in range(batches):
            next(stream)
        per_s = batches * batch_size / (time.perf_counter() - tick)
        stream.close()
        rows[str(count)] = {"images_per_s": round(per_s, 1), "per_process": round(per_s / max(count, 1), 1)}
        print(f"  {count} worker(s): {per_s:7.1f} images/s at 224 px, {per_s / max(count, 1):6.1f} per process")
    return rows


def study_peak_mb(root: Path, tmp: Path, name: str, data: dict) -> float:
    """Peak RSS (MB) of `vmoe-nas search` on a one-trial study over the folder, in a child process."""
    config = {
        "study_name": name, "results_dir": str(tmp / "results"), "objectives": ["accuracy", "flops"],
        "n_trials": 1, "data": {"name": f"imagefolder:{root}", "image_size": 256, **data},
        "space": {"name": "mobile_vmoe", "patch_sizes": [32], "depths": [2], "widths": [16], "head_width": 8,
                  "mlp_ratios": [2.0], "num_experts": [0]},
        "evaluator": {"steps": 20, "batch_size": 32, "eval_every": 20, "augment": False, "num_threads": 1},
        "enqueue": [{"depth": 2, "width": 16, "patch_size": 32, "mlp_ratio": 2.0, "num_experts": 0}],
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    child = subprocess.Popen([sys.executable, "-m", "nas.cli", "search", "--config", str(path), "--no-progress",
                              "--no-report"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"study {name} failed (status {status}); see {tmp / 'results' / name / 'search.log'}")
    return usage.ru_maxrss / 1024  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=12, help="timed batches of 32 per worker count")
    parser.add_argument("--images", type=int, default=2000, help="images of the memory study's folder")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"torch": torch.__version__, "cores": available_cores(), "machine": platform.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("throughput of the streaming train loader (decode + random-resized crop + flip + RandAugment):")
        photos = write_folder(tmp / "photos", images=32 * (args.batches + 1) + 20, classes=8, sides=(320, 500))
        report["throughput_224px"] = throughput(photos, args.workers, args.batches, 32)
        if not args.skip_memory:
            folder = write_folder(tmp / "folder", images=args.images, classes=8, sides=(256, 256))
            peaks = {how: study_peak_mb(folder, tmp, how, data) for how, data in {
                "in_memory": {"stream": False, "workers": 0},
                "streamed": {"stream": True, "workers": 0},
                "streamed_2_workers": {"stream": True, "workers": 2},
            }.items()}
            held_mb = args.images * 3 * 256 * 256 / 2**20
            report["peak_rss_mb"] = {k: round(v, 1) for k, v in peaks.items()}
            report["memory_study"] = {"images": args.images, "image_size": 256, "decoded_mb": round(held_mb, 1),
                                      "saved_mb": round(peaks["in_memory"] - peaks["streamed"], 1)}
            report["goal"] = "streamed peak RSS >= 200 MB below in memory"
            report["goal_met"] = report["memory_study"]["saved_mb"] >= 200
            print(f"peak RSS of a study over {args.images} images at 256 px ({held_mb:.0f} MB decoded): "
                  + ", ".join(f"{k} {v:.0f} MB" for k, v in peaks.items())
                  + f"; streaming saves {report['memory_study']['saved_mb']:.0f} MB")
    report["median_per_process"] = statistics.median(r["per_process"] for r in report["throughput_224px"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
