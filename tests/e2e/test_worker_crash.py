"""Issue 10 item 2: SIGKILL during an extract that decodes in worker processes.

With >= 32 images `extract` starts torch DataLoader workers (forked). They used to inherit the store's writer lock
(flock locks belong to the open file, which a fork shares) and, orphaned by the SIGKILL, to stay alive in a futex
wait, so every later `extract` was refused with "another process is writing". Here: 208 distinct real images (crops
and rescales of the bundled photos), two decoder workers really running, SIGKILL at 3 random points, after each one
no process left alive or holding the lock (checked in /proc), an immediate resume, and at the end a store identical
(ids, rows per shard, descriptor bytes) to an uninterrupted run. Set VISEARCH_TEST_SEED to replay the kill points.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.fast_cli import cli, popen
from tests.photos import PHOTO_NAMES, photo_array
from visearch.store import MANIFEST, Store

STORE = Path("big") / "features" / "lite"
ENV = {"VISEARCH_SHARD_ROWS": "12"}
ARGS = ("-q", "extract", "big", "--workers", "2", "--batch-size", "4")
# (crop as fractions of width/height, longest side): 13 variants of each of the 16 photos = 208 distinct images
VARIANTS = [((0, 0, 1, 1), s) for s in (72, 88, 104)] + [
    (box, s) for box in ((0, 0, .7, .7), (.3, 0, 1, .7), (0, .3, .7, 1), (.3, .3, 1, 1), (.15, .15, .85, .85))
    for s in (64, 96)]


def _write_collection(folder: Path) -> int:
    folder.mkdir(parents=True)
    n = 0
    for name in PHOTO_NAMES:
        img = Image.fromarray(photo_array(name, 160))
        for k, ((x0, y0, x1, y1), side) in enumerate(VARIANTS):
            w, h = img.size
            c = img.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)))
            scale = side / max(c.size)
            c = c.resize((max(1, round(c.width * scale)), max(1, round(c.height * scale))), Image.BICUBIC)
            c.save(folder / f"{name}_{k:02d}.jpg", quality=90)
            n += 1
    return n


def _snapshot(path: Path) -> tuple[list[str], list[int], bytes]:
    with Store.open(path) as s:
        return s.id_list(), [x.rows for x in s.shards], s.read_global(np.arange(len(s))).tobytes()


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _lock_holders(lock: Path) -> list[int]:
    """Processes with an open file descriptor on `lock` (a flock lock lives as long as one of them)."""
    target = str(lock.resolve())
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{d}/fd"):
                if os.readlink(f"/proc/{d}/fd/{fd}") == target:
                    out.append(int(d))
                    break
        except OSError:
            continue
    return out


def _committed(store: Path) -> int:
    try:
        return len(json.loads((store / MANIFEST).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_sigkill_with_decoder_workers_leaves_no_orphan_and_resumes_identically(tmp_path):
    seed = int(os.environ.get("VISEARCH_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    n = _write_collection(tmp_path / "photos")
    assert n >= 200
    clean, data = tmp_path / "clean", tmp_path / "data"
    cli("-q", "convert", tmp_path / "photos", "--name", "big", data=clean)
    shutil.copytree(clean, data)  # copy2 keeps mtimes: same fingerprints
    r = json.loads(cli(*ARGS, "--json", data=clean, env=ENV).stdout)
    assert r["added"] == n and r["failed"] == []
    reference = _snapshot(clean / STORE)
    store = data / STORE
    kills = []
    while len(kills) < 3:
        p = popen(*ARGS, data=data, env=ENV)
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while p.poll() is None and len(workers) < 2 and time.monotonic() < deadline:  # the decoders are running
            workers = _children(p.pid)
            time.sleep(0.002)
        target = _committed(store) + rng.randint(0, 4)
        while p.poll() is None and _committed(store) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        workers = [w for w in _children(p.pid) if _alive(w)] or workers
        if p.poll() is not None:  # finished first: not a kill, start over from the clean copy
            assert p.returncode == 0, p.stderr.read()
            assert len(kills) < 3 and time.monotonic() < deadline
            shutil.rmtree(data)
            shutil.copytree(clean, data)
            kills.clear()
            continue
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)  # not communicate(): an orphan holding the pipes would keep them open for ever
        p.stdout.close()
        p.stderr.close()
        t_kill = time.monotonic()
        # the orphaned workers die with their parent (well before torch's own 5 s watchdog would notice)
        while any(_alive(w) for w in workers) and time.monotonic() < t_kill + 2.0:
            time.sleep(0.01)
        left = [w for w in workers if _alive(w)]
        holders = _lock_holders(store / ".lock") if (store / ".lock").exists() else []
        for w in left:  # never leave them behind, even when failing
            os.kill(w, signal.SIGKILL)
        kills.append((_committed(store), len(workers), left, holders))
        assert workers, f"no decoder worker process was running (seed {seed})"
        assert not left, f"orphaned workers still alive after the SIGKILL: {kills} (seed {seed})"
        assert not holders, f"processes still hold the writer lock: {kills} (seed {seed})"
    r = json.loads(cli(*ARGS, "--json", data=data, env=ENV).stdout)  # resumed at once: never "another process"
    assert r["failed"] == [] and r["removed"] == 0, r
    ids, rows, desc = _snapshot(store)
    assert ids == reference[0], f"seed {seed}"
    assert rows == reference[1], f"seed {seed}"
    assert desc == reference[2], f"seed {seed}"
    print(f"seed {seed}: {n} images, kills (shards committed, workers, left alive, lock holders) {kills}")
