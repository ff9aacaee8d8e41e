"""Latency backends: one class per runtime, all timed with `measure_latency`.

A local backend turns a model into a `Runnable` (exporting, with a cache when the model was built from a
config; inputs shaped from the config), and `LocalBackend.run` times it, alone or interleaved with an
anchor model, into a `BackendResult`. New backends subclass `LocalBackend` (or `Backend`, to measure
elsewhere) and call `register_backend`. Measuring an ONNX file is one function,
`onnxruntime_latency`, whose JSON a profiler agent on another machine returns as is (`profilers.remote`).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from profilers._coreml import coreml_form, export_coreml
from profilers._export import ProfileError, cache_dir, cached_onnx, eval_mode, example_images, export_onnx
from profilers._latency import MIN_RUNS, MIN_TIME_S, WARMUP, LatencyStats, measure_interleaved, measure_latency
from search_spaces import VisionMoE


@dataclass
class BackendResult:
    latency: LatencyStats | None  # None: not measurable here, `note` says why
    provider: str
    export_form: str
    artifact: str | None = None  # the exported file or folder that was (or would be) measured
    note: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    device: dict | None = None  # the machine that measured, when it is not this one (a remote agent)
    anchor: LatencyStats | None = None  # the anchor model's latency, timed interleaved with this one


@dataclass
class Runnable:
    """A model made ready to time on one backend."""

    call: Callable[[], object] | None  # one inference; None: not measurable here, `note` says why
    provider: str
    export_form: str
    artifact: str | None = None
    note: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    setup: Callable[[], AbstractContextManager] = contextlib.nullcontext  # what must hold while timing


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def model_form(model: VisionMoE) -> str:
    """How the MoE layers compute in eager torch and in the ONNX export (see search_spaces.model)."""
    cfg = model.cfg
    if not cfg.is_moe:
        return "dense"
    return "per_image:gather" if cfg.moe.routing == "per_image" else "per_token:grouped"


class Backend(ABC):
    name: ClassVar[str]

    def __init__(self, *, warmup: int = WARMUP, min_runs: int = MIN_RUNS, min_time_s: float = MIN_TIME_S):
        self.protocol = {"warmup": warmup, "min_runs": min_runs, "min_time_s": min_time_s}

    def form(self, model: VisionMoE) -> str:
        """The form of the model this backend measures (how its MoE layers compute)."""
        return model_form(model)

    @abstractmethod
    def run(self, model: VisionMoE, *, batch: int, threads: int, provider: str | None, cache: bool,
            anchor: VisionMoE | None = None) -> BackendResult:
        """Export (from the cache when `cache`: `model` is a fresh build of its config) and measure; with an
        `anchor` (a fresh build of a reference config) a backend that can times both interleaved."""


class LocalBackend(Backend):
    """A runtime on this machine: `prepare` makes a model runnable; `run` times it."""

    @abstractmethod
    def prepare(self, model: VisionMoE, *, batch: int, threads: int, provider: str | None, cache: bool) -> Runnable:
        """Export (from the cache when `cache`) and load `model`, ready for timed calls."""

    def run(self, model, *, batch, threads, provider, cache, anchor=None):
        target = self.prepare(model, batch=batch, threads=threads, provider=provider, cache=cache)
        stats = anchor_stats = None
        if target.call is not None and anchor is None:
            with target.setup():
                stats = measure_latency(target.call, **self.protocol)
        elif target.call is not None:
            reference = self.prepare(anchor, batch=batch, threads=threads, provider=provider, cache=True)
            with target.setup(), reference.setup():
                stats, anchor_stats = measure_interleaved([target.call, reference.call], **self.protocol)
        return BackendResult(stats, target.provider, target.export_form, artifact=target.artifact, note=target.note,
                             versions=target.versions, anchor=anchor_stats)


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str, **options) -> Backend:
    if name not in BACKENDS:
        raise ProfileError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    return BACKENDS[name](**options)


def ort_provider(provider: str | None) -> str:
    """The installed execution provider named `provider` ('cuda' or 'CUDAExecutionProvider'); CPU by default."""
    import onnxruntime as ort

    if provider is None:
        return "CPUExecutionProvider"
    available = ort.get_available_providers()
    for name in available:
        if provider.lower() in (name.lower(), name.lower().removesuffix("executionprovider")):
            return name
    raise ProfileError(f"execution provider {provider!r} is not in this onnxruntime ({', '.join(available)})")


def onnxruntime_latency(
    onnx_path: str | Path, *, batch: int = 1, threads: int = 1, provider: str | None = None,
    input_shape: tuple[int, ...] | None = None, warmup: int = WARMUP, min_runs: int = MIN_RUNS,
    min_time_s: float = MIN_TIME_S,
) -> dict:
    """Latency of an ONNX file in ONNX Runtime: full graph optimisation, `threads` intra-op threads,
    random inputs of `(batch, *input_shape)` (default: the file's own non-batch dimensions).
    Returns JSON: latency_ms (LatencyStats fields), provider, providers (in session order), threads,
    batch, versions."""
    import onnxruntime as ort

    session, call = ort_inference(onnx_path, batch=batch, threads=threads, provider=provider, input_shape=input_shape)
    stats = measure_latency(call, warmup=warmup, min_runs=min_runs, min_time_s=min_time_s)
    return {
        "latency_ms": stats.to_dict(), "provider": session.get_providers()[0], "providers": session.get_providers(),
        "threads": threads, "batch": batch, "versions": {"onnxruntime": ort.__version__},
    }


def ort_inference(
    onnx_path: str | Path, *, batch: int, threads: int, provider: str | None,
    input_shape: tuple[int, ...] | None = None,
) -> tuple[Any, Callable[[], object]]:
    """An `ort_session` and one inference call of it on random inputs of `(batch, *input_shape)` (default:
    the file's own non-batch dimensions)."""
    session = ort_session(onnx_path, threads=threads, provider=provider)
    graph_input = session.get_inputs()[0]
    shape = (batch, *(input_shape or graph_input.shape[1:]))
    feed = {graph_input.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    return session, lambda: session.run(None, feed)


def ort_session(onnx_path: str | Path, *, threads: int = 1, provider: str | None = None):
    """An ONNX Runtime session as every latency here uses it: full graph optimisation, `threads`
    intra-op threads, `provider` first and the CPU for whatever it leaves."""
    import onnxruntime as ort

    name = ort_provider(provider)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one model, run sequentially: no parallel branches to feed
    providers = [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
    return ort.InferenceSession(str(onnx_path), options, providers=providers)


@register_backend
class OnnxRuntimeBackend(LocalBackend):
    name = "onnxruntime"

    def prepare(self, model, *, batch, threads, provider, cache):
        import onnxruntime as ort

        ort_provider(provider)  # a provider this onnxruntime lacks fails before the export, not after
        with tempfile.TemporaryDirectory() as tmp:  # the session holds the model: the file may go
            path = cached_onnx(model.cfg) if cache else export_onnx(model, Path(tmp) / "model.onnx")
            session, call = ort_inference(path, batch=batch, threads=threads, provider=provider)
        return Runnable(call, session.get_providers()[0], model_form(model),
                        artifact=str(path) if cache else None, versions={"onnxruntime": ort.__version__})


@register_backend
class TorchBackend(LocalBackend):
    """Eager PyTorch; provider 'cpu' (default) or 'cuda'."""

    name = "torch"

    def prepare(self, model, *, batch, threads, provider, cache):
        try:
            device = torch.device(provider or "cpu")
        except RuntimeError:
            raise ProfileError(f"torch provider must be a device such as cpu or cuda, got {provider!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ProfileError("provider 'cuda' asked for, but this torch has no CUDA device")
        runner = copy.deepcopy(model).to(device) if device.type != "cpu" else model  # the caller's stays put
        images = example_images(model.cfg, batch).to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def forward():
            runner(images)
            sync()  # CUDA runs asynchronously: time the work, not the launch

        @contextlib.contextmanager
        def setup():
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with eval_mode(runner), torch.inference_mode():
                    yield
            finally:
                torch.set_num_threads(previous)

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return Runnable(forward, name, model_form(model), versions={"torch": torch.__version__}, setup=setup)


COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")  # coremltools.ComputeUnit


@register_backend
class CoreMLBackend(LocalBackend):
    """Core ML ML programs; provider = compute units (all, cpu_only, cpu_and_gpu, cpu_and_ne). Measures
    on macOS only; elsewhere exports and says so. Core ML has no thread setting: `threads` is ignored."""

    name = "coreml"

    def __init__(self, *, precision: str = "fp16", all_tails: bool = False, **protocol):
        super().__init__(**protocol)
        self.precision, self.all_tails = precision, all_tails

    def form(self, model: VisionMoE) -> str:
        return coreml_form(model.cfg)

    def prepare(self, model, *, batch, threads, provider, cache):
        units = (provider or "all").upper()
        if units not in COMPUTE_UNITS:
            raise ProfileError(f"Core ML provider must be a compute unit ({', '.join(COMPUTE_UNITS).lower()})")
        cfg = model.cfg
        key = f"coreml/{cfg.config_hash()}-{self.precision}-b{batch}"
        # Uncached (a given model), the export goes to a folder that is kept: the result names it.
        out_dir = cache_dir() / key if cache else Path(tempfile.mkdtemp(prefix="vmoe-coreml-"))
        exported = export_coreml(model, out_dir, batch=batch, precision=self.precision, all_tails=self.all_tails)
        form = f"{exported.form} (measured: {' then '.join(exported.pipeline)})"
        versions = {"coremltools": package_version("coremltools")}
        if sys.platform != "darwin":
            note = f"Core ML predictions need macOS, this is {sys.platform}: exported only, latency not measured"
            return Runnable(None, units, form, str(out_dir), note=note, versions=versions)
        return Runnable(self._predict_fn(exported, cfg, batch, units), units, form, str(out_dir), versions=versions)

    @staticmethod
    def _predict_fn(exported, cfg, batch: int, units: str):
        """One prediction: each program of the pipeline in turn, fed by the outputs before it."""
        import coremltools as ct

        programs = [ct.models.MLModel(str(exported.programs[name]), compute_units=ct.ComputeUnit[units])
                    for name in exported.pipeline]
        names = [[i.name for i in program.get_spec().description.input] for program in programs]
        images = example_images(cfg, batch).numpy()

        def predict():
            values = {"images": images}
            for program, inputs in zip(programs, names):
                values.update(program.predict({name: values[name] for name in inputs}))

        return predict

