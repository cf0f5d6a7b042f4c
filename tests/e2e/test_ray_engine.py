"""Issue 14.3: `extract --engine ray` on a real local Ray instance (2 CPUs, started once for the module).

(a) the ray engine's store equals the local engine's (same ids in the same order, global and local arrays bit for bit,
same failures with the same messages) for `lite` and `lite-sv`, first run and an incremental one; (b) a ray extract
SIGKILLed after its first shard leaves no process behind (its own Ray instance included) and nothing holding the
store lock, and a rerun (connecting with --address to a running cluster) ends with the store of an uninterrupted
run; (c) without ray installed, `--engine ray` is one line and a non-zero exit; flags of the other engine are refused.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.fast_cli import cli, cli_env, popen
from tests.e2e.test_worker_crash import _alive, _committed, _lock_holders
from tests.photos import PHOTO_NAMES, photo_array, write_photos
from visearch import api
from visearch.pipeline.extract import LocalEngine
from visearch.store import Store

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'visearch[ray]'; make test "
                                        "installs it)")
pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module (Ray's start-up costs seconds); its GCS address for --address."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _snapshot(path: Path) -> dict:
    with Store.open(path) as s:
        rows = np.arange(len(s))
        return {"ids": list(s.ids), "live": s.live.tolist(), "shards": [x.rows for x in s.shards],
                "global": s.read_global(rows).tobytes(),
                "local": {k: v.tobytes() for k, v in (s.read_local(rows) if s.local_fields else {}).items()}}


def _truncate(path: Path) -> None:
    """Keep the JPEG header (the plan reads the size) but cut the data: decoding fails in the engine."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("model", ["lite", "lite-sv"])
def test_ray_store_equals_local_store(ray_address, tmp_path, model):
    photos = tmp_path / "photos"
    write_photos(photos, PHOTO_NAMES[:7])
    local, remote = tmp_path / "local", tmp_path / "ray"
    ws = api.Workspace.resolve(local, ROOT / "weights", "cpu")
    api.convert(photos, "demo", workspace=ws)
    broken = sorted((local / "demo" / "jpg").glob("coffee*.jpg"))[0]
    _truncate(broken)
    shutil.copytree(local, remote)  # copy2 keeps mtimes: same fingerprints in both
    engine = api.RayEngine()  # uses the module's Ray instance as it is (already initialised)

    def both():
        a = api.extract("demo", model, batch_size=2, workspace=ws, engine=LocalEngine())
        b = api.extract("demo", model, batch_size=2, workspace=ws.with_(data_dir=remote), engine=engine)
        return a, b

    def same_failures(a, b):  # the same images, the same messages (each naming its own dataset's path)
        return a.failed == [(i, m.replace(str(remote), str(local))) for i, m in b.failed]

    a, b = both()
    assert a.added == b.added == 6 and len(a.failed) == 1 and same_failures(a, b), (a, b)
    assert a.failed[0][0] == broken.stem and str(broken) in a.failed[0][1]
    assert str(remote / "demo" / "jpg" / broken.name) in b.failed[0][1]
    sa, sb = _snapshot(a.store), _snapshot(b.store)
    assert sa["ids"] == sb["ids"] and sa["global"] == sb["global"]
    assert sa["local"] == sb["local"] and (model == "lite") == (not sa["local"])

    if model != "lite":
        return  # the incremental run once is enough: it exercises the plan, not the model
    # incremental: one image deleted, one added; the remote dataset gets the same files (and mtimes), keeps its store
    (photos / f"{PHOTO_NAMES[0]}.jpg").unlink()
    write_photos(photos, [PHOTO_NAMES[7]])
    api.convert(photos, "demo", workspace=ws)
    kept = tmp_path / "kept"
    shutil.move(remote / "demo" / "features", kept)
    shutil.rmtree(remote / "demo")
    shutil.copytree(local / "demo", remote / "demo", ignore=shutil.ignore_patterns("features"))
    shutil.move(kept, remote / "demo" / "features")
    a, b = both()
    assert (a.added, a.removed) == (b.added, b.removed) == (1, 1) and same_failures(a, b), (a, b)
    assert _snapshot(a.store) == _snapshot(b.store)


