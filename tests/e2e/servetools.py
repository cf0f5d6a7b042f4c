"""A real `visearch serve` process on a free loopback port, over a tiny real collection described with the fast
lite settings of tests/e2e/fast_cli.py (the real network, 64 px). Import the fixtures into a test module:

    from tests.e2e.servetools import live_server, serve_collection  # noqa: F401
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.e2e.fast_cli import cli, popen
from tests.photos import cropped_copy, write_photos

PHOTOS = ["chelsea", "astronaut", "coffee", "rocket", "coins", "camera"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running server subprocess: `url`, `get`/`post` helpers, `stop()` returns (returncode, stderr)."""

    def __init__(self, args, data, env=None, host="127.0.0.1", command="serve"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = popen(command, *args, "--host", host, "--port", self.port, data=data, env=env)
        self._stderr = None

    def wait(self, headers=None, timeout=90.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.proc.stderr.read()}")
            try:
                r = requests.get(self.url + "/api/health", headers=headers, timeout=2)
                if r.status_code in (200, 401):
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not start in time")

    def stop(self, sig=signal.SIGINT, timeout=30) -> tuple[int, str]:
        if self._stderr is None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._stderr = self.proc.stderr.read()
        return self.proc.returncode, self._stderr


@pytest.fixture(scope="session")
def serve_collection(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    paths = write_photos(base / "photos", PHOTOS)
    queries = base / "queries"
    queries.mkdir()
    q = {"coffee-crop": cropped_copy(paths["coffee"], queries / "coffee crop.jpg", (0.1, 0.1, 0.85, 0.9)),
         "rocket": paths["rocket"]}
    data = base / "data"
    cli("convert", base / "photos", "--name", "shop", data=data)
    cli("-q", "extract", "shop", "--model", "lite", "--device", "cpu", data=data)
    return {"base": base, "photos": paths, "queries": q, "data": data}


@pytest.fixture(scope="session")
def live_server(serve_collection):
    env = {"OMP_NUM_THREADS": "2"} if (os.cpu_count() or 1) >= 2 else None
    srv = Server(["--dataset", "shop", "--model", "lite", "--device", "cpu", "--detector", "tiles"],
                 serve_collection["data"], env=env)
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()


def photo_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()
