"""Cost of an architecture: FLOPs, parameters, size and latency on real backends.

    profile(cfg)                      # everything, as one JSON-ready dict (ONNX Runtime, 1 thread, batch 1)
    profile(cfg, measure=False)       # params, sizes, FLOPs only: the cheap filter before latency
    count_flops(cfg).total == analytic_flops(cfg)

Importing this package imports no runtime (onnxruntime, coremltools) and no HTTP stack: backends are
found by name in `BACKENDS` and each is imported when first used; `RemoteBackend` is imported on access.
"""

from profilers._backends import (
    BACKENDS,
    AgentLimits,
    Backend,
    BackendResult,
    LocalBackend,
    Payload,
    Runnable,
    get_backend,
    register_backend,
)
from profilers._coreml import CoreMLExport, coreml_form, export_coreml
from profilers._coreml_backend import CoreMLBackend
from profilers._errors import PayloadError, ProfileError, ProfilerUnreachable, RemoteProfilerError
from profilers._export import CACHE_ENV, cache_dir, cached_onnx, export_onnx
from profilers._flops import FlopReport, analytic_flops, count_flops
from profilers._latency import MIN_TIME_S, LatencyStats, measure_interleaved, measure_latency
from profilers._onnxruntime import OnnxRuntimeBackend, onnxruntime_latency, ort_inference, ort_session
from profilers._profile import device_info, device_label, format_profile, profile
from profilers._torch import TorchBackend


def __getattr__(name: str):
    if name == "RemoteBackend":  # its module imports httpx: only when asked for
        return BACKENDS["remote"]
    raise AttributeError(f"module 'profilers' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "CACHE_ENV",
    "AgentLimits",
    "Backend",
    "BackendResult",
    "CoreMLBackend",
    "CoreMLExport",
    "LocalBackend",
    "FlopReport",
    "LatencyStats",
    "MIN_TIME_S",
    "OnnxRuntimeBackend",
    "Payload",
    "PayloadError",
    "ProfileError",
    "ProfilerUnreachable",
    "RemoteBackend",
    "RemoteProfilerError",
    "Runnable",
    "TorchBackend",
    "analytic_flops",
    "cache_dir",
    "cached_onnx",
    "coreml_form",
    "count_flops",
    "device_info",
    "device_label",
    "export_coreml",
    "export_onnx",
    "format_profile",
    "get_backend",
    "measure_interleaved",
    "measure_latency",
    "onnxruntime_latency",
    "ort_inference",
    "ort_session",
    "profile",
    "register_backend",
]
