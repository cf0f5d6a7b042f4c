"""visearch.dataset: convert (bad files, odd names, symlink loops, incremental runs), ground truth, revisitop import,
the restricted gnd unpickler."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.photos import (
    cropped_copy,
    photo_array,
    rescaled_copy,
    write_bad_corpus,
    write_exif_rotated_jpeg,
    write_photos,
)
from visearch.data import (
    ConvertReport,
    Dataset,
    convert,
    list_datasets,
    load_dataset,
    make_id,
    read_gnd,
    validate_gnd,
    write_gnd,
)
from visearch.errors import DatasetError, UsageError
from visearch.images import load_rgb


def _by_name(rep: ConvertReport) -> dict[str, str]:
    return {Path(s.path).name: s.reason for s in rep.skipped}


@pytest.fixture()
def src(tmp_path) -> Path:
    s = tmp_path / "photos"
    write_photos(s / "a", ["chelsea", "coffee", "rocket"])
    write_photos(s / "b", ["chelsea"])  # same file name in another folder
    return s


# ---- conversion -----------------------------------------------------------------------------------------------------
def test_convert_folder_with_bad_corpus_and_loops(tmp_path, src):
    corpus = write_bad_corpus(src / "bad")
    (src / "notes.txt").write_text("not an image")
    (src / ".DS_Store").write_bytes(b"\0\1")
    (src / "a" / "loop").symlink_to("..")  # directory loop
    (src / "self.jpg").symlink_to("self.jpg")  # self-referencing file link
    (src / "gone.png").symlink_to("does-not-exist.png")
    os.mkfifo(src / "pipe.jpg")  # must be skipped, never opened (it would block)
    ticks: list[int] = []
    total: list[int] = []
    rep = convert(src, tmp_path / "data", "shop", progress=ticks.append, on_total=total.append)

    skipped = _by_name(rep)
    assert skipped == {
        "truncated.jpg": skipped["truncated.jpg"], "empty.jpg": "empty file (0 bytes)",
        "notes.jpg": skipped["notes.jpg"], "saved_page.png": skipped["saved_page.png"],
        "bomb.png": skipped["bomb.png"], "loop": "symlink loop: folder already visited",
        "self.jpg": "symlink loop", "gone.png": "broken symlink or file vanished", "pipe.jpg": "not a regular file",
    }
    assert "truncated" in skipped["truncated.jpg"] and "text" in skipped["notes.jpg"]
    assert "HTML" in skipped["saved_page.png"] and "decompression-bomb" in skipped["bomb.png"]
    assert rep.ignored == 2  # notes.txt, .DS_Store
    good = {"chelsea", "coffee", "rocket", "chelsea_b", "one_by_one", "cmyk_jpeg", "png16_gray",
            "palette_png_transparency", "animated_gif", "exif_rotated_jpeg", "name_spaces", "name_unicode",
            "name_leading_dash"}
    assert len(rep.added) == len(good) and rep.n_images == len(good) and rep.n_queries == 0
    assert total == [len(good) + 8] and sum(ticks) == total[0]  # 8 bad files; the loop dir is no file
    assert not rep.updated and not rep.removed
    assert "skipped" in rep.summary() and rep.as_dict()["skipped"][0]["reason"]

    ds = load_dataset(tmp_path / "data", "shop")
    assert sorted(ds.imlist) == sorted(rep.added) and ds.qimlist == [] and ds.gnd == []
    for iid in ds.imlist:
        assert not iid.startswith("-") and iid.isascii() and " " not in iid
        assert load_rgb(ds.image_path(iid)).shape[2] == 3
    # equal file names in different folders get different ids, each mapped to its own original
    chel = [i for i in ds.imlist if "chelsea" in i]
    assert len(chel) == 2 and {Path(ds.sources[i]).parent.name for i in chel} == {"a", "b"}
    # EXIF applied and modes converted in the stored JPEG
    rot = next(i for i in ds.imlist if i.startswith("bad_rotated"))
    assert load_rgb(ds.image_path(rot), apply_exif=False).shape[:2] == (160, 106)
    pal = next(i for i in ds.imlist if i.startswith("bad_palette"))
    assert load_rgb(ds.image_path(pal))[0, 15].min() > 240  # transparent -> white
    # odd names reach the source map unchanged
    assert {Path(ds.sources[i]).name for i in ds.imlist} >= {"ünïcødé 写真.jpg", "-rf --help.jpg",
                                                            "my holiday photo.jpg"}
    assert corpus  # the corpus dict lists what was written


def test_upright_rgb_jpeg_kept_byte_for_byte(tmp_path, src):
    convert(src, tmp_path / "data", "t")
    ds = load_dataset(tmp_path / "data", "t")
    iid = make_id("a/coffee.jpg")
    assert ds.image_path(iid).read_bytes() == (src / "a" / "coffee.jpg").read_bytes()


def test_ids_are_stable_and_safe():
    assert make_id("a/chelsea.jpg") == make_id("a/chelsea.jpg") != make_id("b/chelsea.jpg")
    assert make_id("x.jpg") != make_id("x.png")
    assert make_id("-rf --help.jpg").startswith("rf_help-")
    assert make_id("写真.jpg").startswith("img-")
    assert make_id("Cafe\u0301.jpg") == make_id("Caf\u00e9.jpg")  # NFD (macOS) and NFC names agree


def test_rerun_adds_updates_and_prunes(tmp_path, src):
    data = tmp_path / "data"
    first = convert(src, data, "t")
    assert len(first.added) == 4
    again = convert(src, data, "t")
    assert (again.added, again.updated, again.removed, again.unchanged) == ([], [], [], 4)

    (src / "new").mkdir()
    rescaled_copy(src / "a" / "coffee.jpg", src / "new" / "coffee_small.jpg", 0.5)
    (src / "a" / "rocket.jpg").unlink()
    old_coffee = load_rgb(data / "t" / "jpg" / f"{make_id('a/coffee.jpg')}.jpg")
    # same name, new content
    Image.fromarray(photo_array("astronaut", 200)).save(src / "a" / "coffee.jpg", quality=90)
    # touched, not changed: new mtime, same bytes
    os.utime(src / "b" / "chelsea.jpg", ns=(1, 10**18))

    rep = convert(src, data, "t")
    assert rep.added == [make_id("new/coffee_small.jpg")]
    assert rep.updated == [make_id("a/coffee.jpg")]
    assert rep.removed == [make_id("a/rocket.jpg")]
    assert rep.unchanged == 2
    ds = load_dataset(data, "t")
    assert make_id("a/rocket.jpg") not in ds.imlist
    assert not (data / "t" / "jpg" / f"{make_id('a/rocket.jpg')}.jpg").exists()
    assert load_rgb(ds.image_path(make_id("a/coffee.jpg"))).shape != old_coffee.shape
    # imlist keeps its previous order, new ids at the end
    assert ds.imlist[-1] == make_id("new/coffee_small.jpg")
    assert ds.source_info[make_id("b/chelsea.jpg")].mtime_ns == 10**18


def test_previously_good_file_now_corrupt_is_pruned(tmp_path, src):
    convert(src, tmp_path / "data", "t")
    (src / "a" / "rocket.jpg").write_bytes(b"oops")
    rep = convert(src, tmp_path / "data", "t")
    assert rep.removed == [make_id("a/rocket.jpg")]
    assert "not an image" in _by_name(rep)["rocket.jpg"]


def test_crash_leftovers_cleaned_and_no_temp_files(tmp_path, src):
    data = tmp_path / "data"
    convert(src, data, "t")
    (data / "t" / "jpg" / ".x.jpg.tmp-abc").write_bytes(b"half")
    (data / "t" / ".sources.json.tmp-abc").write_bytes(b"{")
    convert(src, data, "t")
    leftovers = [p for p in (data / "t").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_data_dir_inside_source_is_not_imported(tmp_path, src):
    rep1 = convert(src, src / "data", "t")
    rep2 = convert(src, src / "data", "t")
    assert len(rep1.added) == 4 and rep2.added == [] and rep2.unchanged == 4


def test_refuses_other_source_unless_replace(tmp_path, src):
    data = tmp_path / "data"
    convert(src, data, "t")
    moved = tmp_path / "moved"
    shutil.copytree(src, moved, copy_function=shutil.copy2)
    with pytest.raises(DatasetError, match="was converted from"):
        convert(moved, data, "t")
    rep = convert(moved, data, "t", replace=True)
    assert rep.added == [] and rep.removed == [] and rep.unchanged == 4  # ids come from relative paths


def test_folder_left_by_an_interrupted_first_convert_takes_replace(tmp_path, src):
    data = tmp_path / "data"
    left = data / "t" / "jpg"
    left.mkdir(parents=True)
    (left / "stale.jpg").write_bytes(b"half a jpeg")  # an older visearch died before writing sources.json
    with pytest.raises(DatasetError, match="interrupted first convert") as e:
        convert(src, data, "t")
    assert "--replace" in e.value.hint
    rep = convert(src, data, "t", replace=True)
    assert len(rep.added) == 4 and len(load_dataset(data, "t").imlist) == 4
    assert (left / "stale.jpg").read_bytes() == b"half a jpeg"  # not ours to delete
    # a revisitop dataset from elsewhere (ground truth, no sources.json) is never written into, even with --replace
    other = data / "r"
    (other / "jpg").mkdir(parents=True)
    (other / "gnd_r.pkl").write_bytes(b"")
    with pytest.raises(DatasetError, match="did not create"):
        convert(src, data, "r", replace=True)


def test_bad_arguments(tmp_path, src):
    with pytest.raises(UsageError):
        convert(src, tmp_path / "data", "../evil")
    with pytest.raises(DatasetError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "data", "t")
    with pytest.raises(DatasetError, match="not a folder"):
        convert(src / "a" / "chelsea.jpg", tmp_path / "data", "t")


def test_empty_folder_gives_empty_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    rep = convert(tmp_path / "empty", tmp_path / "data", "e")
    assert rep.n_images == 0
    assert load_dataset(tmp_path / "data", "e").imlist == []


def test_unreadable_file_is_skipped(tmp_path):
    """chmod 000 does not stop root, so as root the conversion runs in a forked child that drops to `nobody`."""
    base = Path(tempfile.mkdtemp(prefix="visearch-perm-"))  # pytest's tmp dirs are private to root
    try:
        os.chmod(base, 0o755)
        s = base / "src"
        write_photos(s, ["chelsea", "coffee"])
        os.chmod(s / "coffee.jpg", 0)
        data = base / "data"
        data.mkdir()
        os.chmod(data, 0o777)
        if os.geteuid() != 0:
            rep = convert(s, data, "t", workers=1)
            result = {"skipped": _by_name(rep), "added": len(rep.added)}
        else:
            import concurrent.futures  # noqa: F401 - imported before the fork: the child cannot read /root
            import errno  # noqa: F401
            load_rgb(s / "chelsea.jpg")  # loads Pillow's plugins before the fork
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: drop privileges, convert, report through the pipe
                code = 1
                try:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                    rep = convert(s, data, "t", workers=1)
                    os.write(w, json.dumps({"skipped": _by_name(rep), "added": len(rep.added)}).encode())
                    code = 0
                except BaseException as e:  # noqa: BLE001
                    os.write(w, json.dumps({"error": repr(e)}).encode())
                finally:
                    os._exit(code)
            os.close(w)
            with os.fdopen(r) as f:
                result = json.loads(f.read() or "{}")
            os.waitpid(pid, 0)
            if "error" in result and "Operation not permitted" in result["error"]:
                pytest.skip("cannot drop privileges here: " + result["error"])
        assert result.get("skipped") == {"coffee.jpg": "permission denied"}, result
        assert result["added"] == 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- ground truth ---------------------------------------------------------------------------------------------------
@pytest.fixture()
def gt_src(tmp_path) -> Path:
    s = tmp_path / "gt"
    paths = write_photos(s / "db", ["chelsea", "coffee", "rocket", "astronaut"])
    (s / "queries").mkdir()
    cropped_copy(paths["chelsea"], s / "queries" / "cat.jpg", (0.1, 0.1, 0.9, 0.9))
    rescaled_copy(paths["coffee"], s / "queries" / "cup.jpg", 0.7)
    return s


def _check_gt(ds: Dataset, src: Path) -> None:
    assert [Path(ds.sources[q]).name for q in ds.qimlist] == ["cat.jpg", "cup.jpg"]
    names = [Path(ds.sources[i]).name for i in ds.imlist]
    assert sorted(names) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]  # queries left out
    g0, g1 = ds.gnd
    assert [names[i] for i in g0["easy"]] == ["chelsea.jpg"] and g0["hard"] == []
    assert [names[i] for i in g0["junk"]] == ["astronaut.jpg"]
    assert g0["bbx"] == [5.0, 6.0, 100.5, 120.0]
    assert [names[i] for i in g1["easy"]] == ["coffee.jpg"] and [names[i] for i in g1["hard"]] == ["rocket.jpg"]
    w, h = Image.open(src / "queries" / "cup.jpg").size
    assert g1["bbx"] == [0.0, 0.0, float(w), float(h)]  # no box: whole image
    assert ds.has_ground_truth


def test_ground_truth_json(tmp_path, gt_src):
    gt = {"queries": [
        {"image": "queries/cat.jpg", "bbox": [5, 6, 100.5, 120], "positives": ["db/chelsea.jpg"],
         "junk": ["astronaut.jpg"]},
        {"image": str(gt_src / "queries" / "cup.jpg"), "easy": ["db/coffee.jpg"], "hard": ["./db/rocket.jpg"]}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    rep = convert(gt_src, tmp_path / "data", "g", ground_truth=tmp_path / "gt.json")
    assert rep.n_queries == 2 and rep.n_images == 4
    ds = load_dataset(tmp_path / "data", "g")
    _check_gt(ds, gt_src)
    # the pickle is what revisitop's configdataset reads: plain dict, same content
    with open(ds.gnd_path, "rb") as f:
        raw = pickle.load(f)
    assert set(raw) == {"imlist", "qimlist", "gnd"} and raw["gnd"][0]["bbx"] == [5.0, 6.0, 100.5, 120.0]
    # re-run without --ground-truth keeps it, with indices rebuilt for the new image list
    (gt_src / "db" / "rocket.jpg").unlink()
    write_photos(gt_src / "db2", ["coins"])
    rep2 = convert(gt_src, tmp_path / "data", "g")
    ds2 = load_dataset(tmp_path / "data", "g")
    assert rep2.n_queries == 2 and rep2.removed == [make_id("db/rocket.jpg")]
    names = [Path(ds2.sources[i]).name for i in ds2.imlist]
    assert ds2.gnd[1]["hard"] == [] and [names[i] for i in ds2.gnd[1]["easy"]] == ["coffee.jpg"]


def test_ground_truth_csv(tmp_path, gt_src):
    (tmp_path / "gt.csv").write_text(
        "query,x1,y1,x2,y2,positives,hard,junk\n"
        "queries/cat.jpg,5,6,100.5,120,db/chelsea.jpg,,db/astronaut.jpg\n"
        "queries/cup.jpg,,,,,db/coffee.jpg,db/rocket.jpg,\n", encoding="utf-8")
    convert(gt_src, tmp_path / "data", "g", ground_truth=tmp_path / "gt.csv")
    _check_gt(load_dataset(tmp_path / "data", "g"), gt_src)


@pytest.mark.parametrize("gt,match", [
    ({"queries": [{"image": "queries/nope.jpg", "positives": []}]}, "is not in"),
    ({"queries": [{"image": "queries/cat.jpg", "bbox": [500, 500, 600, 600], "positives": ["db/chelsea.jpg"]}]},
     "outside"),
    ({"queries": [{"image": "queries/cat.jpg", "bbox": [50, 50, 10, 60], "positives": []}]}, "empty"),
    ({"queries": [{"image": "queries/cat.jpg", "positives": ["queries/cup.jpg"]},
                  {"image": "queries/cup.jpg", "positives": []}]}, "also listed as a positive"),
    ({"queries": [{"image": "/etc/hostname", "positives": []}]}, "outside the source folder"),
    ({"queries": [{"positives": []}]}, "no \"image\""),
])
def test_ground_truth_errors(tmp_path, gt_src, gt, match):
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(DatasetError, match=match):
        convert(gt_src, tmp_path / "data", "g", ground_truth=tmp_path / "gt.json")
    with pytest.raises(DatasetError):
        load_dataset(tmp_path / "data", "g")  # nothing half-written


def test_ground_truth_with_bad_image_drops_it(tmp_path, gt_src):
    (gt_src / "db" / "broken.jpg").write_bytes(b"")
    gt = {"queries": [{"image": "queries/cat.jpg", "positives": ["db/chelsea.jpg", "db/broken.jpg"]}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    rep = convert(gt_src, tmp_path / "data", "g", ground_truth=tmp_path / "gt.json")
    assert any("broken.jpg" in w for w in rep.warnings)
    assert len(load_dataset(tmp_path / "data", "g").gnd[0]["easy"]) == 1


def test_ground_truth_box_is_in_upright_coordinates(tmp_path):
    s = tmp_path / "s"
    write_photos(s, ["coffee"])
    write_exif_rotated_jpeg(s / "q.jpg", photo_array("chelsea", 160), 6)  # stored 160x106, shown 106x160
    (tmp_path / "gt.json").write_text(json.dumps([{"image": "q.jpg", "bbox": [0, 0, 100, 150], "positives": []}]))
    rep = convert(s, tmp_path / "data", "r", ground_truth=tmp_path / "gt.json")
    assert rep.warnings == []


# ---- loading --------------------------------------------------------------------------------------------------------
def test_load_dataset_errors(tmp_path, src):
    with pytest.raises(DatasetError, match="not found") as ei:
        load_dataset(tmp_path / "data", "nope")
    assert "visearch convert" in str(ei.value)
    convert(src, tmp_path / "data", "t")
    with pytest.raises(DatasetError, match="datasets in .*: t"):
        load_dataset(tmp_path / "data", "nope")
    assert list_datasets(tmp_path / "data") == ["t"]
    (tmp_path / "data" / "t" / "sources.json").write_text("{broken")
    with pytest.raises(DatasetError, match="corrupt"):
        load_dataset(tmp_path / "data", "t")
    (tmp_path / "data" / "t" / "gnd_t.pkl").unlink()
    with pytest.raises(DatasetError, match="no gnd_t.pkl"):
        load_dataset(tmp_path / "data", "t")


# ---- restricted unpickler -------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_gnd_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "gnd_x.pkl"
    p.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil(marker)]}))
    with pytest.raises(DatasetError, match="refusing to load .*posix.system|refusing to load .*os.system"):
        read_gnd(p)
    assert not marker.exists()
    bytes_bomb = b"c__builtin__\nbytes\n(I1000000000000\ntR."  # bytes(10**12): a memory bomb
    for payload in (pickle.dumps(eval), pickle.dumps(shutil.rmtree), pickle.dumps(np.load), bytes_bomb):
        p.write_bytes(payload)
        with pytest.raises(DatasetError, match="not plain data"):
            read_gnd(p)


def test_gnd_pickle_garbage(tmp_path):
    p = tmp_path / "gnd_x.pkl"
    full = pickle.dumps({"imlist": ["a"] * 100, "qimlist": [], "gnd": []})
    for data, match in ((b"", "empty"), (full[: len(full) // 2], "truncated"), (b"hello", "truncated"),
                        (pickle.dumps([1, 2]), "expected a dict")):
        p.write_bytes(data)
        with pytest.raises(DatasetError, match=match):
            read_gnd(p)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_gnd_pickles_load(tmp_path, protocol):
    cfg = {"imlist": np.array(["a", "b", "c"]), "qimlist": ["q"],
           "gnd": [{"bbx": np.array([1.5, 2, 30, 40.25]), "easy": np.array([0, 2]), "hard": np.int64(1),
                    "junk": np.array([], dtype=np.int64)}]}
    p = tmp_path / "gnd.pkl"
    p.write_bytes(pickle.dumps(cfg, protocol=protocol))
    v = validate_gnd(read_gnd(p), p)
    assert v["imlist"] == ["a", "b", "c"]
    assert v["gnd"] == [{"easy": [0, 2], "hard": [1], "junk": [], "bbx": [1.5, 2.0, 30.0, 40.25]}]


def test_python2_style_pickle_loads(tmp_path):
    """The official gnd files are Python 2 pickles: str objects as bytes, numpy modules by their numpy 1.x names."""
    # protocol 2: {'imlist': ['x'], 'qimlist': [], 'gnd': []} with py2 byte strings (SHORT_BINSTRING)
    data = (b"\x80\x02}q\x00(U\x06imlistq\x01]q\x02U\x01xq\x03aU\x07qimlistq\x04]q\x05U\x03gndq\x06]q\x07u.")
    p = tmp_path / "gnd_py2.pkl"
    p.write_bytes(data)
    assert validate_gnd(read_gnd(p), p) == {"imlist": ["x"], "qimlist": [], "gnd": []}
    # numpy 1.x module path (numpy.core.multiarray) in a protocol-2 pickle
    data = pickle.dumps({"imlist": np.array(["x", "y"]), "qimlist": [], "gnd": []}, protocol=2)
    assert b"numpy._core.multiarray" in data
    p.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert validate_gnd(read_gnd(p), p)["imlist"] == ["x", "y"]


def test_validate_gnd_rejects_bad_structures(tmp_path):
    base = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 5, 5], "easy": [0], "junk": [1]}]}
    assert validate_gnd(base)["gnd"][0]["hard"] == []
    for bad, match in (({**base, "gnd": []}, "1 queries"),
                       ({**base, "gnd": [{"easy": [2]}]}, "out of range"),
                       ({**base, "gnd": [{"easy": [0.5]}]}, "non-integer"),
                       ({**base, "gnd": [{"easy": [0], "bbx": [5, 0, 1, 5]}]}, "not a box"),
                       ({**base, "imlist": ["a", "a"]}, "twice"),
                       ({"imlist": []}, "qimlist")):
        with pytest.raises(DatasetError, match=match):
            validate_gnd(bad)
    assert validate_gnd({**base, "gnd": [{"ok": [1], "junk": []}]})["gnd"][0]["easy"] == [1]  # old oxford5k style


# ---- existing revisitop datasets ------------------------------------------------------------------------------------
def _fake_revisitop(root: Path, name: str = "roxmini", bbx=(10.0, 20.5, 90.9, 100.2), easy=(0, 2)) -> Path:
    d = root / name
    (d / "jpg").mkdir(parents=True)
    for n, photo in (("all_souls_000001", "chelsea"), ("bodleian_000002", "coffee"), ("radcliffe_000003", "rocket"),
                     ("all_souls_000013", "astronaut")):
        Image.fromarray(photo_array(photo, 160)).save(d / "jpg" / f"{n}.jpg", quality=90)
    cfg = {"imlist": ["all_souls_000001", "bodleian_000002", "radcliffe_000003"], "qimlist": ["all_souls_000013"],
           "gnd": [{"bbx": list(bbx), "easy": list(easy), "hard": [1], "junk": []}]}
    with open(d / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump(cfg, f, protocol=2)
    return d


def test_import_revisitop_folder(tmp_path):
    d = _fake_revisitop(tmp_path / "downloads")
    rep = convert(d, tmp_path / "data", "oxf")
    assert rep.origin == "revisitop" and rep.n_images == 3 and rep.n_queries == 1 and len(rep.added) == 4
    ds = load_dataset(tmp_path / "data", "oxf")
    assert ds.imlist == ["all_souls_000001", "bodleian_000002", "radcliffe_000003"]
    assert ds.qimlist == ["all_souls_000013"]
    assert ds.gnd == [{"easy": [0, 2], "hard": [1], "junk": [], "bbx": [10.0, 20.5, 90.9, 100.2]}]
    assert ds.image_path(0).read_bytes() == (d / "jpg" / "all_souls_000001.jpg").read_bytes()  # linked, as is
    assert ds.query_path(0).resolve() == (d / "jpg" / "all_souls_000013.jpg").resolve()
    assert ds.load_options() == {"apply_exif": False, "allow_truncated": True}  # like the reference loader
    assert ds.sources["bodleian_000002"] == str(d / "jpg" / "bodleian_000002.jpg")
    again = convert(d, tmp_path / "data", "oxf")
    assert again.added == [] and again.unchanged == 4


def test_revisitop_folder_in_data_dir_used_in_place(tmp_path):
    d = _fake_revisitop(tmp_path / "data", "roxmini")
    ds = load_dataset(tmp_path / "data", "roxmini")  # no convert needed
    assert ds.origin == "revisitop" and ds.sources == {} and ds.source_path("bodleian_000002").endswith(".jpg")
    rep = convert(d, tmp_path / "data", "roxmini")  # converting it in place validates and records sources
    assert rep.n_images == 3 and not any(p.is_symlink() for p in (d / "jpg").iterdir())


@pytest.mark.parametrize("kw,match", [({"bbx": (500, 500, 600, 600)}, "outside"), ({"easy": (0, 7)}, "out of range")])
def test_revisitop_validation(tmp_path, kw, match):
    d = _fake_revisitop(tmp_path / "downloads", **kw)
    with pytest.raises(DatasetError, match=match):
        convert(d, tmp_path / "data", "oxf")


def test_revisitop_missing_image_and_gt_conflict(tmp_path):
    d = _fake_revisitop(tmp_path / "downloads")
    with pytest.raises(UsageError):
        convert(d, tmp_path / "data", "oxf", ground_truth=tmp_path / "gt.json")
    (d / "jpg" / "bodleian_000002.jpg").unlink()
    with pytest.raises(DatasetError, match="missing"):
        convert(d, tmp_path / "data", "oxf")


def test_write_gnd_is_plain_and_atomic(tmp_path):
    p = tmp_path / "gnd_z.pkl"
    write_gnd(p, ["a"], ["q"], [{"bbx": np.array([1, 2, 3, 4]), "easy": np.array([0]), "hard": [], "junk": []}])
    with open(p, "rb") as f:
        assert pickle.load(f)["gnd"][0] == {"bbx": [1.0, 2.0, 3.0, 4.0], "easy": [0], "hard": [], "junk": []}
    assert [x.name for x in tmp_path.iterdir()] == ["gnd_z.pkl"]
