"""The profiler agent: runs on the target device and measures the models a search sends it.

    vmoe-nas profiler-server --backend onnxruntime          # loopback only; --host 0.0.0.0 needs --token

    GET  /device    the device description (CPU, cores, OS, backend, library versions, providers)
    POST /profile   body: the model in the backend's form, see `profilers.remote.CONTENT_TYPES`
                    (ONNX; a zipped Core ML pipeline; an architecture YAML for torch); query: batch,
                    threads, provider, warmup, min_runs, min_time_s. Returns the latency JSON and device.

Measurements use the same protocol as a local profile and run one at a time on a single worker thread,
which is the request queue: a measurement never shares the CPU with another. Payloads are parsed as
data only (protobuf, zip, safe YAML) and validated before use; every error is a JSON `{"error": ...}`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import secrets
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path, PurePosixPath

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from profilers._backends import BackendResult, CoreMLBackend, get_backend, onnxruntime_latency
from profilers._coreml import CoreMLExport
from profilers._latency import MIN_RUNS, MIN_TIME_S, WARMUP, measure_latency
from profilers._profile import device_info
from profilers.remote import CONTENT_TYPES, PIPELINE_FILE, TOKEN_ENV
from search_spaces import ArchConfig, ConfigError, build_model

MAX_YAML_BYTES = 64 * 1024  # an architecture is a few hundred bytes
MAX_ZIP_ENTRIES = 10_000
UNZIP_RATIO = 4  # a Core ML payload may unpack to this many times the upload limit, no more (zip bombs)
PROGRAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# name -> (type, minimum, maximum): every measurement option a request may set.
OPTIONS = {
    "batch": (int, 1, 1024), "threads": (int, 1, 256),
    "warmup": (int, 0, 10_000), "min_runs": (int, 1, 100_000), "min_time_s": (float, 0.0, 600.0),
}
DEFAULTS = {"batch": 1, "threads": 1, "warmup": WARMUP, "min_runs": MIN_RUNS, "min_time_s": MIN_TIME_S}


class PayloadError(ValueError):
    """The request's model or options are unusable: a 400 with this message."""


@dataclass(frozen=True)
class AgentSettings:
    backend: str = "onnxruntime"
    token: str | None = None  # required by every request when set
    max_upload_bytes: int = 256 * 2**20
    timeout_s: float = 300.0  # per request: upload, queue and measurement each


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


# ---------------------------------------------------------------- validation


def parse_options(query) -> dict:
    unknown = sorted(set(query) - set(OPTIONS) - {"provider"})
    if unknown:
        raise PayloadError(f"unknown option {unknown[0]!r} (known: provider, {', '.join(OPTIONS)})")
    options = dict(DEFAULTS, provider=query.get("provider") or None)
    for name, (kind, low, high) in OPTIONS.items():
        if name in query:
            try:
                options[name] = kind(query[name])
            except ValueError:
                raise PayloadError(f"{name} must be a {kind.__name__}, got {query[name]!r}") from None
            if not low <= options[name] <= high:
                raise PayloadError(f"{name} must be in [{low}, {high}], got {options[name]}")
    return options


