"""The profiler agent: runs on the target device and measures the models a search sends it.

    VMOE_PROFILER_TOKEN=... vmoe-nas profiler-server --backend onnxruntime   # loopback; --host 0.0.0.0 for others

    GET  /device    the device description (CPU, cores, OS, backend, library versions, providers)
    POST /profile   body: the model as the backend's `pack` makes it (its `content_type`: ONNX; a zipped
                    Core ML pipeline; an architecture YAML for torch); query: batch, threads, provider,
                    warmup, min_runs, min_time_s, each capped (OPTIONS). Returns `BackendResult.to_json()`
                    and the device.

The agent measures through the backend registry: the backend's `load` validates the payload and loads
it, and `time` measures it with the protocol of a local profile. Each measurement runs in a child
process, one at a time, from a private empty folder: a timeout kills it (the only way to stop a runaway
measurement), and nothing it reads resolves against the agent's own folder. Payloads are parsed as data
only (protobuf, zip, YAML without aliases); every error is a JSON `{"error": ...}` of at most
MAX_ERROR_CHARS characters that names no path on the device.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import multiprocessing
import os
import secrets
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nas.config import ConfigError
from profilers._backends import BACKENDS, AgentLimits, get_backend
from profilers._errors import PayloadError
from profilers._latency import MAX_BATCH, MAX_THREADS, MIN_RUNS, MIN_TIME_S, WARMUP
from profilers._profile import device_info
from profilers.remote import TOKEN_ENV

log = logging.getLogger("vmoe_nas.agent")

# name -> (type, minimum, maximum): every measurement option a request may set, and its cap.
OPTIONS = {
    "batch": (int, 1, MAX_BATCH), "threads": (int, 1, MAX_THREADS),
    "warmup": (int, 0, 1000), "min_runs": (int, 1, 10_000), "min_time_s": (float, 0.0, 60.0),
}
DEFAULTS = {"batch": 1, "threads": 1, "warmup": WARMUP, "min_runs": MIN_RUNS, "min_time_s": MIN_TIME_S}
MAX_ERROR_CHARS = 500  # an error quotes what it refuses: never the whole of it
MAX_PENDING = 8  # requests uploading or queued at once (their bodies are in memory); more get a 503
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class AgentSettings:
    backend: str = "onnxruntime"
    token: str | None = None  # required by every request when set
    max_upload_bytes: int = 256 * 2**20
    timeout_s: float = 300.0  # per request: the upload, then queue and measurement together
    host: str = "127.0.0.1"  # on loopback, requests must name a loopback Host (no DNS rebinding)
    header_timeout_s: float = 10.0  # for a request's headers, and between chunks of its body
    limits: AgentLimits = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "limits", AgentLimits(max_bytes=self.max_upload_bytes))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def parse_options(query) -> dict:
    unknown = sorted(set(query) - set(OPTIONS) - {"provider"})
    if unknown:
        raise PayloadError(f"unknown option {unknown[0][:50]!r} (known: provider, {', '.join(OPTIONS)})")
    options = dict(DEFAULTS, provider=query.get("provider") or None)
    for name, (kind, low, high) in OPTIONS.items():
        if name in query:
            try:
                options[name] = kind(query[name])
            except ValueError:
                raise PayloadError(f"{name} must be a {kind.__name__}, got {query[name][:50]!r}") from None
            if not low <= options[name] <= high:
                raise PayloadError(f"{name} must be in [{low}, {high}], got {options[name]}")
    return options


# ---------------------------------------------------------------- measurement


def measure(settings: AgentSettings, body: bytes, options: dict, workdir: Path | None = None) -> dict:
    """Validate `body` with the agent's backend, load it from `workdir` (a private empty folder; a fresh
    one by default) and measure it: `BackendResult.to_json()`, with latency_ms None and a note where this
    device cannot run it."""
    backend = get_backend(settings.backend, **{key: options[key] for key in ("warmup", "min_runs", "min_time_s")})
    with tempfile.TemporaryDirectory(prefix="vmoe-agent-") as tmp:
        target = backend.load(body, workdir=workdir or Path(tmp), batch=options["batch"], threads=options["threads"],
                              provider=options["provider"], limits=settings.limits)
        return backend.time(target, batch=options["batch"], threads=options["threads"]).to_json()


def _measure_child(settings: AgentSettings, upload: str, options: dict, workdir: str, conn) -> None:
    """A measurement process: (status, result or message) back through `conn`."""
    os.chdir(workdir)  # a path the model names relative to the working directory finds nothing
    try:
        conn.send((200, measure(settings, Path(upload).read_bytes(), options, Path(workdir))))
    except (PayloadError, ConfigError) as error:
        conn.send((400, str(error)))
    except ValueError as error:  # ProfileError and the like: an option this device cannot honour
        conn.send((422, str(error)))
    except Exception as error:
        traceback.print_exc()  # to the agent's log; the client gets the kind of error only
        conn.send((500, f"the measurement failed ({type(error).__name__}); the agent's log has the details"))


def child_context(backend: str):
    """Measurement processes fork from a server that has imported the backend once (fast, and without the
    agent's threads); `spawn` where there is no fork server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, BACKENDS[backend].__module__])
    return context


def measure_in_child(settings: AgentSettings, body: bytes, options: dict, deadline: float) -> dict:
    """`measure` in a child process, killed at `deadline` (time.monotonic()); errors as HTTPExceptions."""
    if time.monotonic() >= deadline:  # it waited in the queue past its time: never start it
        raise HTTPException(504, f"no result within {settings.timeout_s:g} s (queue and measurement)")
    with tempfile.TemporaryDirectory(prefix="vmoe-agent-") as tmp:
        upload, workdir = Path(tmp) / "upload", Path(tmp) / "model"
        upload.write_bytes(body)
        workdir.mkdir()
        receiver, sender = multiprocessing.Pipe(duplex=False)
        child = child_context(settings.backend).Process(
            target=_measure_child, args=(settings, str(upload), options, str(workdir), sender), daemon=True)
        child.start()
        sender.close()
        try:
            if not wait([receiver, child.sentinel], timeout=max(0.0, deadline - time.monotonic())):
                raise HTTPException(504, f"no result within {settings.timeout_s:g} s (queue and measurement); "
                                         "the measurement was stopped")
            try:
                status, result = receiver.recv()
            except EOFError:  # it died without a word: killed by the system (memory) or crashed
                child.join(5)
                raise HTTPException(500, f"the measurement process died (exit code {child.exitcode})") from None
        finally:
            child.kill()
            child.join()
            receiver.close()
    if status != 200:
        for path in (str(Path(tmp).resolve()), tmp):  # a library's message may name the upload's folder
            result = result.replace(path, "")
        raise HTTPException(status, result)
    return result


def device_description(backend: str) -> dict:
    if backend not in BACKENDS.agent_backends():
        raise ConfigError("backend", f"must be one of {', '.join(BACKENDS.agent_backends())}, got {backend!r}")
    try:
        providers = BACKENDS[backend].providers()
    except ImportError as error:
        raise ConfigError("backend", f"{backend} needs {error.name}: pip install 'vmoe-nas[{backend}]'") from None
    return {**device_info(), "backend": backend, "providers": providers}


# ---------------------------------------------------------------- the app


def host_name(header: str) -> str:
    """The host a Host header names: 'a:80' -> 'a', '[::1]:80' -> '::1'."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if ":" in header else header


class Guard:
    """ASGI middleware: on loopback, the Host header must name loopback (a web page that rebinds its own
    name to 127.0.0.1 still sends that name); with a token, every request must carry it."""

    def __init__(self, app, settings: AgentSettings):
        self.app, self.loopback = app, is_loopback(settings.host)
        self.expected = f"Bearer {settings.token}".encode() if settings.token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            if self.loopback and host_name(headers.get("host", "")) not in LOOPBACK_HOSTS:
                response = JSONResponse({"error": "Host header must name this loopback agent"}, status_code=421)
                return await response(scope, receive, send)
            given = headers.get("authorization", "").encode()
            if self.expected and not secrets.compare_digest(given, self.expected):  # constant time: no guessing
                response = JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int, idle_s: float) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (before it is all in memory), and
    with 408 when no data comes for `idle_s`."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit():
        raise HTTPException(400, "bad Content-Length")
    if int(declared) > limit:
        raise HTTPException(413, f"the body is over the agent's limit of {limit} bytes")
    chunks, size, stream = [], 0, request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_s)
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"no data for {idle_s:g} s") from None
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body is over the agent's limit of {limit} bytes")
        chunks.append(chunk)


def create_app(settings: AgentSettings, *, run=measure_in_child) -> Starlette:
    """The agent's app; `run(settings, body, options, deadline)` measures (default: `measure_in_child`)."""
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="measure")  # the queue: one at a time
    device = device_description(settings.backend)
    content_type = BACKENDS[settings.backend].content_type
    pending = [0]

    async def get_device(request: Request) -> JSONResponse:
        return JSONResponse(device)

    async def post_profile(request: Request) -> JSONResponse:
        try:
            options = parse_options(request.query_params)
        except PayloadError as error:
            raise HTTPException(400, str(error)) from None
        given = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if given != content_type:
            raise HTTPException(415, f"this {settings.backend} agent takes {content_type}, got {given[:50] or 'none'}")
        if pending[0] >= MAX_PENDING:
            raise HTTPException(503, f"{MAX_PENDING} requests are already pending: retry later")
        pending[0] += 1
        try:
            try:
                body = await asyncio.wait_for(read_body(request, settings.max_upload_bytes, settings.header_timeout_s),
                                              settings.timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the upload took over {settings.timeout_s:g} s") from None
            deadline = time.monotonic() + settings.timeout_s
            result = await asyncio.get_running_loop().run_in_executor(worker, run, settings, body, options, deadline)
        finally:
            pending[0] -= 1
        return JSONResponse({**result, "device": device})

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = str(error.detail)
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 15] + " ... (truncated)"
        return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

    async def server_error(request: Request, error: Exception) -> JSONResponse:
        if out_of_descriptors(error):  # a load to wait out, not a fault: one line, and the client retries
            log.warning("request refused: out of file descriptors (%s); raise the open-file limit (ulimit -n)",
                        error.strerror)
            return JSONResponse({"error": "the agent is out of file descriptors: retry later"}, status_code=429)
        log.error("internal error", exc_info=error)  # the details stay here: they may name paths
        return JSONResponse({"error": f"internal error ({type(error).__name__}); the agent's log has the details"},
                            status_code=500)

    @asynccontextmanager
    async def lifespan(app):
        asyncio.get_running_loop().set_exception_handler(quiet_descriptor_errors)
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = Starlette(
        routes=[Route("/device", get_device, methods=["GET"]), Route("/profile", post_profile, methods=["POST"])],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.add_middleware(Guard, settings=settings)
    return app


def out_of_descriptors(error: BaseException | None) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE)


