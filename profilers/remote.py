"""The `remote` backend: latency measured by a profiler agent on the target device (`profilers.server`).

The model is exported here, in the form the agent's runtime runs (through the artifact cache), sent to
the agent and measured there with the same protocol as a local profile; parameters and FLOPs are
counted here. The result's `device` is the agent's machine, with its `remote_url`, so a latency always
says where it was measured.

    profile(cfg, backend="remote", remote_url="http://phone.local:8765")   # token: $VMOE_PROFILER_TOKEN
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

from profilers._backends import Backend, BackendResult, model_form, register_backend
from profilers._coreml import export_coreml
from profilers._export import ProfileError, cache_dir, cached_onnx, export_onnx
from profilers._latency import LatencyStats
from search_spaces import VisionMoE

TOKEN_ENV = "VMOE_PROFILER_TOKEN"
# The payload each agent backend accepts (the agent checks the content type against it).
CONTENT_TYPES = {"onnxruntime": "application/onnx", "coreml": "application/zip", "torch": "application/yaml"}
PIPELINE_FILE = "pipeline.json"  # in a Core ML payload: the programs to run in order, and the architecture
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)  # nothing was measured
RETRY_STATUSES = (502, 503)  # a proxy without its agent, or an agent at its connection limit


class RemoteProfilerError(ProfileError):
    """The agent refused or failed a request; the message names its URL and its reason."""


class ProfilerUnreachable(RemoteProfilerError):
    """No answer from the agent, after retries."""


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


@register_backend
class RemoteBackend(Backend):
    """Latency measured by the agent at `remote_url`, in its runtime (`vmoe-nas profiler-server --backend`):
    `provider` and `threads` mean what they mean on that backend."""

    name = "remote"

    def __init__(self, *, remote_url: str | None = None, token: str | None = None, retries: int = 3,
                 precision: str = "fp16", **protocol):
        super().__init__(**protocol)
        if not remote_url:
            raise ProfileError("the remote backend needs remote_url, the agent's http://HOST:PORT")
        self.agent = AgentClient(remote_url, token=token, retries=retries)
        self.precision = precision  # of a Core ML export, for a coreml agent

    def run(self, model, *, batch, threads, provider, cache, anchor=None):
        # No anchor: the agent measures one model at a time on a device kept for it, so no drift to cancel.
        agent_backend = self.agent.device()["backend"]
        if agent_backend not in CONTENT_TYPES:
            raise RemoteProfilerError(f"profiler agent at {self.agent.url} runs unknown backend {agent_backend!r}")
        with tempfile.TemporaryDirectory() as tmp:
            body, form, artifact = self._payload(model, agent_backend, batch=batch, cache=cache, tmp=Path(tmp))
        options = {"batch": batch, "threads": threads, "provider": provider, **self.protocol}
        measured = self.agent.profile(body, CONTENT_TYPES[agent_backend], options)
        latency, device = measured["latency_ms"], measured["device"]
        versions = {**device.get("versions", {}), **measured["versions"]}
        return BackendResult(
            LatencyStats(**latency) if latency else None, measured["provider"], measured.get("export_form") or form,
            artifact=artifact, note=measured.get("note"), versions=measured["versions"],
            device={**device, "versions": versions, "remote_url": self.agent.url},
        )

    def _payload(self, model: VisionMoE, agent_backend: str, *, batch: int, cache: bool,
                 tmp: Path) -> tuple[bytes, str, str | None]:
        """The bytes the agent's backend runs, the form of the model they compute, and the cached artifact."""
        cfg = model.cfg
        if agent_backend == "torch":  # the agent builds the model: latency does not depend on the weights
            return cfg.to_yaml().encode(), model_form(model), None
        if agent_backend == "onnxruntime":
            path = cached_onnx(cfg) if cache else export_onnx(model, tmp / "model.onnx")
            return path.read_bytes(), model_form(model), str(path) if cache else None
        out_dir = cache_dir() / f"coreml/{cfg.config_hash()}-{self.precision}-b{batch}" if cache else tmp / "coreml"
        exported = export_coreml(model, out_dir, batch=batch, precision=self.precision, all_tails=False)
        form = f"{exported.form} (measured: {' then '.join(exported.pipeline)})"
        return coreml_zip(exported, cfg.to_dict()), form, str(out_dir) if cache else None


def coreml_zip(exported, arch: dict) -> bytes:
    """The Core ML payload: the programs of `exported.pipeline` (`NAME.mlpackage/...`) and PIPELINE_FILE."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(PIPELINE_FILE, json.dumps({"form": exported.form, "pipeline": list(exported.pipeline),
                                                    "arch": arch}))
        for name in exported.pipeline:
            root = Path(exported.programs[name])
            for file in sorted(p for p in root.rglob("*") if p.is_file()):
                archive.write(file, f"{name}.mlpackage/{file.relative_to(root).as_posix()}")
    return buffer.getvalue()
