"""The profiler agent at its limits (issue 22, items 15, 16): more clients than its queue takes, no file
descriptors left, a zip nested 1,500 deep. Each is a short log line and an answer the client acts on."""

import asyncio
import errno
import json
import logging
import zipfile
from io import BytesIO

import httpx
import pytest

from profilers import PIPELINE_FILE, ProfilerBusy
from profilers.remote import AgentClient
from profilers.server import AgentSettings, create_app, quiet_descriptor_errors

from archs import tiny


def post(app, content: bytes, content_type: str) -> httpx.Response:
    async def send():
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            return await client.post("/profile", content=content, headers={"Content-Type": content_type})

    return asyncio.run(send())


def test_a_busy_agent_is_waited_for_beyond_the_connection_retries(monkeypatch):
    """12 clients, 8 queue places: a client turned away 4 times (its connection retries) got ProfilerUnreachable
    after 5.7 s while the agent was up, and in a search that ended the study."""
    answers = [httpx.Response(503, json={"error": "8 requests are already pending: retry later"})] * 6
    answers.append(httpx.Response(200, json={"backend": "onnxruntime"}))
    monkeypatch.setattr(httpx, "request", lambda *args, **kwargs: answers.pop(0))
    assert AgentClient("http://127.0.0.1:1", retries=3, backoff_s=0.01).device() == {"backend": "onnxruntime"}
    assert not answers


def test_an_agent_busy_past_the_stated_limit_is_busy_never_unreachable(monkeypatch):
    busy = httpx.Response(503, json={"error": "8 requests are already pending: retry later"})
    monkeypatch.setattr(httpx, "request", lambda *args, **kwargs: busy)
    with pytest.raises(ProfilerBusy, match=r"stayed busy for 0.2 s .*8 requests are already pending"):
        AgentClient("http://127.0.0.1:1", backoff_s=0.01, busy_wait_s=0.2).device()


def test_out_of_file_descriptors_is_a_429_and_one_log_line(caplog):
    def no_descriptors(settings, body, options, deadline):
        raise OSError(errno.EMFILE, "Too many open files")

    caplog.set_level(logging.WARNING, logger="vmoe_nas.agent")
    response = post(create_app(AgentSettings(), run=no_descriptors), b"x", "application/onnx")
    assert response.status_code == 429 and "out of file descriptors" in response.json()["error"]
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is None
    caplog.clear()
    loop = asyncio.new_event_loop()
    try:  # what asyncio reports when accept() fails at the open-file limit: it was a traceback a second
        quiet_descriptor_errors(loop, {"message": "socket.accept() out of system resource",
                                       "exception": OSError(errno.EMFILE, "Too many open files")})
    finally:
        loop.close()
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is None
    assert "cannot accept a connection: out of file descriptors" in caplog.text


@pytest.mark.slow
def test_a_zip_entry_nested_1500_deep_is_a_400():
    """It was a 500 RecursionError and some 7,000 log lines."""
    spec = json.dumps({"form": "dense", "pipeline": ["model"], "arch": tiny().to_dict()})
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(PIPELINE_FILE, spec)
        archive.writestr("model.mlpackage/" + "d/" * 1500 + "x", b"deep")
        archive.writestr("model.mlpackage/Manifest.json", b"{}")
    response = post(create_app(AgentSettings(backend="coreml")), buffer.getvalue(), "application/zip")
    assert response.status_code == 400 and "is nested 1502 deep, more than 32" in response.json()["error"]
