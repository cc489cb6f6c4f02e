"""The app in a real browser: Debian's chromium driven by playwright (never a downloaded browser), on the tiny
engine with a tiny IP-Adapter-FaceID-PlusV2 file (so the adapter's LoRA slider shows) and the production serving
settings, at a phone's size (390x844) and a desktop's (1366x900).

Every tab is driven as a person would (upload a photo of two people and pick a face, take an example, generate;
a strength grid too big to keep whole; a mix with a face-less Person A, then the mix example), and after each
step the page is measured: nothing wider than the viewport and no text cut off by its box (the check is
``MEASURE`` below). The error stays in the tab's status line after its pop-up has gone, naming the photo it is
about. The identity note sits under every tab's results and the "Models and licences" section opens and fits,
also with the real engine's longer rows. A second test has two people queue for the one GPU slot: the
second sees their place and a time estimate, the first one progress bar and a Stop that says where it stopped.

Screenshots of each tab at both sizes go to a temporary folder, or to docs/screenshots/ (what the README and
docs/ui.md show) when INFINITE_ID_SCREENSHOTS=1 is set.
"""

import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 90_000  # the tiny engine on a shared CPU: generous, a real failure still shows up as a timeout
SIZES = {"phone": (390, 844), "desktop": (1366, 900)}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api")
sync_api.expect.set_options(timeout=TIMEOUT_MS)

from app_server import ASSETS, serve  # noqa: E402
from PIL import Image  # noqa: E402

from infinite_id.faces.tiny_pack import synthetic_face_photo  # noqa: E402
from infinite_id.models.engines import TINY_BANNER  # noqa: E402
from infinite_id.models.licences import licence_rows  # noqa: E402
from infinite_id.ui import load_examples, widgets  # noqa: E402

# Every visible text or picture that leaves the viewport or is cut by a box that clips (overflow other than
# visible), every component label that runs under its component's buttons, and every text field whose value is
# wider than the field: what a person sees as "clipped" or "scrolls sideways".
MEASURE = """() => {
  const vw = document.documentElement.clientWidth, problems = [];
  const shown = el => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden';
  const name = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + '.' + String(el.className).split(' ')[0];
  const cut = (r, el) => {  // off the screen, or cut by any ancestor that clips (overflow other than visible)
    if (r.right > vw + 1 || r.left < -1) return 'the screen';
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      if (getComputedStyle(a).overflowX === 'visible') continue;
      const box = a.getBoundingClientRect();
      if (box.width > 0 && (r.right > box.right + 1 || r.left < box.left - 1)) return name(a);
    }
    return null;
  };
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode, text = node.textContent.trim(), el = node.parentElement;
    if (!text || !el || !shown(el) || el.closest('[aria-hidden=true], .visually-hidden, script, style')) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    for (const r of range.getClientRects()) {
      const by = r.width >= 1 && r.height >= 1 && cut(r, el);
      if (by) { problems.push(['text cut', name(el), text.slice(0, 60), by]); break; }
    }
  }
  for (const img of document.querySelectorAll('img')) {  // a picture cut off at the side (a thumbnail, a result)
    const by = shown(img) && img.getBoundingClientRect().width >= 2 && cut(img.getBoundingClientRect(), img);
    if (by) problems.push(['picture cut', name(img), img.alt || img.src.slice(-40), by]);
  }
  for (const label of document.querySelectorAll('[data-testid=block-label]')) {  // a label under its buttons
    const r = label.getBoundingClientRect(), block = label.closest('.block');
    if (!shown(label) || !block || r.width < 1) continue;
    for (const buttons of block.querySelectorAll('.icon-button-wrapper')) {
      const b = buttons.getBoundingClientRect();
      if (shown(buttons) && b.width > 0 && r.left < b.right && b.left < r.right && r.top < b.bottom && b.top < r.bottom)
        problems.push(['label under buttons', name(block), label.innerText.slice(0, 60)]);
    }
  }
  for (const el of document.querySelectorAll('input[type=text], input:not([type]), input[type=number], textarea'))
    if (shown(el) && el.value && el.scrollWidth > el.clientWidth + 1)
      problems.push(['value clipped', name(el), el.value.slice(0, 60)]);
  return {scrollWidth: document.documentElement.scrollWidth, viewport: vw, problems};
}"""