def quiet_descriptor_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The event loop's error handler: an accept that fails for want of file descriptors (idle sockets up to the
    open-file limit; asyncio retries it a second later) is one log line, not a traceback a second."""
    if out_of_descriptors(context.get("exception")):
        log.warning("cannot accept a connection: out of file descriptors (%s); raise the open-file limit "
                    "(ulimit -n) or wait for idle sockets to close", context["exception"].strerror)
        return
    loop.default_exception_handler(context)


def headers_deadline_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection that has not sent a request's headers within
    `timeout_s`: uvicorn times out only idle kept-alive connections, so a socket that sends nothing, or
    trickles, would otherwise hold its place forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self._deadline:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self._deadline:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _expire(self):
            if self.cycle is None or self.cycle.response_complete:  # no request under way: still no headers
                self.transport.close()

    return Protocol


def read_token(token: str | None, token_file: str | Path | None) -> str | None:
    """The token: given (from Python), from `token_file`, or from $VMOE_PROFILER_TOKEN; never the command
    line, where `ps` shows it to every user of the machine."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as error:
            raise ConfigError("token_file", f"cannot read {token_file}: {error.strerror}") from None
        if not token:
            raise ConfigError("token_file", f"{token_file} is empty")
    return token or os.environ.get(TOKEN_ENV) or None


