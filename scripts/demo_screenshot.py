"""Screenshot of the browser demo on the embedded toy model: ``python scripts/demo_screenshot.py docs/img/demo.png``.

Starts the demo on a free local port, types a prompt, generates (seed 0, default settings), and saves the page.
Needs Debian's Chromium at /usr/bin/chromium and the ``playwright`` package (installed by ``scripts/setup.sh``).
"""

from __future__ import annotations

import argparse
import io
import logging
import socket
from pathlib import Path

import PIL.Image

from detailpp.demo import build_demo, launch
from detailpp.models.loading import load_pipeline

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ARGS += ["--disable-sync", "--no-first-run", "--disable-quic"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("--prompt", default="a red circle next to a striped blue square")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    from playwright.sync_api import expect, sync_playwright

    demo = build_demo(load_pipeline("toy", device="cpu"), model_name="toy", initial_prompt="")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, host="127.0.0.1", port=port, block=False)
    url = f"http://127.0.0.1:{port}/"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(url) else r.abort())
        page.goto(url)
        page.locator("#detailpp-prompt textarea").fill(args.prompt)
        page.locator("#detailpp-parse").click()
        expect(page.locator('#detailpp-plan [data-testid="cell-1-2"]')).not_to_be_empty(timeout=30_000)
        page.locator("#detailpp-generate").click()
        expect(page.locator("#detailpp-branches img").first).to_be_visible(timeout=180_000)
        expect(page.locator("#detailpp-plain img")).to_be_visible(timeout=180_000)
        png = page.screenshot(full_page=True)
        browser.close()
    with PIL.Image.open(io.BytesIO(png)) as img:
        img.convert("RGB").quantize(colors=128, dither=PIL.Image.Dither.NONE).save(args.output, optimize=True)
    demo.close()


if __name__ == "__main__":
    main()