# The progress bars a person can see (Gradio keeps its own in the page at opacity 0 when they are off), each named
# by the id of the element it is in.
SHOWN_PROGRESS_BARS = """() => [...document.querySelectorAll('[role=progressbar]')].filter(bar => {
  for (let el = bar; el; el = el.parentElement) {
    const st = getComputedStyle(el);
    if (st.display === 'none' || st.visibility === 'hidden' || st.opacity === '0') return false;
  }
  return bar.getClientRects().length > 0;
}).map(bar => bar.closest('[id]:not([id^=html-])').id)"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = ROOT / "docs" / "screenshots" if os.environ.get("INFINITE_ID_SCREENSHOTS") else None
    folder = folder or tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def no_face(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "landscape.png"
    synthetic_face_photo(256, faces=[], seed=2).save(path)
    return path


@pytest.fixture(scope="module")
def two_people(tmp_path_factory) -> Path:
    """The two example photos side by side: a real photo with two faces, the astronaut's the larger."""
    both = Image.new("RGB", (1024, 512))
    for x, name in ((0, "astronaut.jpg"), (512, "camera.jpg")):
        with Image.open(ASSETS / name) as photo:
            both.paste(photo.convert("RGB"), (x, 0))
    path = tmp_path_factory.mktemp("photos") / "two-people.jpg"
    both.save(path, quality=92)
    return path


def open_page(browser, url, size):
    """A fresh browser session (its own Gradio session) at ``size``; page errors are collected."""
    width, height = size
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.page_errors = []
    page.on("pageerror", lambda error: page.page_errors.append(str(error)))
    page.goto(url)
    sync_api.expect(page.locator("#photo")).to_be_visible()
    return page


def assert_fits(page, where: str) -> None:
    page.wait_for_timeout(400)  # let the layout settle after the last change
    found = page.evaluate(MEASURE)
    assert found["scrollWidth"] <= found["viewport"], f"{where}: the page scrolls sideways ({found})"
    assert not found["problems"], f"{where}: text cut off or off-screen: {found['problems']}"


def screenshot(page, path: Path) -> None:
    """The whole page, as a JPEG: the tiny engine's images are noise, which PNG cannot make small."""
    page.screenshot(path=str(path), full_page=True, type="jpeg", quality=70)
    assert path.stat().st_size > 10_000


def set_number(page, slider: str, value) -> None:
    """Types ``value`` into a slider's number box and waits until the slider itself holds it.

    Typing into a box that Gradio is still mounting (an accordion just opened) can be overwritten by the
    starting value, so the typing is repeated until the range input agrees (then the next click carries it)."""
    field, track = page.locator(f"{slider} input[type=number]"), page.locator(f"{slider} input[type=range]")
    for _ in range(5):
        field.fill(str(value))
        field.press("Enter")
        try:
            sync_api.expect(track).to_have_value(str(value), timeout=3000)
            return
        except AssertionError:
            continue
    sync_api.expect(track).to_have_value(str(value))


