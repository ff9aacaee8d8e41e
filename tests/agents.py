"""A profiler agent in its own process, for the tests that talk to one over loopback (`start_agent` in
conftest.py starts and stops them)."""

import functools
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """A profiler agent process on loopback; `url` waits until it answers, so a test can do local work while
    it starts."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path, token: str):
        self.process, self._url, self.log, self.token = process, url, log, token

    @functools.cached_property
    def url(self) -> str:
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, f"the agent exited: {self.log.read_text()[-2000:]}"
            try:
                response = httpx.get(f"{self._url}/device", headers={"Authorization": f"Bearer {self.token}"})
                if response.status_code == 200:
                    return self._url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the agent did not answer within 60 s"
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
