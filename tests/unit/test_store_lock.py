"""The store's writer lock lives and dies with the process that took it (issue 10 item 2), and worker processes
started with visearch.workers.worker_init die with their parent."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from visearch.errors import StoreError
from visearch.store import Store, StoreWriter

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _fds(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []


def _link(pid: int, fd: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _run_then_kill(tmp_path: Path, body: str) -> int:
    """Run `body` in a fresh interpreter (it prints a child's pid, then waits); SIGKILL it; return the child pid."""
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(body))
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "store")], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    child = int(p.stdout.readline())
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    p.stdout.close()
    return child


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_does_not_keep_the_writer_lock(tmp_path):
    Store.create(tmp_path / "store", model="m", config={}, dim=4, weights_sha256=None)
    child = _run_then_kill(tmp_path, """
        import os, sys, time
        from visearch.store import Store, StoreWriter
        w = StoreWriter(Store.open(sys.argv[1]))
        pid = os.fork()
        if pid == 0:          # a plain forked child (no parent-death signal): it outlives the SIGKILLed parent
            time.sleep(60)
            os._exit(0)
        print(pid, flush=True)
        time.sleep(60)
    """)
    try:
        # the child drops its reference first thing after the fork (on a loaded machine that may be just after the
        # parent printed its pid): wait for that, at most a few seconds
        lock = str((tmp_path / "store" / ".lock").resolve())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_link(child, fd) == lock for fd in _fds(child)):
            time.sleep(0.01)
        assert _alive(child)
        # the parent is dead, its forked child alive: the lock is free (it used to stay with the child)
        with StoreWriter(Store.open(tmp_path / "store")) as w:
            w.append(["a"], _features())
        assert len(Store.open(tmp_path / "store")) == 1
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_second_writer_is_still_refused(tmp_path):
    Store.create(tmp_path / "store", model="m", config={}, dim=4, weights_sha256=None)
    with StoreWriter(Store.open(tmp_path / "store")):
        with pytest.raises(StoreError, match="another process is writing"):
            StoreWriter(Store.open(tmp_path / "store"))
    StoreWriter(Store.open(tmp_path / "store")).close()  # released on close


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl PR_SET_PDEATHSIG is Linux only")
def test_worker_init_makes_a_worker_die_with_its_parent(tmp_path):
    child = _run_then_kill(tmp_path, """
        import multiprocessing as mp, os, time
        from visearch.workers import worker_init

        def work(init):
            init(0)
            time.sleep(60)

        if __name__ == "__main__":
            p = mp.get_context("fork").Process(target=work, args=(worker_init(),))
            p.start()
            time.sleep(0.3)   # the child has run its init
            print(p.pid, flush=True)
            time.sleep(60)
    """)
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the worker outlived its SIGKILLed parent"


def _features():
    from visearch.models.base import Features

    g = np.ones((1, 4), np.float32) / 2
    return Features(g, None)
