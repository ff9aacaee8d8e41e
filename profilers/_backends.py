"""Latency backends: one class per runtime, all timed with `measure_latency`, found by name in `BACKENDS`.

A local backend turns a model into a `Runnable` (exporting, with a cache when the model was built from a
config; inputs shaped from the config), and `LocalBackend.run` times it, alone or interleaved with an
anchor model, into a `BackendResult`. A local backend with a `content_type` can also measure for a
profiler agent: `pack` turns a model into the payload the workstation sends, and `load` turns that
payload, on the agent, into a `Runnable` (validating it first: it comes over the network).

The registry lists every built-in backend by name with the module that defines it, imported on first
use: `import profilers` pulls in no runtime and no HTTP stack. `register_backend` adds others.
"""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from profilers._errors import PayloadError, ProfileError
from profilers._latency import MIN_RUNS, MIN_TIME_S, WARMUP, LatencyStats, measure_interleaved, measure_latency
from search_spaces import ArchConfig, VisionMoE


@dataclass
class BackendResult:
    """One latency measurement, wherever it ran; `to_json` is what a profiler agent answers."""

    latency: LatencyStats | None  # None: not measurable here, `note` says why
    provider: str | None
    export_form: str | None  # None: the measuring side cannot tell (an agent given an ONNX file)
    artifact: str | None = None  # the exported file or folder that was (or would be) measured
    note: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    device: dict | None = None  # the machine that measured, when it is not this one (a remote agent)
    anchor: LatencyStats | None = None  # the anchor model's latency, timed interleaved with this one
    threads: int | None = None
    batch: int | None = None

    def to_json(self) -> dict:
        return {
            "latency_ms": self.latency.to_dict() if self.latency else None, "provider": self.provider,
            "export_form": self.export_form, "artifact": self.artifact, "note": self.note, "versions": self.versions,
            "device": self.device, "anchor_ms": self.anchor.to_dict() if self.anchor else None,
            "threads": self.threads, "batch": self.batch,
        }

    @classmethod
    def from_json(cls, data: dict) -> BackendResult:
        latency, anchor = data["latency_ms"], data.get("anchor_ms")
        return cls(
            LatencyStats.from_dict(latency) if latency else None, data["provider"], data.get("export_form"),
            artifact=data.get("artifact"), note=data.get("note"), versions=dict(data.get("versions") or {}),
            device=data.get("device"), anchor=LatencyStats.from_dict(anchor) if anchor else None,
            threads=data.get("threads"), batch=data.get("batch"),
        )


@dataclass
class Runnable:
    """A model made ready to time on one backend."""

    call: Callable[[], object] | None  # one inference; None: not measurable here, `note` says why
    provider: str | None
    export_form: str | None
    artifact: str | None = None
    note: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    setup: Callable[[], AbstractContextManager] = contextlib.nullcontext  # what must hold while timing


@dataclass
class Payload:
    """A model as the workstation sends it to an agent."""

    body: bytes
    export_form: str  # what the body computes
    artifact: str | None = None  # the cached export it was read from


@dataclass(frozen=True)
class AgentLimits:
    """What an agent accepts. The input and attention bounds keep a small model with huge images (or a
    huge batch) from exhausting the device's memory before the timeout can stop it."""

    max_bytes: int = 256 * 2**20  # a model file, and the fp32 weights of an architecture an agent builds
    max_input_elements: int = 2**26  # images per call x their elements (256 MiB of fp32)
    unzip_ratio: int = 4  # a zipped payload may unpack to this many times max_bytes (zip bombs)


def model_form(model: VisionMoE) -> str:
    """How the MoE layers compute in eager torch and in the ONNX export (see search_spaces.model)."""
    cfg = model.cfg
    if not cfg.is_moe:
        return "dense"
    return "per_image:gather" if cfg.moe.routing == "per_image" else "per_token:grouped"


def proto_messages(message, type_name: str) -> Iterator:
    """Every protobuf message of type `type_name` in `message`, at any depth (ONNX models, Core ML specs)."""
    from google.protobuf.descriptor import FieldDescriptor

    if message.DESCRIPTOR.name == type_name:
        yield message
    for descriptor, value in message.ListFields():
        if descriptor.type != FieldDescriptor.TYPE_MESSAGE:
            continue  # scalars and bytes (weights) hold no messages
        items = (value,) if hasattr(value, "DESCRIPTOR") else value.values() if hasattr(value, "values") else value
        for item in items:  # one message, a repeated field, or a map's values
            if hasattr(item, "DESCRIPTOR"):  # not a map's scalar values
                yield from proto_messages(item, type_name)


def weight_count(cfg: ArchConfig) -> int:
    """The weight matrices' parameters, from the config alone: a check before building anything."""
    C, H = cfg.width, cfg.mlp_hidden
    mlps = cfg.depth + (cfg.moe.num_experts - 1) * len(cfg.moe_layers) if cfg.moe else cfg.depth
    patch = cfg.in_channels * cfg.patch_size**2 * C
    return patch + cfg.num_tokens * C + cfg.depth * 4 * C * C + mlps * 2 * C * H + C * cfg.num_classes


