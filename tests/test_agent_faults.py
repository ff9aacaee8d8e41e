"""The profiler agent under hostile or careless clients: idle sockets, planted paths, external data,
runaway measurements, YAML bombs, rebinding, odd zips; and the artifact cache under corruption."""

import asyncio
import json
import socket
import zipfile
from io import BytesIO
from pathlib import Path

import httpx
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.external_data_helper import set_external_data

import profilers
import profilers.server
from nas.cli import main
from nas.config import ConfigError
from profilers import PIPELINE_FILE, build_once, cached_onnx, export_coreml, onnx_cache_path, proto_messages
from profilers.remote import TOKEN_ENV
from profilers.server import MAX_ERROR_CHARS, OPTIONS, AgentSettings, PayloadError, create_app, measure, serve

from archs import tiny, tiny_moe

TOKEN = "fault-token-0123456789"
FAST = {"warmup": 1, "min_runs": 3, "min_time_s": 0.0}
OPTIONS_FAST = {"batch": 1, "threads": 1, "provider": None, **FAST}
ONNX = {"Content-Type": "application/onnx"}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(profilers.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def agent(start_agent):
    """An onnxruntime agent on loopback whose headers deadline is 1 s; its URL once it answers."""
    serve = "from profilers.server import serve; serve(port={}, max_upload_mb=1, timeout_s=60, header_timeout_s=1)"
    return start_agent(lambda port: ["-c", serve.format(port)], TOKEN).url


@pytest.fixture(scope="module")
def onnx_bytes(tmp_path_factory) -> bytes:
    return profilers.export_onnx(tiny(), tmp_path_factory.mktemp("onnx") / "m.onnx").read_bytes()


def asgi_post(app, path="/profile", **kwargs) -> httpx.Response:
    async def post():
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            return await client.post(path, **kwargs)

    return asyncio.run(post())


# ---------------------------------------------------------------- 6: idle and slow connections


@pytest.mark.slow
def test_idle_and_slow_sockets_do_not_starve_an_authenticated_client(agent, onnx_bytes):
    host, port = agent.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(20)]
    slow = socket.create_connection((host, int(port)))  # a body that never comes
    slow.sendall(b"POST /profile HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/onnx\r\n"
                 b"Content-Length: 100000\r\n\r\nxx")
    try:
        with httpx.Client(timeout=30, headers=AUTH) as client:
            for _ in range(3):
                assert client.get(f"{agent}/device").status_code == 200
            response = client.post(f"{agent}/profile", content=onnx_bytes, headers=ONNX, params=FAST)
            assert response.status_code == 200, response.text
        for sock in idle[:3]:  # and the agent drops the idle ones at its headers deadline
            sock.settimeout(30)
            assert sock.recv(1) == b""
    finally:
        for sock in [*idle, slow]:
            sock.close()


# ---------------------------------------------------------------- 7: Core ML package paths


@pytest.fixture(scope="module")
def coreml_program(tmp_path_factory) -> Path:
    return export_coreml(tiny(), tmp_path_factory.mktemp("coreml"), precision="fp32").programs["model"]


def coreml_body(program: Path, manifest_path: str = "com.apple.CoreML/model.mlmodel", weights: str = "") -> bytes:
    manifest = json.loads((program / "Manifest.json").read_text())
    root = manifest["rootModelIdentifier"]
    manifest["itemInfoEntries"][root]["path"] = manifest_path
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(PIPELINE_FILE, json.dumps({"form": "dense", "pipeline": ["model"], "arch": tiny().to_dict()}))
        archive.writestr("model.mlpackage/Manifest.json", json.dumps(manifest))
        for file in program.rglob("*"):
            if file.is_file() and file.name not in ("Manifest.json", "model.mlmodel"):
                archive.write(file, f"model.mlpackage/{file.relative_to(program).as_posix()}")
        archive.writestr("model.mlpackage/Data/com.apple.CoreML/model.mlmodel", spec_naming(program, weights))
    return buffer.getvalue()


