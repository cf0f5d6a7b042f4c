"""`visearch serve` as a real subprocess on a free loopback port: every route, every error code, token auth beyond
loopback, path traversal, 20 concurrent queries, the page in a real headless Chromium (Debian /usr/bin/chromium driven by
Playwright; no downloaded browser), clean shutdown."""
import base64
import io
import json
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.e2e.fast_cli import cli  # noqa: E402
from tests.e2e.servetools import Server, live_server, serve_collection  # noqa: E402, F401, F811


def upload(srv, path_or_bytes, name="q.jpg", **fields):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return requests.post(srv.url + "/api/query", files={"image": (name, data, "image/jpeg")},
                         data={k: str(v) for k, v in fields.items()}, timeout=60)


def test_health_lists_the_served_dataset(live_server):
    r = requests.get(live_server.url + "/api/health", timeout=5)
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok"
    assert h["datasets"] == {"shop": {"models": ["lite"], "images": 6}}
    assert {"none", "tiles"} <= set(h["detectors"])


def test_upload_answers_exactly_what_query_json_prints(live_server, serve_collection):
    q = serve_collection["queries"]["coffee-crop"]
    r = upload(live_server, q, name=q.name, top_k=3)
    assert r.status_code == 200, r.text
    got = r.json()
    timings = got.pop("timings_ms")
    assert set(timings) >= {"detect", "describe", "search", "rerank", "total"}
    assert all(v >= 0 for v in timings.values()) and timings["total"] >= timings["describe"]
    p = cli("-q", "query", q, "--dataset", "shop", "--top-k", "3", "--device", "cpu", "--json",
            data=serve_collection["data"])
    want = json.loads(p.stdout)
    assert want.pop("query") == str(q) and got.pop("query") == q.name
    assert got == want  # same crops, boxes, ids, paths and scores to the 6th decimal
    assert got["merged"][0]["id"].startswith("coffee")


