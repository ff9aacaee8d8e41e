"""Cost of an architecture: FLOPs, parameters, size and latency on real backends.

    profile(cfg)                      # everything, as one ProfileResult (ONNX Runtime, 1 thread, batch 1)
    profile(cfg, measure=False)       # params, sizes, FLOPs only: the cheap filter before latency
    profile(cfg).to_dict()            # its JSON form, what `vmoe-nas profile --json` prints
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
    proto_messages,
    register_backend,
)
from profilers._errors import PayloadError, ProfileError, ProfilerBusy, ProfilerUnreachable, RemoteProfilerError
from profilers._latency import (
    MAX_BATCH,
    MAX_THREADS,
    MIN_TIME_S,
    STATISTICS,
    LatencyStats,
    measure_interleaved,
    measure_latency,
)
from profilers._result import AnchorTiming, Prediction, ProfileResult

# The rest imports ONNX and fvcore: loaded on first use, so that reading the registry (the command line, a
# study config) stays cheap. RemoteBackend's module imports httpx.
_LAZY = {
    "profilers._coreml": ("CoreMLExport", "Tail", "Trunk", "coreml_form", "export_coreml", "masked_per_token",
                          "tail_name"),
    "profilers._coreml_backend": ("PIPELINE_FILE", "CoreMLBackend", "coreml_zip", "unpack_coreml"),
    "profilers._executorch": ("PTE_TOLERANCE", "Delegation", "ExecuTorchBackend", "LoweringError", "XnnpackForm",
                              "cached_executorch", "check_kernels", "images_reaching_experts", "load_pte", "lower",
                              "write_checked_pte"),
    "profilers._export": ("CACHE_ENV", "build_once", "cache_dir", "cached_onnx", "export_onnx", "onnx_cache_path"),
    "profilers._flops": ("COUNTED_OPS", "FlopReport", "analytic_flops", "count_flops"),
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
    "AgentLimits",
    "AnchorTiming",
    "BACKENDS",
    "Backend",
    "BackendResult",
    "CACHE_ENV",
    "COUNTED_OPS",
    "CoreMLBackend",
    "CoreMLExport",
    "Delegation",
    "ExecuTorchBackend",
    "FlopReport",
    "LatencyStats",
    "LocalBackend",
    "LoweringError",
    "MAX_BATCH",
    "MAX_THREADS",
    "MIN_TIME_S",
    "OnnxRuntimeBackend",
    "PIPELINE_FILE",
    "PTE_TOLERANCE",
    "Payload",
    "PayloadError",
    "Prediction",
    "ProfileError",
    "ProfileResult",
    "ProfilerBusy",
    "ProfilerUnreachable",
    "RemoteBackend",
    "RemoteProfilerError",
    "Runnable",
    "STATISTICS",
    "Tail",
    "TorchBackend",
    "Trunk",
    "XnnpackForm",
    "analytic_flops",
    "build_once",
    "cache_dir",
    "cached_executorch",
    "cached_onnx",
    "check_kernels",
    "coreml_form",
    "coreml_zip",
    "count_flops",
    "device_info",
    "device_label",
    "export_coreml",
    "export_onnx",
    "format_profile",
    "get_backend",
    "images_reaching_experts",
    "load_pte",
    "lower",
    "masked_per_token",
    "measure_interleaved",
    "measure_latency",
    "onnx_cache_path",
    "onnxruntime_latency",
    "ort_inference",
    "ort_session",
    "profile",
    "proto_messages",
    "register_backend",
    "tail_name",
    "unpack_coreml",
    "write_checked_pte",
]
