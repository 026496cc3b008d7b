"""A real browser (Playwright + Debian Chromium, headless) drives the app with a tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def app_url():
    from test_app import GEN, free_port, tiny_model

    from pathvlm.ui import build_demo, launch_demo

    demo = build_demo(tiny_model(), max_new_tokens=6, generation=GEN)
    port = free_port()
    launch_demo(demo, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_browser_upload_ask_report_screenshot(app_url, ihc_png, tmp_path):
    from playwright import sync_api

    os.environ.setdefault("PLAYWRIGHT_BROWSERS_PATH", str(tmp_path / "none"))  # never download one
    shot = tmp_path / "app.png"
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), headless=True,
                                                    executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = ctx.new_page()
            page.set_default_timeout(60_000)
            # expect() has its own 5 s default; a loaded 2-core box can take longer to stream an answer
            sync_api.expect.set_options(timeout=60_000)
            page.goto(app_url)
            page.locator("#upload input[type=file]").set_input_files(str(ihc_png))
            page.locator("#open").click()
            status = page.locator("#status")
            sync_api.expect(status).to_contain_text("Opened ihc")
            page.locator("#question textarea").fill("What tissue is this?")
            page.locator("#send").click()
            sync_api.expect(status).to_contain_text("done")
            chat = page.locator("#chatbot")
            sync_api.expect(chat).to_contain_text("What tissue is this?")
            page.get_by_role("tab", name="Report").click()
            page.locator("#report-colorectal_biopsy").click()
            sync_api.expect(page.locator("#report")).to_contain_text("DRAFT")
            sync_api.expect(status).to_contain_text("Drafted colorectal_biopsy")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            ctx.close()
    assert shot.stat().st_size > 10_000
