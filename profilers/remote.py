"""The `remote` backend: latency measured by a profiler agent on the target device (`profilers.server`).

The model is exported here, in the form the agent's runtime runs (through the artifact cache), sent to
the agent and measured there with the same protocol as a local profile; parameters and FLOPs are
counted here. The result's `device` is the agent's machine, with its `remote_url`, so a latency always
says where it was measured.

    profile(cfg, backend="remote", remote_url="http://phone.local:8765")   # token: $VMOE_PROFILER_TOKEN
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

from profilers._backends import BACKENDS, Backend, BackendResult, get_backend
from profilers._errors import ProfileError, ProfilerUnreachable, RemoteProfilerError
from profilers._latency import MIN_RUNS, MIN_TIME_S, WARMUP

TOKEN_ENV = "VMOE_PROFILER_TOKEN"
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)  # nothing was measured
RETRY_STATUSES = (502, 503)  # a proxy without its agent, or an agent with too many requests pending


class AgentClient:
    """HTTP client of one agent. `token` defaults to $VMOE_PROFILER_TOKEN; connection failures are
    retried `retries` times with exponential backoff from `backoff_s`."""

    def __init__(self, url: str, *, token: str | None = None, retries: int = 3, backoff_s: float = 0.5,
                 timeout_s: float = 900.0):
        if not url.startswith(("http://", "https://")):
            raise ProfileError(f"remote_url must be http://HOST:PORT or https://..., got {url!r}")
        self.url = url.rstrip("/")
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self.retries, self.backoff_s = retries, backoff_s
        # Connecting is quick or never; a measurement may wait behind others in the agent's queue.
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)

    def device(self) -> dict:
        return self._request("GET", "/device")

    def profile(self, body: bytes, content_type: str, options: dict) -> dict:
        params = {key: value for key, value in options.items() if value is not None}
        return self._request("POST", "/profile", content=body, params=params, headers={"Content-Type": content_type})

    def _request(self, method: str, path: str, *, headers: dict | None = None, **kwargs) -> dict:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = httpx.request(method, self.url + path, headers=headers, timeout=self.timeout, **kwargs)
            except RETRY_ERRORS as error:
                problem = f"{type(error).__name__}: {error}"
                continue
            except httpx.TransportError as error:  # e.g. a read timeout: the agent may still be measuring
                raise RemoteProfilerError(f"profiler agent at {self.url}: {type(error).__name__}: {error}") from None
            if response.status_code in RETRY_STATUSES:
                problem = f"HTTP {response.status_code}: {_reason(response)}"
                continue
            if response.is_error:
                hint = f" (set {TOKEN_ENV} to the agent's token)" if response.status_code == 401 else ""
                raise RemoteProfilerError(
                    f"profiler agent at {self.url} answered HTTP {response.status_code}: {_reason(response)}{hint}"
                )
            return response.json()
        raise ProfilerUnreachable(
            f"profiler agent at {self.url} is unreachable ({problem}; {self.retries + 1} attempts): start it on the "
            "device with `vmoe-nas profiler-server`, or check the URL"
        )


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


class RemoteBackend(Backend):
    """Latency measured by the agent at `remote_url`, in its runtime (`vmoe-nas profiler-server --backend`):
    `provider` and `threads` mean what they mean on that backend, and `runtime_options` (e.g. a Core ML
    `precision`) go to it."""

    name = "remote"

    def __init__(self, *, remote_url: str | None = None, token: str | None = None, retries: int = 3,
                 warmup: int = WARMUP, min_runs: int = MIN_RUNS, min_time_s: float = MIN_TIME_S, **runtime_options):
        super().__init__(warmup=warmup, min_runs=min_runs, min_time_s=min_time_s)
        if not remote_url:
            raise ProfileError("the remote backend needs remote_url, the agent's http://HOST:PORT")
        self.agent = AgentClient(remote_url, token=token, retries=retries)
        self.runtime_options = runtime_options

    def run(self, model, *, batch, threads, provider, cache, anchor=None):
        # No anchor: the agent measures one model at a time on a device kept for it, so no drift to cancel.
        runtime = self._runtime(self.agent.device().get("backend"))
        with tempfile.TemporaryDirectory() as tmp:
            payload = runtime.pack(model, batch=batch, cache=cache, workdir=Path(tmp))
        options = {"batch": batch, "threads": threads, "provider": provider, **self.protocol}
        answer = self.agent.profile(payload.body, runtime.content_type, options)
        try:
            measured = BackendResult.from_json(answer)
            device = dict(answer["device"])
        except (KeyError, TypeError, ValueError) as error:
            problem = f"profiler agent at {self.agent.url} sent a malformed result: {error!r}"
            raise RemoteProfilerError(problem) from None
        versions = {**device.get("versions", {}), **measured.versions}
        return replace(measured, export_form=measured.export_form or payload.export_form, artifact=payload.artifact,
                       device={**device, "versions": versions, "remote_url": self.agent.url})

    def _runtime(self, name) -> Backend:
        """The agent's backend, here: it packs the model the way that agent loads it."""
        if name not in BACKENDS or not BACKENDS[name].content_type:
            raise RemoteProfilerError(f"profiler agent at {self.agent.url} runs unknown backend {name!r}")
        return get_backend(name, **self.protocol, **self.runtime_options)