def spec_naming(program: Path, weights: str) -> bytes:
    """The package's model spec, its weight file renamed to `weights`."""
    import coremltools as ct


    spec = ct.utils.load_spec(str(program))
    for blob in proto_messages(spec, "BlobFileValue"):
        blob.fileName = weights or blob.fileName
    return spec.SerializeToString()


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["absolute", "parent", "device"])
def test_a_manifest_path_outside_the_package_is_refused(coreml_program, tmp_path, planted):
    outside = tmp_path / "outside.mlmodel"  # a valid spec, so reading it would succeed
    outside.write_bytes((coreml_program / "Data/com.apple.CoreML/model.mlmodel").read_bytes())
    path = {"absolute": str(outside), "parent": f"../../../../../../../../../..{outside}", "device": "/dev/null"}
    settings = AgentSettings(backend="coreml")
    assert "latency_ms" in measure(settings, coreml_body(coreml_program), OPTIONS_FAST)  # the untouched package
    with pytest.raises(PayloadError, match="Manifest.json"):
        measure(settings, coreml_body(coreml_program, path[planted]), OPTIONS_FAST)
    with pytest.raises(PayloadError, match="weight file"):
        measure(settings, coreml_body(coreml_program, weights=f"@model_path/{path[planted]}"), OPTIONS_FAST)


# ---------------------------------------------------------------- 8: ONNX external data anywhere


def external(tensor, location="weights.bin"):
    set_external_data(tensor, location=location)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    return tensor


def io(name: str):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])


def function_subgraph_model() -> bytes:
    """External data in an initializer of a subgraph of a model-local function."""
    weight = external(helper.make_tensor("w", TensorProto.FLOAT, [1, 4], bytes(16), raw=True))
    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["b"])], "branch", [], [io("b")], [weight])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["c"], ["b"], then_branch=branch, else_branch=branch),
        helper.make_node("Add", ["x", "b"], ["y"]),
    ]
    function = helper.make_function("local", "F", ["x"], ["y"], nodes, [helper.make_opsetid("", 18)])
    graph = helper.make_graph([helper.make_node("F", ["x"], ["z"], domain="local")], "g", [io("x")], [io("z")])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, functions=[function], opset_imports=opsets, ir_version=9).SerializeToString()


def sparse_initializer_model() -> bytes:
    """External data in the values of a sparse initializer."""
    values = external(helper.make_tensor("s", TensorProto.FLOAT, [2], bytes(8), raw=True))
    indices = helper.make_tensor("s_indices", TensorProto.INT64, [2], [0, 1])
    sparse = helper.make_sparse_tensor(values, indices, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "s"], ["z"])], "g", [io("x")], [io("z")],
                              sparse_initializer=[sparse])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString()


