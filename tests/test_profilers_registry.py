"""The backend registry: every backend by name, imported on first use; an agent measures any backend
with a payload through it, without naming one."""

import subprocess
import sys
import textwrap

import pytest

import profilers
from nas.config import ConfigError
from profilers import BACKENDS, BackendResult, LatencyStats, LocalBackend, Payload, Runnable, register_backend
from profilers.server import AgentSettings, device_description, measure

from archs import tiny

FAST = {"warmup": 1, "min_runs": 3, "min_time_s": 0.0}


@pytest.mark.slow
def test_import_profilers_pulls_in_no_runtime_no_http_stack_and_no_warning_filter():
    code = textwrap.dedent("""
        import sys, warnings
        import fvcore.nn, numpy, onnx, torch, search_spaces  # what profilers builds on, and their filters
        before = list(warnings.filters)
        import profilers
        heavy = [m for m in ("httpx", "starlette", "uvicorn", "onnxruntime", "coremltools", "executorch")
                 if m in sys.modules]
        print(heavy, [f for f in warnings.filters if f not in before])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"


def test_every_backend_is_listed_by_name_and_loads_on_demand():
    assert list(BACKENDS) == ["onnxruntime", "torch", "coreml", "executorch", "remote"]
    assert BACKENDS.agent_backends() == ["onnxruntime", "torch", "coreml", "executorch"]
    assert {BACKENDS[name].content_type for name in BACKENDS.agent_backends()} == {
        "application/onnx", "application/yaml", "application/zip", "application/x-executorch"}
    assert profilers.RemoteBackend is BACKENDS["remote"]
    assert "tensorrt" not in BACKENDS and [] not in BACKENDS  # a study config's value may be anything
    from nas.study import BACKENDS as study_backends

    assert list(study_backends) == list(BACKENDS)


def test_a_result_round_trips_through_json():
    stats = LatencyStats.from_times([0.001, 0.002, 0.003])
    result = BackendResult(stats, "cpu", "dense", note=None, versions={"torch": "x"}, anchor=stats, threads=2, batch=4)
    assert BackendResult.from_json(result.to_json()) == result
    unmeasured = BackendResult(None, "ALL", "dense", note="needs macOS")
    assert BackendResult.from_json(unmeasured.to_json()) == unmeasured


class EchoBackend(LocalBackend):
    """A backend the agent has never heard of: its payload is a number of calls to make."""

    name = "echo"
    content_type = "application/x-echo"

    def prepare(self, model, *, batch, threads, provider, cache):
        return Runnable(lambda: None, provider or "echo-device", "echo-form")

    def pack(self, model, *, batch, cache, workdir):
        return Payload(b"echo", "echo-form")

    def load(self, body, *, workdir, batch, threads, provider, limits):
        assert body == b"echo" and not any(workdir.iterdir())  # a private empty folder
        return Runnable(lambda: None, provider or "echo-device", "echo-form", versions={"echo": "1"})

    @classmethod
    def providers(cls):
        return ["echo-device"]


@pytest.fixture
def echo():
    register_backend(EchoBackend)
    yield EchoBackend
    BACKENDS._classes.pop("echo")


def test_the_agent_measures_a_registered_backend_through_the_registry(echo):
    assert "echo" in BACKENDS.agent_backends()
    assert device_description("echo")["providers"] == ["echo-device"]
    options = {"batch": 2, "threads": 1, "provider": None, **FAST}
    result = BackendResult.from_json(measure(AgentSettings(backend="echo"), b"echo", options))
    assert (result.provider, result.export_form, result.batch, result.versions) == (
        "echo-device", "echo-form", 2, {"echo": "1"})
    assert result.latency.runs >= FAST["min_runs"]
    assert profilers.profile(tiny(), backend="echo", **FAST).provider == "echo-device"


def test_an_agent_of_a_backend_without_payload_is_refused():
    with pytest.raises(ConfigError, match="backend"):
        device_description("remote")
    with pytest.raises(profilers.ProfileError, match="takes no|unexpected"):
        profilers.get_backend("onnxruntime", precision="fp16")
