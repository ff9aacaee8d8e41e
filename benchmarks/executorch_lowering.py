"""How the model family lowers to ExecuTorch's XNNPACK backend, before and after `XnnpackForm`.

Per model (dense, per-image k=1 and k=2, at 28 and 224 px), the model as it is ("before") and in
`profilers.XnnpackForm` ("after") are exported at batch 1 and lowered with XnnpackPartitioner:
delegate calls, ops left on portable kernels, lowering time, the largest |logit difference| of the `.pte`
(run in executorch.runtime) to eager torch on images that reach every expert the router picks, and the
latency of both programs against ONNX Runtime (1 thread each), the three timed interleaved in one process
(`profilers.measure_interleaved`): the ratio is the ExecuTorch median over the ORT median.

    .venv/bin/python benchmarks/executorch_lowering.py [--models fmnist-vit-4x32 ...] [--min-time 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from profilers import (
    XnnpackForm,
    device_info,
    export_onnx,
    images_reaching_experts,
    load_pte,
    lower,
    measure_interleaved,
    ort_inference,
)
from search_spaces import ArchConfig, build_model, load_arch

OUT = Path("results/benchmarks/executorch_lowering.json")
SHAPES = ("fmnist-vmoe-4x32", "vmoe-6x192")  # 28 px (E=4) and 224 px (E=10), MoE in the last 2 blocks


def variants(moe: ArchConfig) -> dict[str, ArchConfig]:
    k2 = replace(moe, moe=replace(moe.moe, top_k=2))
    return {"dense": replace(moe, moe=None), "k1": moe, "k2": k2}


def lowered(module: torch.nn.Module, model: torch.nn.Module, images: torch.Tensor) -> tuple[dict, object]:
    """Lower `module` (the model or its form) at batch 1; its figures and the loaded program."""
    program = lower(module, images[:1], name=model.cfg.name)
    loaded = load_pte(program.buffer, threads=1)
    with torch.no_grad():
        expected = model(images)
    actual = torch.cat([loaded(image[None])[0] for image in images])
    figures = {**program.delegation.to_dict(), "max_abs_diff": float((actual - expected).abs().max()),
               "pte_bytes": len(program.buffer)}
    return figures, loaded


def measure(cfg: ArchConfig, min_time_s: float) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images, reached = images_reaching_experts(model)
    before, before_pte = lowered(model, model, images)
    after, after_pte = lowered(XnnpackForm(model), model, images)
    one = images[:1]
    with tempfile.TemporaryDirectory() as tmp:
        _, ort_call = ort_inference(export_onnx(model, Path(tmp) / "m.onnx"), batch=1, threads=1, provider=None)
        ort, et_before, et_after = measure_interleaved(
            [ort_call, lambda: before_pte(one), lambda: after_pte(one)],
            warmup=20, min_runs=100, min_time_s=min_time_s)
    for figures, stats in ((before, et_before), (after, et_after)):
        figures.update(latency_ms=stats.to_dict(), ratio_to_ort=stats.median / ort.median)
    return {"name": cfg.name, "arch": cfg.to_dict(), "check_inputs": reached, "ort_latency_ms": ort.to_dict(),
            "before": before, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), help="per-image MoE presets (k=1)")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of timed ORT calls per model")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    report = {"device": device_info(), "threads": 1, "batch": 1, "models": {}}
    for shape in args.models:
        for kind, cfg in variants(load_arch(shape)).items():
            row = report["models"][f"{cfg.image_size}px-{kind}"] = measure(cfg, args.min_time)
            b, a = row["before"], row["after"]
            print(f"{cfg.image_size}px {kind:5} before: {b['delegate_calls']} calls, {sum(b['portable_ops'].values())}"
                  f" portable, {b['lowering_s']:.0f} s, diff {b['max_abs_diff']:.1e}, x{b['ratio_to_ort']:.2f} ORT | "
                  f"after: {a['delegate_calls']} calls, {a['portable_ops']}, {a['lowering_s']:.0f} s, "
                  f"diff {a['max_abs_diff']:.1e}, x{a['ratio_to_ort']:.2f} ORT", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))  # after each model: a long run keeps what it measured


if __name__ == "__main__":
    main()
