"""`profile`: every cost figure of one architecture as one `ProfileResult`, and its readable table."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys

import torch

from nas.config import check_int
from profilers._backends import get_backend
from profilers._export import as_model, package_version
from profilers._flops import count_flops
from profilers._latency import MAX_BATCH, MAX_THREADS, check_statistic
from profilers._result import AnchorTiming, ProfileResult
from search_spaces import ArchConfig, VisionMoE, build_model, count_params

LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxscript", "fvcore", "coremltools", "executorch", "numpy")


def cpu_model() -> str:
    if sys.platform == "darwin":
        brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return brand.stdout.strip()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict:
    """The machine a latency belongs to: comparable only with figures from the same one."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "versions": {name: package_version(name) for name in LIBRARIES},
    }


def device_label(device: dict) -> str:
    """One line naming the machine a latency belongs to, with the agent's URL when it was measured remotely."""
    label = f"{device['cpu']}, {device['cores']} cores, {device['os']}"
    return f"{label} (agent {device['remote_url']})" if device.get("remote_url") else label


def profile(
    model_or_cfg: ArchConfig | VisionMoE, *, backend: str = "onnxruntime", threads: int = 1, batch: int = 1,
    measure: bool = True, provider: str | None = None, anchor: ArchConfig | None = None, statistic: str = "median",
    **backend_options,
) -> ProfileResult:
    """Parameters, sizes, FLOPs per image and (unless `measure=False`, the cheap path for filtering)
    latency on `backend` at `batch` with `threads`. A config is exported through the artifact cache; a
    model (e.g. trained) is exported afresh. `backend_options` go to the backend: the protocol's
    warmup / min_runs / min_time_s, and coreml's precision / all_tails.

    With an `anchor` config, a local backend times the model and the anchor interleaved; the result's
    `anchor` holds the anchor's latency and `ratio`, the model's `statistic` (median or p5) over the anchor's: a
    figure that holds across processes and hours, where absolute times drift by 5-25% on a shared machine."""
    check_int("threads", threads, 1, MAX_THREADS)
    check_int("batch", batch, 1, MAX_BATCH)
    check_statistic("statistic", statistic)
    model = as_model(model_or_cfg)
    runner = get_backend(backend, **backend_options)  # fails fast on a bad name or option, even unmeasured
    total, active = count_params(model)
    flops = count_flops(model)
    counted = ProfileResult(
        arch=model.cfg, params_total=total, params_active=active, flops=flops.total,
        flops_by_module=flops.by_module, uncounted_ops=flops.uncounted_ops, backend=backend, provider=provider,
        threads=threads, batch=batch, export_form=runner.form(model), device=device_info(),
        latency_note="not measured (measure=False)",
    )
    if not measure:
        return counted
    cache = isinstance(model_or_cfg, ArchConfig)  # a given model may carry trained weights: no cache
    run = runner.run(model, batch=batch, threads=threads, provider=provider, cache=cache,
                     anchor=build_model(anchor) if anchor else None)
    device = counted.device
    if run.device:  # measured elsewhere (the remote backend): the latency belongs to that machine
        device = run.device
    else:
        device["versions"].update(run.versions)
    timing = None
    if run.anchor:
        ratio = run.latency.value(statistic) / run.anchor.value(statistic)
        timing = AnchorTiming(anchor.name, anchor.config_hash(), run.anchor, ratio, statistic)
    return dataclasses.replace(
        counted, latency=run.latency, latency_note=run.note, provider=run.provider, export_form=run.export_form,
        artifact=run.artifact, device=device, anchor=timing,
        warnings=measurement_warnings(device, threads, measured=run.latency is not None),
    )


def measurement_warnings(device: dict, threads: int, *, measured: bool) -> list[str]:
    """What makes a latency measured on `device` doubtful: more threads than that machine lets this process use."""
    cores = device.get("cores_available") or device.get("cores")
    if measured and cores and threads > cores:
        return [f"--threads {threads} on a machine with {cores} available core{'s' * (cores > 1)}: the threads share "
                "cores, so this latency is not what that many cores would give"]
    return []


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:g} {unit}"


def format_profile(result: ProfileResult) -> str:
    """The readable table `vmoe-nas profile` prints."""
    flops = result.flops
    size = {key: _si(value, "B") for key, value in result.size_bytes().items()}
    lines = [
        f"{result.name}  (hash {result.config_hash})",
        f"params      {result.params_total:,} total, {result.params_active:,} active per image",
        f"size        fp32 {size['size_bytes_fp32']} ({size['size_bytes_fp32_active']} active), "
        f"fp16 {size['size_bytes_fp16']} ({size['size_bytes_fp16_active']} active)",
        f"FLOPs       {_si(flops, 'FLOP')} per image (active; 1 multiply-add = 1 FLOP)",
    ]
    for module, count in sorted(result.flops_by_module.items(), key=lambda item: -item[1]):
        if count:
            lines.append(f"  {module:<12}{_si(count, 'FLOP'):>12}  {100 * count / flops:5.1f}%")
    if result.uncounted_ops:
        lines.append(f"  uncounted ops: {', '.join(result.uncounted_ops)}")
    prediction, latency = result.prediction, result.latency
    if prediction:
        lines.append(f"predicted   {prediction.ms:.3f} ms  (latency model {prediction.path}, "
                     f"95% within +-{prediction.bound_pct:.1f}%)")
    if latency:
        per_batch = (f" per batch of {result.batch} ({result.latency_ms_per_image()['median']:.3f} ms per image)"
                     if result.batch > 1 else "")
        p5 = f"  p5 {latency.p5:.3f}" if latency.p5 is not None else ""
        lines.append(f"latency     median {latency.median:.3f} ms{per_batch}{p5}  p10 {latency.p10:.3f}  "
                     f"p90 {latency.p90:.3f}  cv {latency.cv:.3f}  ({latency.runs} runs)")
    elif not prediction:
        lines.append(f"latency     unavailable: {result.latency_note}")
    if result.anchor:
        anchor = result.anchor
        lines.append(f"anchor      {anchor.name}: {anchor.statistic} {anchor.latency.value(anchor.statistic):.3f} ms, "
                     f"timed interleaved; ratio {anchor.ratio:.3f} (of {anchor.statistic}s)")
    lines += [
        f"backend     {result.backend} ({result.provider or 'default'}), threads {result.threads}, "
        f"batch {result.batch}, form {result.export_form}",
        f"device      {device_label(result.device)}",
    ]
    return "\n".join(lines)
