"""The real `visearch` CLI with the `lite` model at a small input size, for the reliability tests.

Run as `python tests/e2e/fast_cli.py <visearch arguments>`. Everything is the real code path (Typer app, api, store,
decoding, the EfficientNet-Lite0 network with its real weights); only lite's [describe] settings are overridden to
one scale at 64 px, so a CPU extracts an image in milliseconds instead of about a second and the crash / resume
tests can afford many runs. The override is part of the store's provenance like any other configuration.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

FAST_DESCRIBE = {"scales": [1.0], "max_side": 64}
COMMAND = [sys.executable, str(Path(__file__).resolve())]


def cli_env(env: dict | None = None) -> dict:
    """Environment for CLI subprocesses: our weights dir, one thread each (tests run several processes at once on
    two cores), nothing inherited that changes the data dir."""
    out = {k: v for k, v in os.environ.items() if k not in ("VISEARCH_DATA_DIR", "VISEARCH_SHARD_ROWS")}
    out.update(VISEARCH_WEIGHTS_DIR=str(ROOT / "weights"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out.update(env or {})
    return out


def cli(*args, data=None, env=None, check=True, timeout=180, input=None) -> subprocess.CompletedProcess:
    """Run the fast CLI to completion; text stdout/stderr."""
    cmd = COMMAND + (["--data-dir", str(data)] if data is not None else []) + [str(a) for a in args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(env), timeout=timeout, input=input,
                       check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def popen(*args, data=None, env=None) -> subprocess.Popen:
    """Start the fast CLI in the background (stdout/stderr piped, text)."""
    cmd = COMMAND + (["--data-dir", str(data)] if data is not None else []) + [str(a) for a in args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(env))


def install() -> None:
    """Shrink lite's [describe] settings through the config hook (every load_model_config call sees it)."""
    from visearch import config

    def fast(cfg):
        if cfg.get("family") != "lite":
            return cfg
        side = int(os.environ.get("VISEARCH_TEST_MAX_SIDE", FAST_DESCRIBE["max_side"]))
        return config.merge(cfg, {"describe": dict(FAST_DESCRIBE, max_side=side)})

    config.add_hook(fast)


if __name__ == "__main__":
    install()
    from visearch.cli import main

    sys.argv[0] = "visearch"
    main()