@pytest.mark.parametrize("model", [function_subgraph_model, sparse_initializer_model])
def test_external_data_anywhere_in_an_onnx_model_is_refused(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("weights.bin").write_bytes(bytes(64))  # in the working directory: a lax agent would read it
    with pytest.raises(PayloadError, match="external data"):
        measure(AgentSettings(), model(), OPTIONS_FAST)


# ---------------------------------------------------------------- 9: bounded measurements


@pytest.mark.slow
def test_a_running_measurement_is_stopped_at_the_timeout(onnx_bytes):
    app = create_app(AgentSettings(timeout_s=8))
    endless = {"warmup": 0, "min_runs": 1, "min_time_s": 60}  # far past the timeout
    response = asgi_post(app, content=onnx_bytes, headers=ONNX, params=endless)
    assert response.status_code == 504 and "8 s" in response.json()["error"]
    response = asgi_post(app, content=onnx_bytes, headers=ONNX, params=FAST)  # the worker is free again
    assert response.status_code == 200, response.text


@pytest.mark.slow
@pytest.mark.parametrize("knob", ["warmup", "min_runs", "min_time_s", "batch", "threads"])
def test_every_knob_over_its_cap_is_a_400_naming_it(agent, onnx_bytes, knob):
    over = OPTIONS[knob][2] * 2 + 1
    response = httpx.post(f"{agent}/profile", content=onnx_bytes, headers={**ONNX, **AUTH}, params={knob: over})
    assert response.status_code == 400 and knob in response.json()["error"]


@pytest.mark.parametrize("cfg, batch, message", [
    (tiny(image_size=1024, patch_size=32), 128, "input"),  # 128 Mi input elements
    (tiny(image_size=512, patch_size=4), 1, "input"),  # 16k tokens: 512 Mi attention scores per image
    (tiny(depth=64, width=512, heads=8), 1, "size limit"),  # 200M weights
])
def test_an_architecture_too_big_for_the_agent_is_refused_before_it_is_built(cfg, batch, message):
    with pytest.raises(PayloadError, match=message):
        measure(AgentSettings(backend="torch"), cfg.to_yaml().encode(), {**OPTIONS_FAST, "batch": batch})


# ---------------------------------------------------------------- 10: YAML aliases


BOMB = b"""a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: [*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""


def test_a_yaml_alias_bomb_is_refused_with_a_short_message():
    with pytest.raises(PayloadError, match="alias") as refused:
        measure(AgentSettings(backend="torch"), BOMB, OPTIONS_FAST)
    assert len(str(refused.value)) < MAX_ERROR_CHARS


@pytest.mark.slow
def test_error_messages_are_capped():
    long_yaml = ("image_size: " + "9" * 20000).encode()  # a message quoting the value would be as long
    response = asgi_post(create_app(AgentSettings(backend="torch")), content=long_yaml,
                         headers={"Content-Type": "application/yaml"})
    assert response.status_code == 400 and len(response.json()["error"]) <= MAX_ERROR_CHARS


# ---------------------------------------------------------------- 11: token, Host, odd zips, 500s


@pytest.mark.slow
def test_a_foreign_host_header_is_refused_on_loopback(onnx_bytes):
    app = create_app(AgentSettings())
    for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example"):
        response = asgi_post(app, content=onnx_bytes, headers={**ONNX, "Host": host}, params=FAST)
        assert response.status_code == 421 and "Host" in response.json()["error"]


def test_the_token_is_mandatory_unless_explicitly_waived(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: started.append(kwargs))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match="token"):
        serve()
    serve(insecure_no_token=True)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    serve(token_file=token_file)
    assert len(started) == 2
    with pytest.raises(ConfigError, match="token"):
        serve(host="0.0.0.0", insecure_no_token=True)  # off loopback, never


def test_cli_takes_the_token_from_a_file_never_the_command_line(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(profilers.server, "serve", lambda **kwargs: seen.update(kwargs))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    assert main(["profiler-server", "--token-file", str(token_file)]) == 0
    assert seen["token_file"] == str(token_file) and not seen["insecure_no_token"]
    with pytest.raises(SystemExit):
        main(["profiler-server", "--token", TOKEN])
    assert "--token" in capsys.readouterr().err


@pytest.mark.slow
def test_a_zip_with_a_file_and_a_folder_of_one_name_is_a_400_without_paths():
    spec = json.dumps({"form": "dense", "pipeline": ["model"], "arch": tiny().to_dict()})
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(PIPELINE_FILE, spec)
        archive.writestr("model.mlpackage/Data", b"a file")
        archive.writestr("model.mlpackage/Data/x", b"and a folder")
        archive.writestr("model.mlpackage/Manifest.json", b"{}")
    response = asgi_post(create_app(AgentSettings(backend="coreml")), content=buffer.getvalue(),
                         headers={"Content-Type": "application/zip"})
    assert response.status_code == 400 and "Data" in response.json()["error"]
    assert "/tmp" not in response.text and "/var" not in response.text


def test_an_internal_error_names_no_path():
    def broken(settings, body, options, deadline):
        raise OSError(f"[Errno 28] No space left on device: '{Path.cwd() / 'secret'}'")

    response = asgi_post(create_app(AgentSettings(), run=broken), content=b"x", headers=ONNX)
    assert response.status_code == 500 and str(Path.cwd()) not in response.text and "secret" not in response.text


# ---------------------------------------------------------------- 14: the artifact cache


@pytest.mark.slow
def test_a_corrupt_cached_onnx_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv(profilers.CACHE_ENV, str(tmp_path))
    path = cached_onnx(tiny_moe())
    path.write_bytes(b"truncated")
    assert cached_onnx(tiny_moe()) == path
    onnx.checker.check_model(str(path))


def test_the_cache_key_follows_the_exporters_versions(monkeypatch):
    cfg = tiny()
    before = onnx_cache_path(cfg)
    assert cfg.config_hash() in before.name
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    assert onnx_cache_path(cfg) != before
    monkeypatch.undo()
    monkeypatch.setattr(onnx, "__version__", "0.0.0+other")
    assert onnx_cache_path(cfg) != before


def test_temporary_names_are_unique_within_a_process(tmp_path):
    names = []
    for index in range(2):
        build_once(tmp_path / f"{index}" / "a.onnx", lambda p: (names.append(p.name), p.write_text("ok")))
    assert names[0] != names[1] and all(name.endswith("a.onnx") for name in names)
