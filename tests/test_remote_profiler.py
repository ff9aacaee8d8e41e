"""The remote profiler: an agent on loopback in a subprocess, the `remote` backend that talks to it,
and the agent's validation of what it is sent."""

import asyncio
import io
import json
import os
import time
import zipfile
from pathlib import Path

import httpx
import onnx
import pytest
from agents import free_port
from onnx import TensorProto, helper

import profilers
import profilers.server
from nas.cli import main
from nas.config import ConfigError
from profilers import (
    PIPELINE_FILE,
    CoreMLExport,
    ProfileError,
    ProfilerUnreachable,
    RemoteBackend,
    RemoteProfilerError,
    coreml_zip,
    get_backend,
    unpack_coreml,
)
from profilers.remote import TOKEN_ENV
from profilers.server import AgentSettings, PayloadError, create_app, is_loopback, measure, serve

from archs import tiny, tiny_moe

TOKEN = "test-token-0123456789"
FAST = {"warmup": 1, "min_runs": 3, "min_time_s": 0.0}  # the protocol, cut to a few runs: tests check fields
ONNX = {"Content-Type": "application/onnx"}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(profilers.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "cache"))  # shared: exports once


@pytest.fixture(scope="module")
def agent(start_agent):
    """An agent with a token and a 1 MiB upload limit, on loopback in its own process."""
    return start_agent(lambda port: ["-m", "nas.cli", "profiler-server", "--port", str(port), "--max-upload-mb", "1"],
                       TOKEN)


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def onnx_bytes() -> bytes:
    return profilers.cached_onnx(tiny_moe()).read_bytes()  # the export the first test made


@pytest.mark.slow
def test_remote_profile_has_the_fields_of_a_local_one(agent, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    cfg = tiny_moe()
    local = profilers.profile(cfg, **FAST).to_dict()  # exports while the agent starts
    url = agent.url
    remote = profilers.profile(cfg, backend="remote", remote_url=url, **FAST).to_dict()
    assert remote.keys() == local.keys()
    for key in ("config_hash", "params_total", "params_active", "flops", "size_bytes_fp32", "export_form", "threads"):
        assert remote[key] == local[key], key
    assert remote["latency_ms"].keys() == local["latency_ms"].keys()
    assert remote["latency_ms"]["runs"] >= FAST["min_runs"] and remote["latency_ms"]["median"] > 0
    assert remote["backend"] == "remote" and remote["provider"] == "CPUExecutionProvider"
    device = remote["device"]  # where it was measured: the agent's machine and URL
    assert device["remote_url"] == url and device["backend"] == "onnxruntime"
    assert "CPUExecutionProvider" in device["providers"] and device["versions"]["onnxruntime"]
    assert {"cpu", "cores", "os", "hostname"} <= device.keys()
    assert isinstance(get_backend("remote", remote_url=url), RemoteBackend)


@pytest.mark.slow
def test_cli_profile_with_remote_url(agent, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    arch = tiny_moe().save(tmp_path / "arch.yaml")  # the first test's architecture: its export is cached
    assert main(["profile", str(arch), "--backend", "remote", "--remote-url", agent.url, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"]["remote_url"] == agent.url and result["latency_ms"]["median"] > 0
    assert main(["profile", str(arch), "--remote-url", agent.url]) == 2
    assert "--backend remote" in capsys.readouterr().err


@pytest.mark.slow
def test_token_is_required_when_set(agent, onnx_bytes, monkeypatch):
    url = agent.url
    for headers in ({}, auth("wrong"), {"Authorization": TOKEN}):
        assert httpx.get(f"{url}/device", headers=headers).status_code == 401
        response = httpx.post(f"{url}/profile", content=onnx_bytes, headers={**ONNX, **headers})
        assert response.status_code == 401 and "token" in response.json()["error"]
    monkeypatch.setenv(TOKEN_ENV, "wrong")
    with pytest.raises(RemoteProfilerError, match=f"401.*{TOKEN_ENV}"):
        profilers.profile(tiny(), backend="remote", remote_url=url, **FAST)


def two_input_model() -> bytes:
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in "xy")
    out = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "add", [x, y], [out])
    return helper.make_model(graph).SerializeToString()


def external_data_model() -> bytes:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], bytes(16), raw=True)
    onnx.external_data_helper.set_external_data(weight, location="../../../etc/passwd")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["z"])], "add", [x],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])], [weight])
    return helper.make_model(graph).SerializeToString()


