"""The `remote` backend: latency measured by a profiler agent on the target device (`profilers.server`).

The model is exported here, in the form the agent's runtime runs (through the artifact cache), sent to
the agent and measured there with the same protocol as a local profile; parameters and FLOPs are
counted here. The result's `device` is the agent's machine, with its `remote_url`, so a latency always
says where it was measured.

    profile(cfg, backend="remote", remote_url="http://phone.local:8765")   # token: $VMOE_PROFILER_TOKEN
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

from profilers._backends import BACKENDS, Backend, BackendResult, get_backend
from profilers._errors import ProfileError, ProfilerBusy, ProfilerUnreachable, RemoteProfilerError
from profilers._latency import MIN_RUNS, MIN_TIME_S, WARMUP

TOKEN_ENV = "VMOE_PROFILER_TOKEN"
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)  # nothing was measured
RETRY_STATUSES = (502,)  # a proxy without its agent
BUSY_STATUSES = (429, 503)  # an agent with too many requests pending (or out of file descriptors): it is up
BUSY_WAIT_S = 600.0  # how long a client waits for a busy agent, retrying, before it gives up (ProfilerBusy)
BUSY_MAX_SLEEP_S = 10.0  # the longest pause between two tries at a busy agent


class AgentClient:
    """HTTP client of one agent. `token` defaults to $VMOE_PROFILER_TOKEN; connection failures are
    retried `retries` times with exponential backoff from `backoff_s` (then ProfilerUnreachable). A busy agent
    (HTTP 503 or 429: other clients' requests pending) is up: it is retried with backoff, jittered and capped
    at BUSY_MAX_SLEEP_S, for up to `busy_wait_s` seconds (then ProfilerBusy)."""

    def __init__(self, url: str, *, token: str | None = None, retries: int = 3, backoff_s: float = 0.5,
                 timeout_s: float = 900.0, busy_wait_s: float = BUSY_WAIT_S):
        if not url.startswith(("http://", "https://")):
            raise ProfileError(f"remote_url must be http://HOST:PORT or https://..., got {url!r}")
        self.url = url.rstrip("/")
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self.retries, self.backoff_s, self.busy_wait_s = retries, backoff_s, busy_wait_s
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
        problem, attempt, busy_since, busy_tries = "", 0, None, 0
        while attempt <= self.retries:
            if busy_since is not None:  # the last answer was "busy": wait for a queue place, not for the agent
                busy_tries += 1
                pause = min(BUSY_MAX_SLEEP_S, self.backoff_s * 2 ** min(busy_tries - 1, 20))
                time.sleep(pause * random.uniform(0.5, 1.0))  # jitter: clients turned away together come back apart
            elif attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = httpx.request(method, self.url + path, headers=headers, timeout=self.timeout, **kwargs)
            except RETRY_ERRORS as error:
                problem, busy_since, attempt = f"{type(error).__name__}: {error}", None, attempt + 1
                continue
            except httpx.TransportError as error:  # e.g. a read timeout: the agent may still be measuring
                raise RemoteProfilerError(f"profiler agent at {self.url}: {type(error).__name__}: {error}") from None
            if response.status_code in BUSY_STATUSES:
                busy_since = time.monotonic() if busy_since is None else busy_since
                if time.monotonic() - busy_since >= self.busy_wait_s:
                    raise ProfilerBusy(f"profiler agent at {self.url} stayed busy for {self.busy_wait_s:g} s "
                                       f"({busy_tries + 1} tries; HTTP {response.status_code}: {_reason(response)}): "
                                       "it serves other clients; try again later, or run another agent")
                continue
            if response.status_code in RETRY_STATUSES:
                problem, busy_since, attempt = f"HTTP {response.status_code}: {_reason(response)}", None, attempt + 1
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