def drive_generate(page, shots: Path, width: int, two_people: Path) -> None:
    expect = sync_api.expect
    expect(page.locator("#engine-banner")).to_contain_text(TINY_BANNER)
    assert_fits(page, "Generate, on opening")
    page.locator("#photo input[type=file]").set_input_files(str(two_people))
    expect(page.locator("#face-note")).to_contain_text("2 faces found")
    thumbnails = page.locator("#faces .thumbnail-item")
    expect(thumbnails).to_have_count(2)
    thumbnails.nth(1).click()  # the second face, numbered as people count
    expect(page.locator("#face-number input")).to_have_value("2")
    expect(page.locator("#face-note")).to_contain_text("Using face 2.")
    page.locator("#style input").click()
    page.get_by_role("option", name="Watercolor", exact=True).click()
    expect(page.locator("#style input")).to_have_value("Watercolor")
    assert_fits(page, "Generate, picking a face")

    # An example: a real photo with its prompt and style replaces all three (and the picker goes: one face).
    photo, prompt, style = load_examples("tiny")["generate"][1]
    page.locator("#generate-examples").get_by_text(prompt).click()
    expect(page.locator("#prompt textarea")).to_have_value(prompt)
    expect(page.locator("#style input")).to_have_value(style)
    expect(page.locator("#face-note")).to_contain_text("One face found")
    expect(page.locator("#face-picker").first).to_be_hidden()
    page.get_by_text("More photos (optional)").click()
    page.locator("#advanced").get_by_text("Advanced").first.click()
    expect(page.locator("#seed input")).to_be_visible()
    expect(page.locator("#lora-scale")).to_contain_text("Adapter's own fine-tuning")  # this adapter has a LoRA
    assert_fits(page, "Generate, with Advanced open")

    page.locator("#generate-btn").click()
    expect(page.locator("#results img").first).to_be_visible()
    expect(page.locator("#generate-status")).to_contain_text(re.compile(r"Done in \d+(\.\d)? s"))
    info = page.locator("#generation-info")
    expect(info).to_contain_text(re.compile(rf"style {style} · seed \d+"))
    expect(info).to_contain_text("adapter LoRA 1")
    expect(page.locator("#results")).to_contain_text("identity")
    expect(page.locator("#generate-identity-note")).to_contain_text("random weights")  # what the scores are worth
    open_licences(page)
    assert_fits(page, "Generate, with results and the licences")
    screenshot(page, shots / f"generate-{width}.jpg")


def open_licences(page, rows=None) -> None:
    """Open "Models and licences" under the tabs; each model of ``rows`` (default: the tiny engine's) is listed."""
    page.locator("#licences").get_by_text("Models and licences").click()
    table = page.locator("#licences table")
    sync_api.expect(table).to_be_visible()
    for _, model, _, _ in rows or licence_rows(engine="tiny"):
        sync_api.expect(table).to_contain_text(model)


def drive_compare(page, shots: Path, width: int) -> None:
    expect = sync_api.expect
    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#c-style")).to_be_visible()
    expect(page.locator("#c-ids")).to_be_hidden()  # Methods mode: no strength boxes, no style checkboxes
    expect(page.locator("#c-styles")).to_be_hidden()
    page.locator("#c-photo input[type=file]").set_input_files(str(ASSETS / "astronaut.jpg"))
    page.get_by_label("A grid of likeness × prompt strengths").check()
    expect(page.locator("#c-ids")).to_be_visible()
    expect(page.locator("#c-styles")).to_be_hidden()
    page.locator("#c-ids textarea").fill("0.2, 0.4, 0.6, 0.8, 1, 1.2, 1.4")
    page.locator("#c-sems textarea").fill("0, 0.5, 1, 1.5, 2, 2.5")
    set_number(page, "#c-steps", 1)
    assert_fits(page, "Compare, strength grid")
    page.locator("#compare-btn").click()
    status = page.locator("#compare-status")
    expect(status).to_contain_text("Done in")
    expect(status).to_contain_text("7 identity strengths were given; the grid keeps the first 4")
    expect(page.locator("#c-gallery .thumbnail-item")).to_have_count(16)
    expect(page.locator("#compare-identity-note")).to_contain_text("random weights")
    assert_fits(page, "Compare, with the grid")
    page.get_by_label("Several styles").check()
    expect(page.locator("#c-styles")).to_be_visible()
    expect(page.locator("#c-ids")).to_be_hidden()
    screenshot(page, shots / f"compare-{width}.jpg")


def drive_mix(page, shots: Path, width: int, no_face: Path) -> None:
    expect = sync_api.expect
    page.get_by_role("tab", name="Mix two people").click()
    page.locator("#person-a input[type=file]").set_input_files(str(no_face))
    page.locator("#person-b input[type=file]").set_input_files(str(ASSETS / "camera.jpg"))
    page.locator("#mix-btn").click()
    status = page.locator("#mix-status")
    expect(status).to_contain_text("Person A: No face was found in this photo")
    expect(page.locator(".toast-body").first).to_be_visible()
    page.wait_for_timeout((widgets.TOAST_S + 1.5) * 1000)  # the pop-up has faded...
    expect(page.locator(".toast-body")).to_have_count(0)
    expect(status).to_contain_text("Person A: No face was found in this photo")  # ... the status line has not
    assert_fits(page, "Mix, with an error")

    _, _, prompt = load_examples("tiny")["mix"][0]  # the example: two real photos
    page.locator("#mix-examples").get_by_text(prompt).click()
    expect(page.locator("#person-a img")).to_have_count(1)
    page.locator("#mix-btn").click()
    expect(status).to_contain_text("Done in")  # the next action replaced the error
    expect(page.locator("#m-gallery img").first).to_be_visible()
    expect(page.locator("#mix-identity-note")).to_contain_text("random weights")
    assert_fits(page, "Mix, with the blend")
    screenshot(page, shots / f"mix-{width}.jpg")