def serve(*, host: str = "127.0.0.1", port: int = 8765, backend: str = "onnxruntime", token: str | None = None,
          token_file: str | Path | None = None, insecure_no_token: bool = False, max_upload_mb: float = 256,
          timeout_s: float = 300, header_timeout_s: float = 10) -> None:
    """Run the agent until interrupted. A token is required (`token_file` or $VMOE_PROFILER_TOKEN), except
    on loopback with `insecure_no_token`."""
    import uvicorn

    token = read_token(token, token_file)
    if not token and not is_loopback(host):
        raise ConfigError("token", f"required to listen on {host} (not loopback): set {TOKEN_ENV} or --token-file")
    if not token and not insecure_no_token:
        raise ConfigError("token", f"required: set {TOKEN_ENV} or --token-file (or, on loopback only, pass "
                                   "--insecure-no-token to accept requests from any local program)")
    settings = AgentSettings(backend, token, int(max_upload_mb * 2**20), timeout_s, host, header_timeout_s)
    # No limit_concurrency: uvicorn counts idle sockets against it, so a few would refuse every request.
    # Idle sockets are closed at the headers deadline instead, and the app bounds pending uploads.
    uvicorn.run(create_app(settings), host=host, port=port, http=headers_deadline_protocol(header_timeout_s),
                timeout_keep_alive=5)
