"""The real CLI in subprocesses on real photos: convert -> extract -> query, output formats and bad input."""
import json

from tests.clitools import run


def test_rescaled_and_cropped_copies_find_their_source_at_rank_1(collection):
    q = collection["queries"]
    args = [str(p) for p in q.values()]
    p = run("query", *args, "--dataset", "shop", "--model", "lite", "--json", "--device", "cpu",
            data_dir=collection["data"])
    lines = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert len(lines) == len(args)
    for obj, (key, path) in zip(lines, q.items()):
        name = key.split("-")[0]
        assert obj["query"] == str(path) and obj["model"] == "lite"
        crop = obj["crops"][0]
        assert crop["label"] == "whole image" and crop["score"] is None and len(crop["box"]) == 4
        top = crop["results"][0]
        assert top["rank"] == 1
        assert top["path"] == str(collection["sources"][name]), (key, crop["results"][:3])
        assert len(crop["results"]) == 5
        scores = [r["score"] for r in crop["results"]]
        assert scores == sorted(scores, reverse=True)
        assert obj["merged"][0]["path"] == top["path"]


def test_paths_from_stdin_and_list_file(collection):
    q = list(collection["queries"].values())[:2]
    p = run("query", "-", "--dataset", "shop", "--paths", "--top-k", "2", data_dir=collection["data"],
            input="\n".join(map(str, q)) + "\n")
    out = p.stdout.splitlines()
    assert len(out) == 4 and all(not ln.startswith("{") for ln in out)
    assert out[0] == str(collection["sources"]["chelsea"])
    lst = collection["base"] / "list.txt"
    lst.write_text("\n".join(map(str, q)))
    p2 = run("query", lst, "--dataset", "shop", "--paths", "--top-k", "2", data_dir=collection["data"])
    assert p2.stdout == p.stdout


def test_table_output_and_quiet(collection):
    q = collection["queries"]["coffee-small"]
    p = run("--quiet", "query", q, "--dataset", "shop", data_dir=collection["data"])
    assert "rank" in p.stdout and "coffee.jpg" in p.stdout
    assert p.stderr == ""


def test_quiet_and_verbose_after_the_command(collection, tmp_path):
    """`visearch extract shop --quiet` (the flag after the command, as the docs show it) silences the progress bar."""
    photos = tmp_path / "two"
    photos.mkdir()
    for name in ("chelsea", "coffee"):
        (photos / f"{name}.jpg").write_bytes(collection["sources"][name].read_bytes())
    data = tmp_path / "data"
    p = run("convert", photos, "--name", "two", "--quiet", data_dir=data)
    assert p.stderr == "" and "2 database images" in p.stdout
    p = run("extract", "two", "--device", "cpu", "--quiet", "--json", data_dir=data)
    assert p.stderr == "" and json.loads(p.stdout)["added"] == 2
    p = run("extract", "two", "--device", "cpu", "--rebuild", "-v", data_dir=data)  # progress bar without --quiet
    assert "2 added" in p.stdout and "img/s" in p.stderr
    p = run("query", collection["queries"]["coffee-small"], "--dataset", "two", "-q", "--top-k", "1", "--paths",
            data_dir=data)
    assert p.stderr == "" and p.stdout.strip().endswith("coffee.jpg")


def test_same_file_name_in_two_folders_gets_two_ids(collection):
    p = run("query", collection["queries"]["chelsea-small"], "--dataset", "shop", "--json", "--top-k", "8",
            data_dir=collection["data"])
    res = json.loads(p.stdout)["crops"][0]["results"]
    ids = [r["id"] for r in res]
    assert len(ids) == len(set(ids)) == 8
    assert sum(r["path"].endswith("chelsea.jpg") for r in res) == 2


def test_extract_again_is_incremental(collection):
    p = run("extract", "shop", "--json", data_dir=collection["data"])
    r = json.loads(p.stdout)
    assert r["added"] == 0 and r["updated"] == 0 and r["removed"] == 0 and r["total"] == 9


def _fails(p, *words):
    assert p.returncode != 0, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w.lower() in p.stderr.lower(), p.stderr


def test_bad_input_one_line_errors(collection, tmp_path):
    data = collection["data"]
    _fails(run("query", collection["queries"]["coffee-small"], "--dataset", "nope", data_dir=data, check=False),
           "nope")
    _fails(run("query", collection["queries"]["coffee-small"], "--dataset", "shop", "--model", "bogus",
               data_dir=data, check=False), "unknown model", "lite")
    _fails(run("extract", "shop", "--device", "cuda", data_dir=data, check=False), "cuda")
    # bad query images in one batch: one error line each, the good query still answered, exit code 1
    text = tmp_path / "notes.jpg"
    text.write_text("hello, not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(collection["queries"]["coffee-small"].read_bytes()[:700])
    good = collection["queries"]["coffee-small"]
    p = run("query", text, empty, tmp_path / "missing.jpg", truncated, good, "--dataset", "shop", "--paths",
            data_dir=data, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    errors = p.stderr.strip().splitlines()
    assert len(errors) == 4, p.stderr
    for line, name in zip(errors, ["notes.jpg", "empty.jpg", "missing.jpg", "cut.jpg"]):
        assert line.startswith("error:") and name in line, line
    assert p.stdout.splitlines()[0].endswith("coffee.jpg")


def test_dataset_without_descriptors(collection, tmp_path):
    data = tmp_path / "data"
    run("convert", collection["photos"] / "set a", "--name", "fresh", data_dir=data)
    p = run("query", collection["queries"]["coffee-small"], "--dataset", "fresh", data_dir=data, check=False)
    _fails(p, "extract")
