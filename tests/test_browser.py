"""The app in a real browser: Debian's chromium driven by playwright (never a downloaded browser).

A person's path through the Generate tab on the tiny engine: open the page, see the engine-check banner, upload a
group photo, pick a face, pick a style, generate, see the results with their similarity captions. The final page
is saved as docs/screenshot.png, which the README shows.
"""

import re
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOT = ROOT / "docs" / "screenshot.png"
TIMEOUT_MS = 90_000  # the tiny engine on a shared CPU: generous, a real failure still shows up as a timeout

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api")

import app  # noqa: E402
from infinite_id.models.engines import TINY_BANNER, load_engine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    engine = load_engine("tiny")
    demo = app.build_demo(lambda: engine.pipe, lambda: engine.face_analyzer, engine="tiny", banner=engine.banner)
    port = free_port()
    app.enable_queue(demo).launch(
        **app.launch_options("127.0.0.1", port, demo=demo), prevent_thread_lock=True, quiet=True
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.page_errors = errors
        yield page
        browser.close()


def test_upload_pick_face_and_style_generate_and_see_the_gallery(page):
    expect = sync_api.expect
    expect(page.locator("#engine-banner")).to_contain_text(TINY_BANNER)

    # Upload a photo with three people: the detected faces appear, the largest picked.
    page.locator("#photo input[type=file]").set_input_files(str(ROOT / "assets" / "synthetic_group.png"))
    expect(page.get_by_text("3 faces found")).to_be_visible()
    thumbnails = page.locator("#faces .thumbnail-item")
    expect(thumbnails).to_have_count(3)
    thumbnails.nth(1).click()
    expect(page.locator("#face-index input")).to_have_value("1")
    expect(page.get_by_text("Using face 1.")).to_be_visible()

    # Pick a style from the dropdown.
    page.locator("#style input").click()
    page.get_by_role("option", name="Watercolor", exact=True).click()
    expect(page.locator("#style input")).to_have_value("Watercolor")

    page.locator("#generate-btn").click()
    results = page.locator("#results img")
    expect(results.first).to_be_visible()
    expect(page.locator("#generation-info")).to_contain_text(re.compile(r"style Watercolor · seed \d+"))
    expect(page.locator("#results")).to_contain_text("identity")
    assert not page.page_errors, page.page_errors

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