def check_size(cfg: ArchConfig, batch: int, limits: AgentLimits) -> None:
    """Refuse, before building it, an architecture whose weights, inputs or attention scores at `batch`
    are over the agent's limits."""
    if 4 * weight_count(cfg) > limits.max_bytes:  # the limit an ONNX file of it would meet
        raise PayloadError(f"{cfg.name} is over the agent's model size limit of {limits.max_bytes} bytes")
    inputs = batch * cfg.in_channels * cfg.image_size**2
    scores = batch * cfg.num_heads * cfg.num_tokens**2
    if max(inputs, scores) > limits.max_input_elements:
        raise PayloadError(f"the input of {cfg.name} at batch {batch} ({inputs} elements, {scores} attention "
                           f"scores) is over the agent's limit of {limits.max_input_elements}")


class Backend(ABC):
    name: ClassVar[str]
    content_type: ClassVar[str | None] = None  # the payload an agent of this backend takes; None: no agent

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
    """A runtime on this machine: `prepare` makes a model runnable; `time` measures it."""

    @abstractmethod
    def prepare(self, model: VisionMoE, *, batch: int, threads: int, provider: str | None, cache: bool) -> Runnable:
        """Export (from the cache when `cache`) and load `model`, ready for timed calls."""

    def run(self, model, *, batch, threads, provider, cache, anchor=None):
        target = self.prepare(model, batch=batch, threads=threads, provider=provider, cache=cache)
        reference = None
        if target.call is not None and anchor is not None:
            reference = self.prepare(anchor, batch=batch, threads=threads, provider=provider, cache=True)
        return self.time(target, reference, batch=batch, threads=threads)

    def time(self, target: Runnable, reference: Runnable | None = None, *, batch: int, threads: int) -> BackendResult:
        """Measure `target` (if it can run here), interleaved with `reference` when there is one."""
        stats = anchor_stats = None
        if target.call is not None and reference is None:
            with target.setup():
                stats = measure_latency(target.call, **self.protocol)
        elif target.call is not None:
            with target.setup(), reference.setup():
                stats, anchor_stats = measure_interleaved([target.call, reference.call], **self.protocol)
        return BackendResult(stats, target.provider, target.export_form, artifact=target.artifact, note=target.note,
                             versions=target.versions, anchor=anchor_stats, threads=threads, batch=batch)

    # The profiler agent's side: defined by backends with a content_type.

    def pack(self, model: VisionMoE, *, batch: int, cache: bool, workdir: Path) -> Payload:
        """The payload an agent of this backend measures (`workdir`: scratch space, removed after)."""
        raise ProfileError(f"the {self.name} backend has no profiler agent")

    def load(self, body: bytes, *, workdir: Path, batch: int, threads: int, provider: str | None,
             limits: AgentLimits) -> Runnable:
        """On the agent: validate a payload (`PayloadError` when unusable) and load it from `workdir`, a
        private empty folder, ready for timed calls."""
        raise ProfileError(f"the {self.name} backend has no profiler agent")

    @classmethod
    def providers(cls) -> list[str]:
        """The providers this machine offers (an agent's device description lists them)."""
        return []


class Registry(Mapping[str, type[Backend]]):
    """Backend classes by name; a built-in one is named with its module and imported on first use."""

    def __init__(self, lazy: dict[str, str]):
        self._lazy, self._classes = dict(lazy), {}

    def __getitem__(self, name: str) -> type[Backend]:
        if name not in self._classes:
            module, _, cls = self._lazy[name].partition(":")  # KeyError for an unknown name, as a dict's
            self._classes[name] = getattr(importlib.import_module(module), cls)
        return self._classes[name]

    def __contains__(self, name: object) -> bool:  # without importing anything; any value, even unhashable
        return isinstance(name, str) and (name in self._lazy or name in self._classes)

    def __iter__(self) -> Iterator[str]:
        return iter({**self._lazy, **self._classes})

    def __len__(self) -> int:
        return len({**self._lazy, **self._classes})

    def register(self, cls: type[Backend]) -> type[Backend]:
        self._classes[cls.name] = cls
        return cls

    def agent_backends(self) -> list[str]:
        """The backends a profiler agent can run: those with a payload."""
        return [name for name, cls in self.items() if cls.content_type]


BACKENDS = Registry({
    "onnxruntime": "profilers._onnxruntime:OnnxRuntimeBackend",
    "torch": "profilers._torch:TorchBackend",
    "coreml": "profilers._coreml_backend:CoreMLBackend",
    "executorch": "profilers._executorch:ExecuTorchBackend",
    "remote": "profilers.remote:RemoteBackend",
})
register_backend = BACKENDS.register


def get_backend(name: str, **options) -> Backend:
    if name not in BACKENDS:
        raise ProfileError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    try:
        return BACKENDS[name](**options)
    except TypeError as error:  # an option this backend does not take
        raise ProfileError(f"backend {name!r}: {error}") from None