def test_an_error_raised_in_an_actor_reaches_the_caller_as_itself(ray_address, tmp_path):
    from visearch.errors import ModelError
    from visearch.registry import load_model

    write_photos(tmp_path / "photos", PHOTO_NAMES[:2])
    ws = api.Workspace.resolve(tmp_path / "data", ROOT / "weights", "cpu")
    api.convert(tmp_path / "photos", "demo", workspace=ws)
    describer = load_model("lite", device="cpu")

    def extract(self, images):
        raise ModelError("the model broke", "on purpose")

    describer.__class__ = type("Broken", (type(describer),), {"extract": extract})  # shipped to the actor by value
    with pytest.raises(ModelError) as e:
        api.extract("demo", "lite", workspace=ws, describer=describer, engine=api.RayEngine(num_workers=1))
    assert (e.value.message, e.value.hint) == ("the model broke", "on purpose")
    with Store.open(ws.data_dir / "demo" / "features" / "lite") as s:
        assert len(s) == 0  # nothing committed


def _collection(folder: Path) -> int:
    """48 distinct small JPEGs (16 photos at 3 sizes)."""
    folder.mkdir(parents=True)
    for name in PHOTO_NAMES:
        img = Image.fromarray(photo_array(name, 160))
        for side in (64, 80, 96):
            s = side / max(img.size)
            img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC).save(
                folder / f"{name}_{side}.jpg", quality=90)
    return 3 * len(PHOTO_NAMES)


def _descendants(pid: int) -> list[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        out += kids
        frontier = kids
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_killed_ray_extract_leaves_nothing_behind_and_resumes(ray_address, tmp_path):
    n = _collection(tmp_path / "photos")
    clean, data = tmp_path / "clean", tmp_path / "data"
    cli("-q", "convert", tmp_path / "photos", "--name", "big", data=clean)
    shutil.copytree(clean, data)
    env = {"VISEARCH_SHARD_ROWS": "4"}
    args = ("-q", "extract", "big", "--batch-size", "2", "--json")
    r = json.loads(cli(*args, data=clean, env=env).stdout)  # uninterrupted, local engine
    assert r["added"] == n
    reference = _snapshot(clean / "big" / "features" / "lite")
    store = data / "big" / "features" / "lite"

    # killed: a second driver on the module's running cluster (--address), as on a real cluster
    p = popen(*args, "--engine", "ray", "--num-workers", "2", "--address", ray_address, data=data, env=env)
    deadline = time.monotonic() + 120
    while p.poll() is None and _committed(store) < 1 and time.monotonic() < deadline:
        time.sleep(0.002)
    actors = _actors()
    assert p.poll() is None, f"finished (or failed) before it could be killed: {p.stderr.read()}"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    p.stdout.close()
    p.stderr.close()
    with Store.open(store) as s:
        done = len(s)  # rows committed before the kill
    assert 1 <= done < n, done
    assert len(actors) == 2, actors  # the model actors of the killed run (in the cluster, not children of it)
    assert not _lock_holders(store / ".lock"), "a process still holds the store lock after the kill"
    t_kill = time.monotonic()
    while any(_alive(q) for q in actors) and time.monotonic() < t_kill + 30:  # the cluster ends a dead driver's job
        time.sleep(0.1)
    left = [q for q in actors if _alive(q)]
    assert not left, f"actors of the killed run still alive 30 s after the kill: {left}"

    # resumed by a run with its own local Ray instance (the default), which it shuts down when done
    p = popen(*args, "--engine", "ray", data=data, env=env)
    procs: list[int] = []
    while p.poll() is None:
        procs = sorted(set(procs) | set(_descendants(p.pid)))
        time.sleep(0.05)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    r = json.loads(out)  # stdout carries the report only (Ray logs to stderr)
    assert r["failed"] == [] and r["removed"] == 0 and r["added"] == n - done, r
    assert _snapshot(store) == reference
    assert len(procs) >= 3, procs  # Ray's own processes (gcs_server, raylet, ...) and the actors ran
    t = time.monotonic()
    while any(_alive(q) for q in procs) and time.monotonic() < t + 30:
        time.sleep(0.1)
    left = [(q, _name(q)) for q in procs if _alive(q)]
    _kill_all(q for q, _ in left)  # never leave them behind, even when failing
    assert not left, f"processes of the Ray instance still alive 30 s after the run: {left}"


def _actors() -> list[int]:
    """Processes of Ray Data model actors (named after _Describe) now running on this machine."""
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and "MapBatches(_Describe)" in _name(int(d))]


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        return ""


