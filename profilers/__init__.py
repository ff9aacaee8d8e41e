"""Cost of an architecture: FLOPs, parameters, size and latency on real backends.

    profile(cfg)                      # everything, as one JSON-ready dict (ONNX Runtime, 1 thread, batch 1)
    profile(cfg, measure=False)       # params, sizes, FLOPs only: the cheap filter before latency
    count_flops(cfg).total == analytic_flops(cfg)

Importing this package imports no runtime (onnxruntime, coremltools) and no HTTP stack: backends are
found by name in `BACKENDS` and each is imported when first used; `RemoteBackend` is imported on access.
"""

import importlib

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
from profilers._errors import PayloadError, ProfileError, ProfilerBusy, ProfilerUnreachable, RemoteProfilerError
from profilers._latency import MAX_BATCH, MAX_THREADS, MIN_TIME_S, LatencyStats, measure_interleaved, measure_latency

# The rest imports ONNX and fvcore: loaded on first use, so that reading the registry (the command line, a
# study config) stays cheap. RemoteBackend's module imports httpx.
_LAZY = {
    "profilers._coreml": ("CoreMLExport", "coreml_form", "export_coreml", "tail_name"),
    "profilers._coreml_backend": ("CoreMLBackend",),
    "profilers._export": ("CACHE_ENV", "cache_dir", "cached_onnx", "export_onnx"),
    "profilers._flops": ("FlopReport", "analytic_flops", "count_flops"),
    "profilers._onnxruntime": ("OnnxRuntimeBackend", "onnxruntime_latency", "ort_inference", "ort_session"),
    "profilers._profile": ("device_info", "device_label", "format_profile", "profile"),
    "profilers._torch": ("TorchBackend",),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name == "RemoteBackend":
        return BACKENDS["remote"]
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(_MODULE_OF[name]), name)
        globals()[name] = value  # once: later lookups find it directly
        return value
    raise AttributeError(f"module 'profilers' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "MAX_BATCH",
    "MAX_THREADS",
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
    "ProfilerBusy",
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
    "tail_name",
]
