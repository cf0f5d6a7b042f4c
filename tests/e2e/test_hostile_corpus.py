"""Issue 12's hostile and odd inputs through the real CLI (tests/e2e/fast_cli.py: the real code with lite at 64 px).
The bad-file corpus of issue 5 is tests/e2e/test_bad_corpus.py; this file adds, by kind:

  stale or damaged state: a query between `convert` and `extract` never returns an image that left the dataset;
    extract counts never go negative (deleted + now-unreadable images); a flipped byte inside a shard's `global`
    chunk is caught by `extract` naming the shard (and `query` blames the store, not the query image); store
    manifests with fields out of range or shard names outside the store folder are refused.
  denial of service: 4000x1 / 1x4000 database images are skipped with a reason, a 2000x1 query refused in one line,
    all in seconds (the model-level bound for SuperGlobal/AMES is in tests/unit/test_work_bounds.py).
  weights: `weights verify` reports every garbage file (text, random bytes, truncated zip, safetensors with a bad
    offset) instead of aborting at the first; a text file as --weights is one line.
  one-line errors: --data-dir a file or read-only, a read-only store, --html/--show unwritable or a folder (checked
    before any query runs), a binary query list (file or stdin), a malformed --endpoint, bench --compare with a bad
    file (before the run), bench scale --sizes inf / --dim 3e9, Ctrl-C -> "interrupted", exit 130.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.fast_cli import COMMAND, cli, cli_env
from tests.photos import photo_array, write_photos
from visearch.data import load_dataset

NAMES = ["coffee", "rocket", "chelsea", "camera"]
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]  # root obeying permission bits


def one_line_error(p, *words) -> str:
    assert p.returncode != 0, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "unexpected" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def as_user(*args, data) -> subprocess.CompletedProcess:
    """The fast CLI with permission bits enforced even for root (skips the test when that is impossible)."""
    cmd = [*COMMAND, "--data-dir", str(data), *[str(a) for a in args]]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: permission bits do not bind")
        cmd = NO_DAC + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120, check=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    src = root / "src"
    photos = write_photos(src, NAMES, max_side=96)
    data = root / "data"
    cli("-q", "convert", src, "--name", "shop", data=data)
    cli("-q", "extract", "shop", data=data)
    return {"root": root, "src": src, "photos": photos, "data": data}


def _copy(base, tmp_path, name="shop"):
    """A private copy of the converted + extracted dataset (sources copied too, so they can be edited)."""
    src = tmp_path / "src"
    shutil.copytree(base["src"], src)
    data = tmp_path / "data"
    shutil.copytree(base["data"] / "shop", data / name)
    meta = json.loads((data / name / "sources.json").read_text())
    text = json.dumps(meta).replace(str(base["src"]), str(src))
    (data / name / "sources.json").write_text(text)
    return src, data


# ---- stale results, counts, damaged shards -------------------------------------------------------------------------
def test_query_never_returns_images_no_longer_in_the_dataset(base, tmp_path):
    src, data = _copy(base, tmp_path)
    gone = load_dataset(data, "shop")
    gone_id = next(i for i, p in gone.sources.items() if Path(p).name == "rocket.jpg")
    (src / "rocket.jpg").unlink()
    cli("-q", "convert", src, "--name", "shop", data=data)  # no extract afterwards: the store still holds rocket
    p = cli("-q", "query", base["photos"]["rocket"], "-d", "shop", "--json", "--top-k", "10", data=data)
    res = json.loads(p.stdout)
    ids = [r["id"] for r in res["crops"][0]["results"]]
    assert gone_id not in ids and len(ids) == len(NAMES) - 1, ids
    assert all(Path(r["path"]).exists() for r in res["merged"])
    assert "no longer in the dataset" in p.stderr  # said once, on stderr


def test_extract_counts_never_go_negative(base, tmp_path):
    src, data = _copy(base, tmp_path)
    ds = load_dataset(data, "shop")
    by_name = {Path(p).name: i for i, p in ds.sources.items()}
    (src / "rocket.jpg").unlink()
    cli("-q", "convert", src, "--name", "shop", data=data)  # rocket removed from the dataset
    (data / "shop" / "jpg" / f"{by_name['coffee.jpg']}.jpg").write_bytes(b"no longer a JPEG")  # changed, unreadable
    r = json.loads(cli("-q", "extract", "shop", "--json", data=data).stdout)
    assert (r["added"], r["updated"], r["removed"]) == (0, 0, 2), r
    assert [f["id"] for f in r["failed"]] == [by_name["coffee.jpg"]]


def _flip_global_byte(shard: Path) -> None:
    import h5py

    with h5py.File(shard, "r") as f:
        info = f["global"].id.get_chunk_info(0)
    with open(shard, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0x10]))


def test_flipped_byte_in_a_shard_is_caught_by_extract_and_named(base, tmp_path):
    src, data = _copy(base, tmp_path)
    store = data / "shop" / "features" / "lite"
    shard = next(store.glob("shard-*.h5"))
    _flip_global_byte(shard)
    one_line_error(cli("-q", "extract", "shop", data=data, check=False), shard.name, "corrupt", "--rebuild")
    # query: the store is at fault, not the query image; no result is printed
    q = cli("-q", "query", base["photos"]["coffee"], base["photos"]["camera"], "-d", "shop", data=data, check=False)
    line = one_line_error(q, shard.name)
    assert not line.startswith(f"error: {base['photos']['coffee']}") and q.stdout == ""


MANIFEST_CASES = [
    (lambda m: m["shards"][0].update(file="../../../sources.json"), ["not a plain shard name"]),
    (lambda m: m.update(dim=-3), ["dim"]),
    (lambda m: m["shards"][0].update(rows=-1), ["rows"]),
    (lambda m: m["shards"][0].update(dead=[10 ** 9]), ["dead rows"]),
    (lambda m: m["shards"][0].update(dead={"file": "../../../sources.json", "count": 1, "crc32": 0}), ["dead rows"]),
    (lambda m: m.update(local_fields={"x": {"shape": [0], "dtype": "uint8"}}), ["local field"]),
    (lambda m: m.update(shards={"a": 1}), ["shards"]),
    (lambda m: m.update(dtype="object"), ["dtype"]),
]


def test_store_manifest_fields_out_of_range(base, tmp_path):
    from visearch.errors import StoreError
    from visearch.store import Store

    src, data = _copy(base, tmp_path)
    mpath = data / "shop" / "features" / "lite" / "manifest.json"
    good = mpath.read_text()
    for k, (edit, words) in enumerate(MANIFEST_CASES):
        m = json.loads(good)
        edit(m)
        mpath.write_text(json.dumps(m))
        if k < 2:  # through the CLI; the others in-process (the same Store.open)
            one_line_error(cli("-q", "query", base["photos"]["coffee"], "-d", "shop", data=data, check=False),
                           "manifest", "corrupt", *words)
        with pytest.raises(StoreError, match=re.escape(words[0])):
            Store.open(mpath.parent)


# ---- denial of service --------------------------------------------------------------------------------------------
def test_extreme_aspect_ratios_are_bounded_and_heic_is_read(tmp_path):
    """One collection for two kinds: strips (bounded work) and a HEIC photo (converted, searchable: not "ignored")."""
    pillow_heif = pytest.importorskip("pillow_heif")
    src = tmp_path / "src"
    write_photos(src, ["coffee"], max_side=64)
    heic = tmp_path / "rocket.heic"
    pillow_heif.from_pillow(Image.fromarray(photo_array("rocket", 64))).save(heic, quality=90)
    shutil.copy(heic, src / "rocket.heic")
    rng = np.random.default_rng(0)
    for w, h in ((4000, 1), (1, 4000)):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"strip_{w}x{h}.png")
    q = tmp_path / "q2000x1.png"
    Image.fromarray(rng.integers(0, 255, (1, 2000, 3), dtype=np.uint8)).save(q)
    data = tmp_path / "data"
    t0 = time.monotonic()
    conv = json.loads(cli("-q", "convert", src, "--name", "strips", "--json", data=data).stdout)
    assert conv["n_images"] == 4 and conv["skipped"] == [] and conv["ignored"] == 0, conv
    r = json.loads(cli("-q", "extract", "strips", "--json", data=data).stdout)
    assert r["added"] == 2 and len(r["failed"]) == 2, r
    assert all("aspect ratio 4000:1 above the limit" in f["reason"] for f in r["failed"]), r["failed"]
    p = cli("-q", "query", q, heic, "-d", "strips", "--paths", "--top-k", "1", data=data, check=False)
    assert p.returncode == 1 and p.stdout.strip() == str(src / "rocket.heic"), (p.stdout, p.stderr)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{q}: image is 2000x1 px, aspect ratio 2000:1 above the limit" in errors[0], errors
    assert time.monotonic() - t0 < 60  # was minutes and gigabytes for SuperGlobal (issue 12 item 5)


# ---- weights --------------------------------------------------------------------------------------------------------
def test_weights_verify_reports_every_garbage_file(base, tmp_path):
    import io
    import struct
    import zipfile

    import torch

    w = tmp_path / "weights"
    w.mkdir()
    (w / "CVPR2022_CVNet_R50.pyth").write_text("hello\n")  # the unpickler raised KeyError: 101 here
    (w / "CVPR2022_CVNet_R101.pyth").write_bytes(np.random.default_rng(1).bytes(3000))
    buf = io.BytesIO()
    torch.save({"state": {"w": torch.zeros(4)}}, buf)
    (w / "cvnet_detector.pt").write_bytes(buf.getvalue()[:200])  # a truncated zip
    (w / "itq_r101_cvnet_D128.npz").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    g = w / "grounding-dino-tiny"
    g.mkdir()
    (g / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, "x"]}}).encode()
    (g / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    for f in ("preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
              "vocab.txt"):
        (g / f).write_text("{}")
    assert zipfile.is_zipfile(w / "itq_r101_cvnet_D128.npz") is False
    p = subprocess.run([*COMMAND, "--weights-dir", str(w), "weights", "verify"], capture_output=True, text=True,
                       env=cli_env(), timeout=120, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "unexpected" not in p.stderr, p.stderr
    lines = {ln.split()[0]: ln for ln in p.stdout.splitlines()}
    for item in ("superglobal-r50", "superglobal-r101", "ames-detector", "grounding-dino-tiny"):
        assert item in lines and " BAD " in lines[item], (item, p.stdout)
    assert "data_offsets" in lines["grounding-dino-tiny"]
    # the same text file as --weights: one line naming it
    one_line_error(cli("-q", "extract", "shop", "--model", "superglobal-r50", "--weights",
                       w / "CVPR2022_CVNet_R50.pyth", data=base["data"], check=False),
                   "CVPR2022_CVNet_R50.pyth", "not a PyTorch file")
    assert not (base["data"] / "shop" / "features" / "superglobal-r50").exists()


# ---- one-line errors ------------------------------------------------------------------------------------------------
def test_data_dir_that_is_a_file_or_read_only(base, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args in (("convert", base["src"], "--name", "s"), ("extract", "s"), ("query", base["photos"]["coffee"],
                                                                           "-d", "s")):
        one_line_error(cli("-q", *args, data=afile, check=False), "data dir", "not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line_error(as_user("-q", "convert", base["src"], "--name", "s", data=ro), "cannot write", str(ro),
                       "Permission denied")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_read_only_store(base, tmp_path):
    src, data = _copy(base, tmp_path)
    write_photos(src, ["astronaut"], max_side=96)
    cli("-q", "convert", src, "--name", "shop", data=data)
    store = data / "shop" / "features" / "lite"
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    for p in [store, *store.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        one_line_error(as_user("-q", "extract", "shop", data=data), "cannot write", "Permission denied")
    finally:
        for p in [store, *store.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before


def test_unwritable_html_and_show_are_refused_before_any_query(base, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    q = base["photos"]["coffee"]
    cases = [("--html", tmp_path, "is a folder"), ("--show", tmp_path, "is a folder"),
             ("--html", afile / "sub" / "r.html", "not a folder"), ("--show", tmp_path / "sheet.txt", "unsupported")]
    for flag, path, words in cases:
        p = cli("-q", "query", q, "-d", "shop", flag, path, data=base["data"], check=False)
        one_line_error(p, flag, words)
        assert p.stdout == ""  # refused before the query ran
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        p = as_user("-q", "query", q, "-d", "shop", "--html", ro / "r.html", data=base["data"])
        one_line_error(p, "--html", "Permission denied")
        assert p.stdout == ""
    finally:
        ro.chmod(0o755)


def test_binary_query_list(base, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_bytes(np.random.default_rng(0).bytes(2000) + b"\0")
    one_line_error(cli("-q", "query", lst, "-d", "shop", data=base["data"], check=False), str(lst), "binary")
    p = subprocess.run([*COMMAND, "--data-dir", str(base["data"]), "-q", "query", "-", "-d", "shop"],
                       input=b"\x89PNG\r\n\x1a\n\0\0\xff\xfe", capture_output=True, env=cli_env(), timeout=60,
                       check=False)
    p.stderr, p.stdout = p.stderr.decode(), p.stdout.decode()
    one_line_error(p, "stdin", "binary")


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:99999/v2", "http://[::1", "ftp://example.com",
                                      "http://exa mple.com", "http://"])
def test_malformed_endpoint(base, tmp_path, endpoint):
    token = tmp_path / "token"
    token.write_text("secret-token-123")
    p = cli("-q", "detect", base["photos"]["coffee"], "--detector", "gdino-cloud", "--endpoint", endpoint,
            "--token-file", token, check=False)
    one_line_error(p, "endpoint")
    assert "secret-token-123" not in p.stderr


def test_bench_compare_bad_file_is_checked_before_the_run(base, tmp_path):
    for text in ("[1, 2]", '{"models": [1]}', '{"models": {"lite": 3}}', "[" * 100000, "\xff\xfe"):
        f = tmp_path / "old.json"
        f.write_text(text, encoding="latin-1")
        t0 = time.monotonic()
        p = cli("-q", "bench", "--dataset", "shop", "--compare", f, data=base["data"], check=False)
        one_line_error(p, str(f))
        assert time.monotonic() - t0 < 30 and p.stdout == ""


@pytest.mark.parametrize("args,words", [
    (["--sizes", "inf"], ["bad size 'inf'"]),
    (["--sizes", "nan"], ["bad size"]),
    (["--sizes", "1e30"], ["above the largest"]),
    (["--sizes", "1k", "--dim", "3000000000"], ["--dim 3000000000 is out of range"]),
])
def test_bench_scale_bad_sizes(args, words):
    one_line_error(cli("-q", "bench", "scale", *args, check=False), *words)


def _wait_idle(pid: int, timeout: float = 60) -> None:
    """Until process `pid` stops using CPU for 0.5 s (it then blocks, here reading stdin)."""
    def cpu() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    end, last, still = time.monotonic() + timeout, -1, 0
    while time.monotonic() < end:
        now = cpu()
        still = still + 1 if now == last else 0
        if still >= 5:
            return
        last = now
        time.sleep(0.1)


def test_ctrl_c_prints_interrupted_and_exits_130(base):
    cmd = [*COMMAND, "--data-dir", str(base["data"]), "-q", "query", "-", "-d", "shop"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=cli_env())
    try:
        _wait_idle(p.pid)  # blocked reading the list of query paths from stdin
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and err.strip() == "interrupted", (p.returncode, err)


# ---- dataset files: ids, pickles, atomic convert --------------------------------------------------------------------
def _revisitop_folder(root: Path, name: str, cfg: dict) -> Path:
    """An official-layout folder: jpg/a.jpg (+ b.jpg) and gnd_<name>.pkl holding `cfg`."""
    import pickle

    folder = root / name
    (folder / "jpg").mkdir(parents=True)
    for n in ("a", "b"):
        Image.fromarray(photo_array("coffee", 48)).save(folder / "jpg" / f"{n}.jpg")
    (folder / f"gnd_{name}.pkl").write_bytes(pickle.dumps(cfg, protocol=2))
    return folder


@pytest.mark.parametrize("bad_id", ["../../../../../../{outside}/precious", "{outside}/precious"])
def test_gnd_ids_cannot_reach_outside_the_dataset_folder(tmp_path, bad_id):
    outside = tmp_path / "home"
    outside.mkdir()
    precious = outside / "precious.jpg"
    precious.write_bytes(b"user data")
    iid = bad_id.format(outside=outside)
    src = _revisitop_folder(tmp_path / "dl", "evil", {"imlist": ["a", iid], "qimlist": [], "gnd": []})
    if "precious" in iid:  # the case: a file of that name exists where the id points
        os.symlink(precious, src / "jpg" / "dummy.jpg")
    data = tmp_path / "data"
    one_line_error(cli("-q", "convert", src, "--name", "evil", data=data, check=False), "image id", "refusing")
    assert precious.read_bytes() == b"user data" and not precious.is_symlink()
    assert not (data / "evil").exists()
    # the same folder dropped into the data dir as is: every reader refuses it too
    shutil.copytree(src, data / "evil", symlinks=True)
    one_line_error(cli("-q", "extract", "evil", data=data, check=False), "image id")


def test_sources_json_ids_and_a_jpg_link_out_of_the_dataset(base, tmp_path):
    src, data = _copy(base, tmp_path)
    spath = data / "shop" / "sources.json"
    meta = json.loads(spath.read_text())
    good = spath.read_text()
    first = next(iter(meta["images"]))
    meta["images"]["../../../victim"] = meta["images"].pop(first)
    spath.write_text(json.dumps(meta))
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"keep me")
    for args in (("convert", src, "--name", "shop"), ("extract", "shop"), ("query", base["photos"]["coffee"], "-d",
                                                                             "shop")):
        one_line_error(cli("-q", *args, data=data, check=False), "sources.json", "image id")
    assert victim.read_bytes() == b"keep me"
    spath.write_text(good)
    # jpg/ replaced by a link to a folder elsewhere: convert refuses to write through it
    elsewhere = tmp_path / "elsewhere"
    shutil.move(data / "shop" / "jpg", elsewhere)
    os.symlink(elsewhere, data / "shop" / "jpg")
    before = sorted(os.listdir(elsewhere))
    write_photos(src, ["astronaut"], max_side=64)
    one_line_error(cli("-q", "convert", src, "--name", "shop", data=data, check=False), "not inside")
    assert sorted(os.listdir(elsewhere)) == before


@pytest.mark.parametrize("bad_id", ["a\0b", "sub/a", "..", "", ".hidden", "a\\b", " a", "x" * 300, "a\nb", 7])
def test_every_unsafe_id_is_refused(tmp_path, bad_id):
    """The same check in-process for the other kinds of unsafe id (the CLI path is the one above)."""
    import pickle

    from visearch.data.revisitop import read_gnd, validate_gnd
    from visearch.errors import DatasetError

    p = tmp_path / "gnd_x.pkl"
    p.write_bytes(pickle.dumps({"imlist": ["a", bad_id], "qimlist": [], "gnd": []}, protocol=2))
    with pytest.raises(DatasetError, match="image id|not a list of image names"):
        validate_gnd(read_gnd(p), p)


def _billion_laughs(depth: int = 40) -> list:
    x: list = ["lol"]
    for _ in range(depth):
        x = [x, x]
    return x


GND_CASES = [
    ({"imlist": _billion_laughs(), "qimlist": [], "gnd": []}, ["more than"]),  # 2**40 nodes from ~300 bytes
    ({"imlist": ["a", "b"], "qimlist": [], "gnd": 5}, ["gnd is a int"]),
    ({"imlist": ["a", "b"], "qimlist": ["a"], "gnd": [{"easy": _billion_laughs()}]}, ["more than"]),
    ({"imlist": "ab", "qimlist": [], "gnd": []}, ["imlist is not a list"]),
    ({"imlist": ["a", 7], "qimlist": [], "gnd": []}, ["imlist is not a list"]),
    ({"imlist": ["a", "b"], "qimlist": ["a"], "gnd": [[0, 1]]}, ["gnd[0] is a list"]),
    ({"imlist": ["a", "b"], "qimlist": [], "gnd": [], "x": {(1, 2): 3}}, ["dict key"]),
]


@pytest.mark.parametrize("k", range(len(GND_CASES)))
def test_gnd_pickle_bombs_and_wrong_types(tmp_path, k):
    cfg, words = GND_CASES[k]
    data = tmp_path / "data"
    folder = _revisitop_folder(data, "g", cfg)
    assert len((folder / "gnd_g.pkl").read_bytes()) < 2000
    if k < 2:  # through the CLI (the others in-process: the same code path, a second each saved)
        t0 = time.monotonic()
        one_line_error(cli("-q", "eval", "g", data=data, check=False), "gnd_g.pkl", *words)
        assert time.monotonic() - t0 < 30  # was a minute and a MemoryError
    from visearch.data.revisitop import read_gnd, validate_gnd
    from visearch.errors import DatasetError

    t0 = time.monotonic()
    with pytest.raises(DatasetError, match=re.escape(words[0])):
        validate_gnd(read_gnd(folder / "gnd_g.pkl"), folder / "gnd_g.pkl")
    assert time.monotonic() - t0 < 1.0


def test_failed_or_killed_first_convert_leaves_nothing_that_blocks(tmp_path):
    src = tmp_path / "src"
    write_photos(src, NAMES, max_side=64)
    data = tmp_path / "data"
    gt = tmp_path / "gt.csv"
    gt.write_text("query,x1,y1,x2,y2,positives\ncoffee.jpg,5000,5000,6000,6000,rocket.jpg\n")  # fails after encoding
    one_line_error(cli("-q", "convert", src, "--name", "x", "--ground-truth", gt, data=data, check=False), "outside")
    assert not (data / "x").exists() and [p for p in data.iterdir()] == []
    # SIGKILL in the middle of a first conversion (many files, killed once some are written)
    big = tmp_path / "big"
    for k in range(40):
        write_photos(big / f"d{k}", ["chelsea", "astronaut"], max_side=200)
    p = popen_cli("-q", "convert", big, "--name", "x", data=data)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(data.glob(".x.build-*/jpg/*.jpg")):
        time.sleep(0.05)
    p.kill()
    p.wait()
    assert not (data / "x").exists()
    conv = json.loads(cli("-q", "convert", src, "--name", "x", "--json", data=data).stdout)
    assert conv["n_images"] == len(NAMES) and sorted(os.listdir(data)) == ["x"]


def popen_cli(*args, data):
    return subprocess.Popen([*COMMAND, "--data-dir", str(data), *[str(a) for a in args]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=cli_env())


def test_ground_truth_checked_before_any_image_is_re_encoded(base, tmp_path):
    src, data = _copy(base, tmp_path)
    jpgs = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (data / "shop" / "jpg").iterdir()}
    Image.fromarray(photo_array("camera", 80)).save(src / "coffee.jpg")  # a changed image
    write_photos(src, ["astronaut"], max_side=64)  # and a new one
    cases = {"box.csv": "query,x1,y1,x2,y2,positives\ncoffee.jpg,0,0,1e400,1e400,rocket.jpg\n",
             "nan.csv": "query,x1,y1,x2,y2,positives\ncoffee.jpg,nan,nan,nan,nan,rocket.jpg\n",
             "int.json": '{"queries": [{"image": "coffee.jpg", "positives": 5}]}',
             "str.json": '{"queries": [{"image": "coffee.jpg", "positives": "rocket.jpg"}]}',
             "box.json": '{"queries": [{"image": "coffee.jpg", "bbox": {"x": 1}, "positives": ["rocket.jpg"]}]}'}
    words = {"box.csv": "four finite", "nan.csv": "four finite", "int.json": "must be a list",
             "str.json": "must be a list", "box.json": "four finite"}
    for fname, text in cases.items():
        gt = tmp_path / fname
        gt.write_text(text)
        one_line_error(cli("-q", "convert", src, "--name", "shop", "--ground-truth", gt, data=data, check=False),
                       fname, words[fname])
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (data / "shop" / "jpg").iterdir()} == jpgs


def test_dataset_folder_as_its_own_source_is_refused(base, tmp_path):
    src, data = _copy(base, tmp_path)
    before = (data / "shop" / "sources.json").read_bytes()
    for folder in (data / "shop", data / "shop" / "jpg"):
        one_line_error(cli("-q", "convert", folder, "--name", "shop", data=data, check=False), "into itself")
    assert (data / "shop" / "sources.json").read_bytes() == before


def test_replace_after_a_move_re_points_the_sources(base, tmp_path):
    src, data = _copy(base, tmp_path)
    moved = tmp_path / "moved"
    src.rename(moved)
    conv = json.loads(cli("-q", "convert", moved, "--name", "shop", "--replace", "--json", data=data).stdout)
    assert conv["unchanged"] == len(NAMES) and conv["added"] == []  # nothing re-encoded
    ds = load_dataset(data, "shop")
    assert all(Path(p).parent == moved.resolve() for p in ds.sources.values()), ds.sources
    q = cli("-q", "query", base["photos"]["coffee"], "-d", "shop", "--paths", "--top-k", "1", data=data)
    assert q.stdout.strip() == str(moved.resolve() / "coffee.jpg")
