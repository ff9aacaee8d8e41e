"""Cost of an architecture: FLOPs, parameters, size and latency on real backends.

    profile(cfg)                      # everything, as one JSON-ready dict (ONNX Runtime, 1 thread, batch 1)
    profile(cfg, measure=False)       # params, sizes, FLOPs only: the cheap filter before latency
    count_flops(cfg).total == analytic_flops(cfg)
"""

from profilers._backends import (
    BACKENDS,
    Backend,
    BackendResult,
    CoreMLBackend,
    LocalBackend,
    OnnxRuntimeBackend,
    Runnable,
    TorchBackend,
    get_backend,
    onnxruntime_latency,
    ort_inference,
    ort_session,
    register_backend,
)
from profilers._coreml import CoreMLExport, coreml_form, export_coreml
from profilers._export import CACHE_ENV, ProfileError, cache_dir, cached_onnx, export_onnx
from profilers._flops import FlopReport, analytic_flops, count_flops
from profilers._latency import MIN_TIME_S, LatencyStats, measure_interleaved, measure_latency
from profilers._profile import device_info, device_label, format_profile, profile
from profilers.remote import ProfilerUnreachable, RemoteBackend, RemoteProfilerError  # registers "remote"

__all__ = [
    "BACKENDS",
    "CACHE_ENV",
    "Backend",
    "BackendResult",
    "CoreMLBackend",
    "CoreMLExport",
    "LocalBackend",
    "FlopReport",
    "LatencyStats",
    "MIN_TIME_S",
    "OnnxRuntimeBackend",
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
