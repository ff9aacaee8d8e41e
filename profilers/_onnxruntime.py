"""The ONNX Runtime backend: sessions as every latency here uses them, and the checks an agent makes on
an ONNX file it is sent."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from profilers._backends import AgentLimits, LocalBackend, Payload, Runnable, model_form, proto_messages
from profilers._errors import PayloadError, ProfileError
from profilers._export import cached_onnx, export_onnx
from profilers._latency import MIN_RUNS, MIN_TIME_S, WARMUP


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


def onnxruntime_latency(
    onnx_path: str | Path, *, batch: int = 1, threads: int = 1, provider: str | None = None,
    input_shape: tuple[int, ...] | None = None, warmup: int = WARMUP, min_runs: int = MIN_RUNS,
    min_time_s: float = MIN_TIME_S,
) -> dict:
    """Latency of an ONNX file in ONNX Runtime: full graph optimisation, `threads` intra-op threads,
    random inputs of `(batch, *input_shape)` (default: the file's own non-batch dimensions).
    Returns `BackendResult.to_json()`."""
    backend = OnnxRuntimeBackend(warmup=warmup, min_runs=min_runs, min_time_s=min_time_s)
    target = backend.runnable(onnx_path, batch=batch, threads=threads, provider=provider, input_shape=input_shape)
    return backend.time(target, batch=batch, threads=threads).to_json()


def check_onnx(body: bytes, workdir: Path, *, batch: int, limits: AgentLimits) -> Path:
    """Write `body` to `workdir` (private and empty: ONNX Runtime resolves relative paths against a
    model's folder) once it is a self-contained, well-formed ONNX model with one float input of fixed
    non-batch dimensions that ONNX Runtime can load; its path."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    try:
        model = onnx.load_from_string(body)
    except Exception as error:  # DecodeError: the bytes are not an ONNX model
        raise PayloadError(f"not a valid ONNX model: {str(error).strip()[:300]}") from None
    # Anywhere: graph and subgraph initializers, attributes, model-local functions, sparse initializers.
    if any(t.data_location == TensorProto.EXTERNAL or t.external_data for t in proto_messages(model, "TensorProto")):
        raise PayloadError("the ONNX model refers to external data files: send one self-contained file")
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # ValidationError
        raise PayloadError(f"not a valid ONNX model: {str(error).strip().splitlines()[0][:300]}") from None
    path = workdir / "model.onnx"
    path.write_bytes(body)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # just load it, quickly
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime's own exception classes
        raise PayloadError(f"ONNX Runtime cannot load the model: {str(error)[:300]}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        raise PayloadError("the model must have exactly one float input (the images)")
    dims = inputs[0].shape[1:]
    if not all(isinstance(dim, int) and dim > 0 for dim in dims):
        raise PayloadError(f"the input's non-batch dimensions must be fixed, got {inputs[0].shape}")
    if batch * math.prod(dims) > limits.max_input_elements:
        raise PayloadError(f"the input at batch {batch} ({batch * math.prod(dims)} elements) is over the agent's "
                           f"limit of {limits.max_input_elements}")
    return path


class OnnxRuntimeBackend(LocalBackend):
    name = "onnxruntime"
    content_type = "application/onnx"

    def runnable(self, path: str | Path, *, batch: int, threads: int, provider: str | None,
                 export_form: str | None = None, artifact: str | None = None,
                 input_shape: tuple[int, ...] | None = None) -> Runnable:
        """An ONNX file, loaded (the session holds the model: the file may go)."""
        import onnxruntime as ort

        session, call = ort_inference(path, batch=batch, threads=threads, provider=provider, input_shape=input_shape)
        return Runnable(call, session.get_providers()[0], export_form, artifact=artifact,
                        versions={"onnxruntime": ort.__version__})

    def prepare(self, model, *, batch, threads, provider, cache):
        ort_provider(provider)  # a provider this onnxruntime lacks fails before the export, not after
        if cache:
            path = cached_onnx(model.cfg)
            return self.runnable(path, batch=batch, threads=threads, provider=provider,
                                 export_form=model_form(model), artifact=str(path))
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, Path(tmp) / "model.onnx")
            return self.runnable(path, batch=batch, threads=threads, provider=provider, export_form=model_form(model))

    def pack(self, model, *, batch, cache, workdir):
        path = cached_onnx(model.cfg) if cache else export_onnx(model, workdir / "model.onnx")
        return Payload(path.read_bytes(), model_form(model), str(path) if cache else None)

    def load(self, body, *, workdir, batch, threads, provider, limits):
        ort_provider(provider)
        path = check_onnx(body, workdir, batch=batch, limits=limits)
        return self.runnable(path, batch=batch, threads=threads, provider=provider)  # the form: the sender knows

    @classmethod
    def providers(cls) -> list[str]:
        import onnxruntime as ort

        return ort.get_available_providers()
