"""Regenerate docs/serve-page.png: the page of a running `visearch serve` in headless Chromium (Playwright driving
Debian's /usr/bin/chromium).

    visearch serve --dataset demo --model lite --detector tiles &      # after `make demo`
    python docs/serve_screenshot.py http://127.0.0.1:8421 demo/photos/queries/coffee-crop.jpg docs/serve-page.png
"""
import sys
import tempfile

from playwright.sync_api import expect, sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(url: str, photo: str, out: str) -> None:
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(tempfile.mkdtemp(), executable_path="/usr/bin/chromium",
                                                   headless=True, args=ARGS, viewport={"width": 1100, "height": 860})
        page = ctx.new_page()
        page.goto(url + "/?top_k=4")
        page.wait_for_selector("#dataset option", state="attached")
        page.fill("#prompt", "cup")
        page.select_option("#detector", "tiles")
        page.set_input_files("#file", photo)
        expect(page.locator(".crop-row.merged")).to_have_count(1, timeout=60000)
        for _ in range(100):
            if page.locator(".hit img").evaluate_all("els => els.every(i => i.complete && i.naturalWidth)"):
                break
            page.wait_for_timeout(100)
        page.screenshot(path=out)
        ctx.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