def _kill_all(pids) -> None:
    for q in pids:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_without_ray_one_line_and_other_engines_flags_refused(tmp_path):
    write_photos(tmp_path / "photos", PHOTO_NAMES[:2])
    cli("-q", "convert", tmp_path / "photos", "--name", "demo", data=tmp_path / "data")
    hide = ("import sys; sys.modules['ray'] = None; sys.argv = ['visearch'] + sys.argv[1:]; "
            "from visearch.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", hide, "--data-dir", str(tmp_path / "data"), "extract", "demo",
                        "--engine", "ray"], capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == "error: ray is not installed: --engine ray needs the ray extra: pip install 'visearch[ray]'\n"
    assert not (tmp_path / "data" / "demo" / "features").exists()  # refused before any store was made
    for bad in (["--num-gpus", "1"], ["--engine", "ray", "--workers", "2"], ["--engine", "spark"],
                ["--engine", "ray", "--device", "cuda"]):
        p = cli("extract", "demo", *bad, data=tmp_path / "data", check=False)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.splitlines()) == 1, (bad, p)


def test_unreachable_cluster_and_missing_gpus_are_one_line_errors(ray_address, tmp_path):
    """Ray itself would wait without end for both (an address nobody listens on, GPUs the cluster lacks); a refusal
    found before the run (unreachable address, no GPU on this machine) leaves even a --rebuild store untouched."""
    import socket

    import torch

    write_photos(tmp_path / "photos", PHOTO_NAMES[:3])
    data = tmp_path / "data"
    cli("-q", "convert", tmp_path / "photos", "--name", "demo", data=data)
    cli("-q", "extract", "demo", "--model", "lite", data=data)
    store = data / "demo" / "features" / "lite"
    before = _snapshot(store)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = cli("extract", "demo", "--engine", "ray", "--address", f"127.0.0.1:{port}", "--rebuild", data=data,
            check=False, timeout=60)
    assert p.returncode == 1 and p.stdout == "" and len(p.stderr.splitlines()) == 1, p
    assert p.stderr.startswith(f"error: cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert _snapshot(store) == before
    if not torch.cuda.is_available():
        p = cli("extract", "demo", "--engine", "ray", "--num-gpus", "1", "--rebuild", data=data, check=False,
                timeout=60)
        assert p.returncode == 1 and len(p.stderr.splitlines()) == 1 and "than this machine has (0)" in p.stderr, p
        assert _snapshot(store) == before
    # the cluster's own resources: the test's Ray instance has no GPU (new images, so there is work to place)
    write_photos(tmp_path / "photos", PHOTO_NAMES[3:4])
    cli("-q", "convert", tmp_path / "photos", "--name", "demo", data=data)
    p = cli("extract", "demo", "--engine", "ray", "--address", ray_address, "--num-gpus", "1", data=data,
            check=False, timeout=120)
    assert p.returncode == 1 and "than the Ray cluster has (0)" in p.stderr, p
    assert _snapshot(store) == before  # nothing was committed
