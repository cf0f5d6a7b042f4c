"""Run the real `visearch` CLI in a subprocess (tests import this)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VISEARCH = [sys.executable, "-m", "visearch.cli"]


def run(*args, data_dir=None, input=None, env=None, check=True, timeout=300):
    """Run the real CLI; returns CompletedProcess with text stdout/stderr."""
    cmd = list(VISEARCH)
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    cmd += [str(a) for a in args]
    full_env = dict(os.environ, VISEARCH_WEIGHTS_DIR=str(ROOT / "weights"), **(env or {}))
    p = subprocess.run(cmd, input=input, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p




def sigkill(p: subprocess.Popen) -> None:
    """SIGKILL a child started with piped stdout/stderr, reap it and close its pipes."""
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p.stdout.close()
    p.stderr.close()