@pytest.mark.parametrize("size", list(SIZES))
def test_every_tab_fits_and_works(served_lora, browser, shots, no_face, two_people, size):
    page = open_page(browser, served_lora[1], SIZES[size])
    width = SIZES[size][0]
    drive_generate(page, shots, width, two_people)
    drive_compare(page, shots, width)
    drive_mix(page, shots, width, no_face)
    assert not page.page_errors, page.page_errors
    page.context.close()


def test_the_real_engines_licence_table_fits_a_phone(lora_engine, browser):
    """The real engine's rows (long model ids and licences, the default setup's) open and fit at 390 px."""
    rows = licence_rows(engine="real")
    with serve(lora_engine, licences=rows) as (_, url):
        page = open_page(browser, url, SIZES["phone"])
        open_licences(page, rows)
        sync_api.expect(page.locator("#licences")).to_contain_text("non-commercial research only")
        assert_fits(page, "the real engine's licences, on a phone")
        page.context.close()


def test_a_queued_person_sees_their_place_and_wait_the_runner_one_bar_and_where_stop_stopped(
        served_lora, browser, monkeypatch):
    """Two people, one GPU slot, slow steps: the second is told their place and a time estimate from the job
    ahead and the measured pace, and may leave the queue and join it again; the first sees one progress bar
    (ours; Gradio's own are off) and, after Stop, the step it stopped after."""
    expect = sync_api.expect
    real_reporter = widgets.progress_reporter

    def slow_reporter(progress, desc):
        report = real_reporter(progress, desc)

        def slow(done, total):
            report(done, total)
            sync_api_sleep(0.4)

        return slow

    monkeypatch.setattr(widgets, "progress_reporter", slow_reporter)
    first, second = (open_page(browser, served_lora[1], SIZES["desktop"]) for _ in range(2))
    for page in (first, second):
        page.locator("#photo input[type=file]").set_input_files(str(ASSETS / "synthetic_face.png"))
        expect(page.locator("#face-note")).to_contain_text("One face found")
        expect(page.locator("#face-picker").first).to_be_hidden()  # one face: nothing to pick
    first.locator("#generate-btn").click()  # a short job: the server measures its pace
    expect(first.locator("#generate-status")).to_contain_text("Done in")

    first.locator("#advanced").get_by_text("Advanced").first.click()
    set_number(first, "#steps", 30)  # 12 s at least: time for all that follows
    first.locator("#generate-btn").click()
    status = first.locator("#generate-status")
    expect(status).to_contain_text(re.compile(r"Step \d+ of 30"))
    expect(first.locator("#generate-status [role=progressbar]")).to_have_count(1)
    # One bar for the job, nowhere else: Gradio's own (one over each output) are off for the GPU events.
    assert first.evaluate(SHOWN_PROGRESS_BARS) == ["generate-status"]

    second.locator("#generate-btn").click()
    waiting = second.locator("#generate-status")
    expect(waiting).to_contain_text("Waiting: 1 job ahead of yours; yours starts in about")
    expect(waiting).to_contain_text(re.compile(r"takes about \d+(\.\d)? s"))
    second.locator("#stop-btn").click()  # changed their mind: leaves the queue...
    expect(waiting).to_contain_text("Stopped before it started.")
    second.locator("#generate-btn").click()  # ... and may join it again (the per-session cap let go)
    expect(waiting).to_contain_text("Waiting: 1 job ahead of yours")

    first.locator("#stop-btn").click()
    expect(status).to_contain_text(re.compile(r"Stopped after step \d+ of 30\."))
    expect(waiting).to_contain_text("Done in")  # the slot went to the next person
    for page in (first, second):
        assert not page.page_errors, page.page_errors
        page.context.close()


def sync_api_sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)