def check_onnx(body: bytes) -> None:
    """A self-contained, well-formed ONNX model with one float input that ONNX Runtime can load."""
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        model = onnx.load_from_string(body)
        if any(uses_external_data(tensor) for tensor in _get_all_tensors(model)):  # paths on this machine
            raise PayloadError("the ONNX model refers to external data files: send one self-contained file")
        onnx.checker.check_model(model)
    except PayloadError:
        raise
    except Exception as error:  # DecodeError, ValidationError: the bytes are not a valid ONNX model
        raise PayloadError(f"not a valid ONNX model: {str(error).strip().splitlines()[0][:300]}") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # just load it, quickly
    try:
        session = ort.InferenceSession(body, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime's own exception classes
        raise PayloadError(f"ONNX Runtime cannot load the model: {str(error)[:300]}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        raise PayloadError("the model must have exactly one float input (the images)")
    if not all(isinstance(dim, int) and dim > 0 for dim in inputs[0].shape[1:]):
        raise PayloadError(f"the input's non-batch dimensions must be fixed, got {inputs[0].shape}")


def unpack_coreml(body: bytes, out_dir: Path, max_bytes: int) -> tuple[CoreMLExport, ArchConfig]:
    """Unpack a Core ML payload (see `profilers.remote.coreml_zip`) into `out_dir`: only PIPELINE_FILE and
    `NAME.mlpackage/...` regular files, no absolute or parent paths, at most `max_bytes` unpacked."""
    try:
        archive = zipfile.ZipFile(BytesIO(body))
    except zipfile.BadZipFile:
        raise PayloadError("not a zip file (a coreml agent takes a zipped Core ML pipeline)") from None
    entries = archive.infolist()
    if len(entries) > MAX_ZIP_ENTRIES or sum(entry.file_size for entry in entries) > max_bytes:
        raise PayloadError(f"the zip unpacks to more than {MAX_ZIP_ENTRIES} files or {max_bytes} bytes")
    for entry in entries:
        _check_entry(entry)
    try:
        spec = json.loads(archive.read(PIPELINE_FILE))
        names, arch = list(spec["pipeline"]), ArchConfig.from_dict(spec["arch"])
    except (KeyError, TypeError, ValueError) as error:  # ConfigError is a ValueError
        raise PayloadError(f"{PIPELINE_FILE} is missing or malformed: {error}") from None
    if not names or not all(isinstance(n, str) and PROGRAM_NAME.fullmatch(n) for n in names):
        raise PayloadError(f"{PIPELINE_FILE}: pipeline must list program names, got {names!r}")
    try:
        for entry in entries:  # member sizes are enforced while reading: a lying header fails its CRC
            if not entry.is_dir():
                target = out_dir / entry.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(entry))
    except zipfile.BadZipFile as error:
        raise PayloadError(f"corrupt zip: {error}") from None
    programs = {name: out_dir / f"{name}.mlpackage" for name in names}
    missing = [name for name, path in programs.items() if not (path / "Manifest.json").is_file()]
    if missing:
        raise PayloadError(f"no {missing[0]}.mlpackage/Manifest.json in the zip")
    return CoreMLExport(str(spec.get("form", "")), programs, tuple(names)), arch


def _check_entry(entry: zipfile.ZipInfo) -> None:
    path = PurePosixPath(entry.filename)
    is_link = (entry.external_attr >> 16) & 0o170000 == 0o120000
    top = path.parts[0] if path.parts else ""
    if (path.is_absolute() or "\\" in entry.filename or ".." in path.parts or ":" in top or is_link
            or not (entry.filename == PIPELINE_FILE or top.endswith(".mlpackage"))):
        raise PayloadError(f"zip entry {entry.filename!r} is not allowed (only {PIPELINE_FILE} and NAME.mlpackage/...)")


# ---------------------------------------------------------------- measurement (on the worker thread)


def measure(settings: AgentSettings, body: bytes, options: dict) -> dict:
    """Validate `body` and measure it; JSON with latency_ms (None plus a note where this device cannot
    run it), provider, export_form, threads, batch, versions."""
    protocol = {key: options[key] for key in ("warmup", "min_runs", "min_time_s")}
    run_options = {key: options[key] for key in ("batch", "threads", "provider")}
    backend = settings.backend
    if backend == "onnxruntime":
        check_onnx(body)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(body)
            measured = onnxruntime_latency(path, **run_options, **protocol)
        return {**measured, "note": None, "export_form": None}
    if backend == "torch":
        if options["provider"] not in (None, "cpu", "cuda"):
            raise PayloadError(f"provider must be cpu or cuda on a torch agent, got {options['provider']!r}")
        if len(body) > MAX_YAML_BYTES:
            raise PayloadError(f"an architecture YAML is at most {MAX_YAML_BYTES} bytes")
        try:
            cfg = ArchConfig.from_yaml(body.decode())
        except (ConfigError, UnicodeDecodeError) as error:
            raise PayloadError(f"not a valid architecture: {error}") from None
        if 4 * weight_count(cfg) > settings.max_upload_bytes:  # the limit an ONNX file of it would meet
            raise PayloadError(f"{cfg.name} is over the agent's model size limit of {settings.max_upload_bytes} bytes")
        run = get_backend("torch", **protocol).run(build_model(cfg), cache=False, **run_options)
        return _result(run, options)
    with tempfile.TemporaryDirectory() as tmp:
        unpacked = measure_coreml(body, Path(tmp), UNZIP_RATIO * settings.max_upload_bytes, options, protocol)
        return _result(unpacked, options)


def weight_count(cfg: ArchConfig) -> int:
    """The weight matrices' parameters, from the config alone: a check before building anything."""
    C, H = cfg.width, cfg.mlp_hidden
    mlps = cfg.depth + (cfg.moe.num_experts - 1) * len(cfg.moe_layers) if cfg.moe else cfg.depth
    patch = cfg.in_channels * cfg.patch_size**2 * C
    return patch + cfg.num_tokens * C + cfg.depth * 4 * C * C + mlps * 2 * C * H + C * cfg.num_classes


def measure_coreml(body: bytes, tmp: Path, max_bytes: int, options: dict, protocol: dict) -> BackendResult:
    import coremltools as ct

    exported, cfg = unpack_coreml(body, tmp, max_bytes)
    for path in exported.programs.values():
        try:  # parse the spec without compiling: a malformed package fails here, on any OS
            ct.models.MLModel(str(path), skip_model_load=True)
        except Exception as error:
            raise PayloadError(f"{path.name} is not a valid Core ML package: {str(error)[:300]}") from None
    units = (options["provider"] or "all").upper()
    if units not in ct.ComputeUnit.__members__:
        raise PayloadError(f"provider must be a compute unit ({', '.join(ct.ComputeUnit.__members__)}), got {units!r}")
    form = f"{exported.form} (measured: {' then '.join(exported.pipeline)})"
    versions = {"coremltools": ct.__version__}
    if sys.platform != "darwin":
        return BackendResult(None, units, form, note=f"Core ML predictions need macOS, this agent runs {sys.platform}",
                             versions=versions)
    predict = CoreMLBackend._predict_fn(exported, cfg, options["batch"], units)
    return BackendResult(measure_latency(predict, **protocol), units, form, versions=versions)


def _result(run: BackendResult, options: dict) -> dict:
    return {
        "latency_ms": run.latency.to_dict() if run.latency else None, "note": run.note, "provider": run.provider,
        "export_form": run.export_form, "threads": options["threads"], "batch": options["batch"],
        "versions": run.versions,
    }


def device_description(backend: str) -> dict:
    if backend == "onnxruntime":
        import onnxruntime as ort

        providers = ort.get_available_providers()
    elif backend == "torch":
        import torch

        providers = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    else:
        try:
            import coremltools as ct
        except ImportError:
            raise ConfigError("backend", "coreml needs coremltools: pip install 'vmoe-nas[coreml]'") from None
        providers = [unit.lower() for unit in ct.ComputeUnit.__members__]
    return {**device_info(), "backend": backend, "providers": providers}


# ---------------------------------------------------------------- the app


class BearerToken:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <token>`."""

    def __init__(self, app, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):  # constant time: no guessing byte by byte
                response = JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (before it is all in memory)."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit():
        raise HTTPException(400, "bad Content-Length")
    if int(declared) > limit:
        raise HTTPException(413, f"the body is over the agent's limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body is over the agent's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: AgentSettings) -> Starlette:
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="measure")  # the measurement queue
    device = device_description(settings.backend)
    content_type = CONTENT_TYPES[settings.backend]

    async def get_device(request: Request) -> JSONResponse:
        return JSONResponse(device)

    async def post_profile(request: Request) -> JSONResponse:
        try:
            options = parse_options(request.query_params)
        except PayloadError as error:
            raise HTTPException(400, str(error)) from None
        given = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if given != content_type:
            raise HTTPException(415, f"this {settings.backend} agent takes {content_type}, got {given or 'none'}")
        try:
            body = await asyncio.wait_for(read_body(request, settings.max_upload_bytes), settings.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the upload took over {settings.timeout_s:g} s") from None
        job = asyncio.get_running_loop().run_in_executor(worker, measure, settings, body, options)
        try:  # a timeout drops a queued job; a running one finishes first, so the next never overlaps it
            result = await asyncio.wait_for(job, settings.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no result within {settings.timeout_s:g} s (queue and measurement)") from None
        except (PayloadError, ConfigError) as error:
            raise HTTPException(400, str(error)) from None
        except ValueError as error:  # an option this device cannot honour, e.g. a missing provider
            raise HTTPException(422, str(error)) from None
        return JSONResponse({**result, "device": device})

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)

    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": f"{type(error).__name__}: {error}"}, status_code=500)

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = Starlette(
        routes=[Route("/device", get_device, methods=["GET"]), Route("/profile", post_profile, methods=["POST"])],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    if settings.token:
        app.add_middleware(BearerToken, token=settings.token)
    return app


def serve(*, host: str = "127.0.0.1", port: int = 8765, backend: str = "onnxruntime", token: str | None = None,
          max_upload_mb: float = 256, timeout_s: float = 300) -> None:
    """Run the agent until interrupted. Off loopback a token is required (default: $VMOE_PROFILER_TOKEN)."""
    import uvicorn

    token = token or os.environ.get(TOKEN_ENV) or None
    if backend not in CONTENT_TYPES:
        raise ConfigError("backend", f"must be one of {', '.join(CONTENT_TYPES)}, got {backend!r}")
    if not token and not is_loopback(host):
        raise ConfigError("token", f"required to listen on {host} (not loopback): pass --token or set {TOKEN_ENV}")
    settings = AgentSettings(backend, token, int(max_upload_mb * 2**20), timeout_s)
    # limit_concurrency: requests past it get a 503 at once, so queued uploads cannot fill the memory.
    uvicorn.run(create_app(settings), host=host, port=port, limit_concurrency=8, timeout_keep_alive=5)