@pytest.mark.slow
@pytest.mark.parametrize("body, headers, params, status, message", [
    pytest.param(os.urandom(3 * 2**20), ONNX, {}, 413, "limit", id="oversized"),
    pytest.param(b"\x08\x07garbage" * 100, ONNX, {}, 400, "not a valid ONNX", id="garbage"),
    pytest.param(two_input_model(), ONNX, {}, 400, "one float input", id="two-inputs"),
    pytest.param(external_data_model(), ONNX, {}, 400, "external data", id="external-data"),
    pytest.param(b"print('hi')", {"Content-Type": "application/python-pickle"}, {}, 415, "application/onnx",
                 id="not-onnx"),
    pytest.param(None, ONNX, {"batch": "0"}, 400, "batch", id="batch-0"),
    pytest.param(None, ONNX, {"threads": "many"}, 400, "threads", id="threads-nan"),
    pytest.param(None, ONNX, {"evil": "1"}, 400, "unknown option", id="unknown-option"),
    pytest.param(None, ONNX, {"provider": "NoSuchExecutionProvider"}, 422, "provider", id="no-provider"),
])
def test_bad_requests_get_4xx_and_the_agent_keeps_serving(agent, onnx_bytes, body, headers, params, status, message):
    response = httpx.post(f"{agent.url}/profile", content=onnx_bytes if body is None else body,
                          headers={**headers, **auth()}, params={**FAST, **params})
    assert response.status_code == status and message in response.json()["error"]
    response = httpx.post(f"{agent.url}/profile", content=onnx_bytes, headers={**ONNX, **auth()}, params=FAST)
    assert response.status_code == 200 and response.json()["latency_ms"]["runs"] >= FAST["min_runs"]


def test_unreachable_agent_is_one_clear_error():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ProfilerUnreachable, match=f"agent at {url} is unreachable.*2 attempts"):
        profilers.profile(tiny(), backend="remote", remote_url=url, retries=1, **FAST)
    with pytest.raises(ProfileError, match="remote_url"):
        get_backend("remote")


def test_agent_refuses_to_listen_off_loopback_without_a_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match="token"):
        serve(host="0.0.0.0")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("phone.local")


@pytest.mark.slow
def test_measurement_past_the_timeout_is_a_504(onnx_bytes):
    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(create_app(AgentSettings(timeout_s=0.2)))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            slow = {"warmup": 0, "min_runs": 1, "min_time_s": 2.0}
            return await client.post("/profile", content=onnx_bytes, headers=ONNX, params=slow)

    response = asyncio.run(post())
    assert response.status_code == 504 and "0.2 s" in response.json()["error"]


def test_measurements_run_one_at_a_time(monkeypatch):
    active, most = [0], [0]

    def fake_measure(settings, body, options, deadline):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.05)  # long enough for the other requests to arrive while this one runs
        active[0] -= 1
        return {"latency_ms": None}

    async def post_many() -> list[httpx.Response]:
        transport = httpx.ASGITransport(create_app(AgentSettings(), run=fake_measure))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await asyncio.gather(*(client.post("/profile", content=b"model", headers=ONNX) for _ in range(4)))

    assert [r.status_code for r in asyncio.run(post_many())] == [200] * 4
    assert most[0] == 1


def test_torch_agent_builds_the_architecture_from_yaml_only():
    options = {"batch": 1, "threads": 1, "provider": None, **FAST}
    torch_agent = AgentSettings(backend="torch")
    result = measure(torch_agent, tiny_moe().to_yaml().encode(), options)
    assert result["latency_ms"]["runs"] >= FAST["min_runs"] and result["export_form"] == "per_image:gather"
    with pytest.raises(PayloadError, match="not a valid architecture"):
        measure(torch_agent, b"!!python/object/apply:os.system ['true']", options)
    huge = tiny(depth=48, width=4096, heads=8).to_yaml().encode()  # ~6 billion weights: never built
    with pytest.raises(PayloadError, match="size limit"):
        measure(torch_agent, huge, options)


