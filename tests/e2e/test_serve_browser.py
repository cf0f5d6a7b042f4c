"""The page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright, no downloaded browser):
upload a photo, see crop boxes and thumbnails, click a result, see a new search; prompt + tiles gives numbered crops."""
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.e2e.servetools import Server, serve_collection  # noqa: E402, F401

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


def test_page_upload_results_click_and_prompt(serve_collection, browser_page, tmp_path):
    from playwright.sync_api import expect

    srv = Server(["--dataset", "shop", "--device", "cpu", "--detector", "tiles"], serve_collection["data"])
    page = browser_page
    problems = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    requests_seen = []
    page.on("request", lambda r: requests_seen.append(r.url))
    try:
        srv.wait()
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

        # a file that is not an image: a clear message, not a broken page
        bad = tmp_path / "notes.jpg"
        bad.write_text("these are notes, not a photo")
        page.set_input_files("#file", str(bad))
        expect(page.locator("#error")).to_contain_text("not an image")
    finally:
        code, err = srv.stop()
    assert (tmp_path / "page.png").stat().st_size > 10000
    assert all(u.startswith(srv.url) or u.startswith(("blob:", "data:")) for u in requests_seen), \
        [u for u in requests_seen if not u.startswith(srv.url)]
    assert [p for p in problems if "400" not in p] == []  # the bad upload logs its 400, nothing else may fail
    assert code == 0 and "Traceback" not in err