def test_more_like_this_by_id_and_options(live_server, photos):
    first = upload(live_server, photos["rocket"], top_k=2).json()
    iid = first["merged"][0]["id"]
    r = requests.post(live_server.url + "/api/query", json={"dataset": "shop", "model": "lite", "id": iid, "top_k": 4},
                      timeout=60)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["query"] == iid and len(res["merged"]) == 4 and res["merged"][0]["id"] == iid
    assert res["merged"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    # a drawn region is searched alone; a prompt with the tiles detector gives many crops + the whole image
    boxed = requests.post(live_server.url + "/api/query", json={"id": iid, "box": "10,20,120,90", "rerank": False},
                          timeout=60).json()
    assert [c["label"] for c in boxed["crops"]] == ["region"] and boxed["crops"][0]["box"] == [10.0, 20.0, 120.0, 90.0]
    tiled = upload(live_server, photos["coffee"], prompt="cup", top_k=1).json()
    assert len(tiled["crops"]) > 5 and tiled["crops"][-1]["label"] == "whole image"
    assert [m["rank"] for m in tiled["merged"]] == [1]


@pytest.fixture
def photos(serve_collection):
    return serve_collection["photos"]


def test_thumbnail_by_id(live_server, photos):
    ids = [m["id"] for m in upload(live_server, photos["chelsea"], top_k=6).json()["merged"]]
    r = requests.get(f"{live_server.url}/api/image/shop/{ids[0]}", params={"size": 96}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and max(im.size) == 96
    w, h = map(int, r.headers["x-image-size"].split(","))
    assert (w, h) == Image.open(photos["chelsea"]).size


def _png_claiming(width, height) -> bytes:
    """A tiny valid-looking PNG whose header claims width x height (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize("case", ["text", "empty", "truncated", "bomb"])
def test_bad_images_get_400_with_one_line(live_server, photos, case):
    jpg = photos["camera"].read_bytes()
    body = {"text": b"hello, this is not a photo", "empty": b"", "truncated": jpg[: len(jpg) // 3],
            "bomb": _png_claiming(40000, 40000)}[case]
    r = upload(live_server, body, name="bad.jpg")
    assert r.status_code == 400, r.text
    msg = r.json()["error"]
    assert "\n" not in msg and "Traceback" not in msg and "bad.jpg" in msg
    if case == "bomb":
        assert "decompression-bomb" in msg


def test_error_codes(live_server, photos):
    u = live_server.url
    jpg = photos["coins"]
    assert upload(live_server, jpg, dataset="nope").status_code == 404
    assert upload(live_server, jpg, model="superglobal").status_code == 404
    assert upload(live_server, jpg, detector="gdino").status_code == 404
    assert requests.post(u + "/api/query", json={"id": "no-such-id"}, timeout=10).status_code == 404
    for bad in ({"top_k": "0"}, {"top_k": "many"}, {"box": "1,2,3"}, {"box": "5,5,1,1"}, {"rerank": "maybe"}):
        r = upload(live_server, jpg, **bad)
        assert r.status_code == 400 and list(r.json()) == ["error"], (bad, r.text)
    assert requests.post(u + "/api/query", json={"id": "x", "evil": 1}, timeout=10).status_code == 400
    assert requests.post(u + "/api/query", data=b"{not json", headers={"Content-Type": "application/json"},
                         timeout=10).status_code == 400
    assert requests.post(u + "/api/query", data={"dataset": "shop"}, timeout=10).status_code == 400  # no image
    big = b"\xff\xd8" + b"0" * (21 * 1024 * 1024)
    r = upload(live_server, big, name="big.jpg")
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert requests.get(u + "/api/image/shop/x", params={"size": 5000}, timeout=10).status_code == 400
    assert requests.get(u + "/no/such/page", timeout=10).status_code == 404


@pytest.mark.parametrize("path", ["/api/image/shop/..%2F..%2Fgnd_shop.pkl", "/api/image/shop/%2Fetc%2Fpasswd",
                                  "/api/image/shop/../../etc/passwd", "/api/image/shop/..", "/api/image/../shop/x",
                                  "/api/image/shop/%2e%2e%2fsources.json", "/static/..%2Fapp.py", "/static/service.py",
                                  "/api/image/shop/jpg%5C..%5C..%5Cgnd_shop.pkl"])
def test_path_traversal_is_refused(live_server, path):
    # raw request line: requests would normalise the dots away
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status in (400, 404), (path, resp.status)
    assert b"root:" not in body and b"def " not in body and b"\x80" not in body


def test_twenty_concurrent_queries_all_answered_and_health_stays_fast(live_server, photos):
    photos = [photos[n] for n in ("chelsea", "astronaut", "coffee", "rocket", "coins")]
    health_times = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            t0 = time.perf_counter()
            assert requests.get(live_server.url + "/api/health", timeout=10).status_code == 200
            health_times.append(time.perf_counter() - t0)
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with ThreadPoolExecutor(20) as ex:
            results = list(ex.map(lambda i: upload(live_server, photos[i % 5], name=f"q{i}.jpg", top_k=2),
                                  range(20)))
    finally:
        stop.set()
        poller.join()
    assert [r.status_code for r in results] == [200] * 20
    assert all(r.json()["query"] == f"q{i}.jpg" for i, r in enumerate(results))
    assert all(r.json()["merged"][0]["id"].startswith(p.stem) for r, p in zip(results, photos * 4))
    assert health_times and max(health_times) < 2.0


CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _skip(reason: str):
    print(f"SKIPPED browser test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        _skip(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run does it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("the playwright Python package is not installed (pip install -e '.[dev]')")
    profile = tempfile.mkdtemp(prefix="visearch-chromium-")  # an empty user data dir
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                   viewport={"width": 1280, "height": 1000})
        try:
            page = ctx.new_page()
            page.set_default_timeout(30000)
            yield page
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def _images_loaded(page) -> bool:
    for _ in range(150):
        if page.locator(".hit img").evaluate_all("els => els.length && els.every(i => i.complete && i.naturalWidth)"):
            return True
        page.wait_for_timeout(100)
    return False


def test_page_in_a_real_browser(live_server, serve_collection, browser_page, tmp_path):
    """Headless Chromium on the page: upload, crop boxes and thumbnails, click a result, prompt + tiles, reload
    the shared URL, a bad file's message."""
    from playwright.sync_api import expect

    srv = live_server
    page = browser_page
    problems = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    requests_seen = []
    page.on("request", lambda r: requests_seen.append(r.url))
    page.goto(srv.url + "/")
    expect(page.locator("#server-status")).to_contain_text("shop (6 images)")
    # upload a photo: one search with the whole image
    page.set_input_files("#file", str(serve_collection["queries"]["coffee-crop"]))
    expect(page.locator(".crop-row")).to_have_count(1)
    assert _images_loaded(page), "thumbnails did not load"
    expect(page.locator(".hit")).to_have_count(5)
    assert page.locator(".hit .id").first.inner_text().startswith("coffee")
    expect(page.locator("#overlay rect.crop")).to_have_count(1)
    expect(page.locator("#timings")).to_contain_text("describe")
    assert page.locator("#download").get_attribute("href").startswith("blob:")
    page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)

    # click the second result: a new search with that stored image, its id in the URL
    second = page.locator(".hit").nth(1)
    clicked = second.get_attribute("data-id")
    second.click()
    expect(page.locator("#query-label")).to_contain_text(clicked)
    assert f"id={clicked}" in page.url
    assert page.locator(".crop-row .hit .id").first.inner_text() == clicked  # it finds itself first

    # drag a box on the photo: only that region is searched (one crop labelled "region"), drawn dashed on the photo
    ov = page.locator("#overlay").bounding_box()
    page.mouse.move(ov["x"] + ov["width"] * 0.2, ov["y"] + ov["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(ov["x"] + ov["width"] * 0.5, ov["y"] + ov["height"] * 0.45, steps=5)
    page.mouse.move(ov["x"] + ov["width"] * 0.7, ov["y"] + ov["height"] * 0.8, steps=5)
    page.mouse.up()
    expect(page.locator(".crop-row h2").first).to_contain_text("region")
    expect(page.locator("#overlay rect.drawn")).to_have_count(1)
    x0, y0, x1, y1 = (float(v) for v in page.locator(".crop-row h2").first.inner_text().split("[")[1].rstrip("]").split(","))
    size = Image.open(serve_collection["photos"][clicked.split("-")[0]]).size
    assert x0 == pytest.approx(0.2 * size[0], abs=3) and y1 == pytest.approx(0.8 * size[1], abs=3)
    page.click("#clear-box")
    expect(page.locator(".crop-row h2").first).to_contain_text("whole image")
    expect(page.locator("#overlay rect.drawn")).to_have_count(0)

    # a prompt with the tiles detector: numbered, coloured crop boxes and one row per crop + merged
    page.fill("#prompt", "cup")
    page.select_option("#detector", "tiles")
    page.fill("#top-k", "3")
    page.click("#search")
    expect(page.locator(".crop-row.merged")).to_have_count(1)
    n_crops = page.locator(".crop-row").count() - 1
    assert n_crops > 5
    expect(page.locator("#overlay rect.crop")).to_have_count(n_crops - 1)  # all but the whole image
    expect(page.locator("#overlay text.crop-number").first).to_have_text("1")
    assert "prompt=cup" in page.url and "top_k=3" in page.url
    assert _images_loaded(page)

    # the shared URL reloads the same search
    page.goto(page.url)
    expect(page.locator("#query-label")).to_contain_text(clicked)
    expect(page.locator(".crop-row.merged")).to_have_count(1)
    assert page.input_value("#prompt") == "cup"
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    # drop a photo on the drop zone, then paste one: each starts a search with that file
    b64 = base64.b64encode(serve_collection["photos"]["rocket"].read_bytes()).decode()
    make_transfer = """(b64) => { const bin = atob(b64); const u = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
        const dt = new DataTransfer(); dt.items.add(new File([u], NAME, {type: "image/jpeg"})); return dt; }"""
    dropped = page.evaluate_handle(make_transfer.replace("NAME", "'dropped.jpg'"), b64)
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    expect(page.locator("#query-label")).to_contain_text("dropped.jpg")
    pasted = page.evaluate_handle(make_transfer.replace("NAME", "'pasted.jpg'"), b64)
    page.evaluate("(dt) => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt}))", pasted)
    expect(page.locator("#query-label")).to_contain_text("pasted.jpg")
    assert page.locator(".hit .id").first.inner_text().startswith("rocket")

    # a file that is not an image: a clear message, not a broken page
    bad = tmp_path / "notes.jpg"
    bad.write_text("these are notes, not a photo")
    page.set_input_files("#file", str(bad))
    expect(page.locator("#error")).to_contain_text("not an image")
    assert (tmp_path / "page.png").stat().st_size > 10000
    assert all(u.startswith(srv.url) or u.startswith(("blob:", "data:")) for u in requests_seen), \
        [u for u in requests_seen if not u.startswith(srv.url)]
    assert [p for p in problems if "400" not in p] == []  # the bad upload logs its 400, nothing else may fail


def test_ctrl_c_stops_cleanly_without_traceback(live_server):
    """Runs last in this module (pytest keeps file order): the shared server is stopped here."""
    code, err = live_server.stop(signal.SIGINT)
    assert code == 0, err
    assert "Traceback" not in err and "stopped" in err


def test_token_required_beyond_loopback_and_never_logged(serve_collection, photos, tmp_path):
    data = serve_collection["data"]
    p = cli("serve", "--dataset", "shop", "--host", "0.0.0.0", "--port", "1", data=data, check=False, timeout=60)
    assert p.returncode != 0 and "--token-file" in p.stderr and "Traceback" not in p.stderr
    token = "s3cret-" + "x" * 24
    tf = tmp_path / "token"
    tf.write_text(token + "\n")
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"  # `visearch ui` opens the page with $BROWSER
    browser.write_text(f"#!/bin/sh\necho \"$1\" > {opened}\n")
    browser.chmod(0o755)
    srv = Server(["--dataset", "shop", "--device", "cpu", "--token-file", tf], data, host="0.0.0.0", command="ui",
                 env={"BROWSER": str(browser)})
    try:
        srv.wait()
        u = srv.url
        assert requests.get(u + "/api/health", timeout=5).status_code == 401
        assert requests.get(u + "/api/health", headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
        assert requests.get(u + "/api/image/shop/x", timeout=5).status_code == 401
        ok = {"Authorization": f"Bearer {token}"}
        assert requests.get(u + "/api/health", headers=ok, timeout=5).status_code == 200
        assert requests.get(u + "/api/health", cookies={"visearch_token": token}, timeout=5).status_code == 200
        r = requests.post(u + "/api/query", headers=ok, files={"image": ("a.jpg", photos["rocket"].read_bytes())},
                          timeout=60)
        assert r.status_code == 200, r.text
        assert requests.get(u + "/", timeout=5).status_code == 200  # the page itself holds no data
        for _ in range(50):
            if opened.exists():
                break
            time.sleep(0.1)
        assert opened.read_text().strip() == f"http://127.0.0.1:{srv.port}/"
    finally:
        code, err = srv.stop(signal.SIGTERM)
    assert code == 0, err
    assert token not in err and "GET /api/health" in err  # the access log is on, without the token
    assert "Traceback" not in err