def zip_of(entries: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            if name in symlinks:
                info.external_attr = 0o120777 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def test_coreml_payload_round_trips_and_hostile_zips_are_refused(tmp_path):
    program = tmp_path / "model.mlpackage"
    (program / "Data").mkdir(parents=True)
    (program / "Manifest.json").write_text("{}")
    (program / "Data" / "weights.bin").write_bytes(b"\0" * 64)
    body = coreml_zip(CoreMLExport("dense", {"model": program}), tiny().to_dict())
    exported, arch = unpack_coreml(body, tmp_path / "out", 2**20)
    assert exported.pipeline == ("model",) and arch == tiny()
    assert (exported.programs["model"] / "Data" / "weights.bin").read_bytes() == b"\0" * 64

    spec = json.dumps({"form": "dense", "pipeline": ["model"], "arch": tiny().to_dict()}).encode()
    good = {PIPELINE_FILE: spec, "model.mlpackage/Manifest.json": b"{}"}
    hostile = [
        ({**good, "../evil.txt": b"x"}, (), "not allowed"),
        ({**good, "/etc/evil": b"x"}, (), "not allowed"),
        ({**good, "model.mlpackage/link": b"/etc/passwd"}, ("model.mlpackage/link",), "not allowed"),
        ({**good, "run.py": b"import os"}, (), "not allowed"),
        ({**good, "model.mlpackage/big.bin": b"\0" * 4096}, (), "unpacks to more"),
        ({PIPELINE_FILE: b"{", "model.mlpackage/Manifest.json": b"{}"}, (), "malformed"),
        ({PIPELINE_FILE: spec.replace(b'"model"', b'"../x"')}, (), "program names"),
        ({PIPELINE_FILE: spec}, (), "Manifest.json"),
    ]
    for index, (entries, links, message) in enumerate(hostile):
        with pytest.raises(PayloadError, match=message):
            unpack_coreml(zip_of(entries, links), tmp_path / f"bad{index}", 2048)
    with pytest.raises(PayloadError, match="not a zip"):
        unpack_coreml(b"PK-not-really", tmp_path / "junk", 2048)
    assert not any(Path(tmp_path).glob("**/evil*"))


@pytest.mark.slow
def test_study_with_the_remote_backend_completes(agent, tmp_path, monkeypatch):
    from nas.search import run_search
    from nas.study import ProfilerSpec, load_study_config

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    cfg = load_study_config("smoke", n_trials=2, results_dir=str(tmp_path))
    cfg.profiler = ProfilerSpec(backend="remote", remote_url=agent.url)
    cfg.data.limit, cfg.evaluator = 300, {"steps": 6, "batch_size": 32, "eval_every": 3}  # the profile is on test
    from nas import record as records

    trials = records.read_all(run_search(cfg, progress=False))
    assert len(trials) == 2 and all(t.status == "complete" for t in trials)
    for trial in trials:
        assert trial.profile.device["remote_url"] == agent.url
        assert trial.metrics.latency_device.endswith(f"(agent {agent.url})")
        assert trial.metrics.latency_ms > 0


def test_study_with_an_absent_agent_is_one_clear_error(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = main(["search", "--config", "smoke", "--n-trials", "2", "--results-dir", str(tmp_path),
                 "--backend", "remote", "--remote-url", url])
    assert code == 2
    assert f"agent at {url} is unreachable" in capsys.readouterr().err
    assert not list(tmp_path.rglob("study.db"))  # checked before any storage or trial is made


@pytest.mark.slow
def test_agent_lost_mid_study_stops_it_and_the_rerun_retries_the_trial(agent, tmp_path, monkeypatch):
    from nas import record as records
    from nas.search import run_search
    from nas.storage import load_study
    from nas.study import ProfilerSpec, load_study_config
    from profilers.remote import AgentClient

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    cfg = load_study_config("smoke", n_trials=3, results_dir=str(tmp_path))
    cfg.profiler = ProfilerSpec(backend="remote", remote_url=agent.url)
    cfg.data.limit, cfg.evaluator = 300, {"steps": 6, "batch_size": 32, "eval_every": 3}
    answered = AgentClient.profile

    def gone_after_one(self, *args, **kwargs):
        if gone_after_one.calls:
            raise ProfilerUnreachable(f"profiler agent at {self.url} is unreachable (test)")
        gone_after_one.calls += 1
        return answered(self, *args, **kwargs)

    gone_after_one.calls = 0
    monkeypatch.setattr(AgentClient, "profile", gone_after_one)
    with pytest.raises(ProfilerUnreachable):
        run_search(cfg, progress=False)
    first = records.read_all(load_study(cfg.study_name, results_dir=cfg.results_dir))
    assert [t.state.name for t in first] == ["COMPLETE", "FAIL", "WAITING"]  # the last slot is still queued
    assert first[1].interrupted and "run again when the study resumes" in first[1].reason

    monkeypatch.setattr(AgentClient, "profile", answered)
    trials = run_search(cfg, progress=False).get_trials()
    assert [t.state.name for t in trials].count("FAIL") == 1  # only the interrupted one
    assert len([t for t in trials if t.state.name != "FAIL"]) == 3
