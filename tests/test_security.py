"""Security and privacy probes through the app's HTTP API, as an attacker's script would send them (issue 8).

Modelled on Gradio's own tests (test/test_routes.py: file route traversal, CORS, uploads): every probe goes to
the app on 127.0.0.1 with the production launch settings, and must be refused. Then what API callers can send
that the sliders would stop (huge numbers, huge prompts) is clamped server-side, and nothing of a person's
(prompt, file name, EXIF/GPS) leaks into logs or outputs.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import time
from pathlib import Path

import httpx
import pytest
from app_server import ASSETS, ROOT, generate, serve
from PIL import Image

import app
from infinite_id import service as gen
from infinite_id.config import SETTINGS
from infinite_id.models.engines import load_engine

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

FACE = ASSETS / "synthetic_face.png"
SECRET = "purple-giraffe-8472"  # a prompt word and file name nobody else would write


@pytest.fixture(scope="module")
def engine():
    return load_engine("tiny")


@pytest.fixture(scope="module")
def served(engine):
    with serve(engine) as running:
        yield running


@pytest.fixture(scope="module")
def url(served):
    return served[1]


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False)


def raw_get(url: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """A GET with ``path`` sent byte for byte (httpx would normalise ``../`` away before it left)."""
    host = httpx.URL(url)
    connection = http.client.HTTPConnection(host.host, host.port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def upload(url: str, name: str, data: bytes, content_type: str = "application/octet-stream") -> httpx.Response:
    return httpx.post(f"{url}gradio_api/upload", files={"files": (name, data, content_type)}, timeout=60)


def call(url: str, endpoint: str, data: list) -> str:
    """The raw two-step API (POST /call, then read the event stream): what the event stream said."""
    started = httpx.post(f"{url}gradio_api/call/{endpoint}", json={"data": data}, timeout=30)
    started.raise_for_status()
    event_id = started.json()["event_id"]
    with httpx.stream("GET", f"{url}gradio_api/call/{endpoint}/{event_id}", timeout=60) as stream:
        return "".join(stream.iter_text())


# --- 4. probes ----------------------------------------------------------------------------------------------------

SERVER_FILES = ["/etc/passwd", str(ROOT / "app.py"), str(ROOT / "infinite_id" / "config.py")]
TRAVERSALS = [
    "../../../../../../etc/passwd",
    "..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "%2Fetc%2Fpasswd",
    "/etc/passwd",
    "....//....//....//....//etc/passwd",
    f"{ASSETS}/../app.py",  # out of the one allowed folder
    f"{ASSETS}/..%2Fapp.py",
    str(ROOT / "app.py"),
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_file_route_refuses_traversal_and_paths_outside_the_allowed_folders(url, target):
    status, _headers, body = raw_get(url, f"/gradio_api/file={target}")
    assert status in (403, 404), (target, status)
    assert b"root:" not in body and b"def build_demo" not in body and b"ServerSettings" not in body


def test_allowed_example_photos_are_still_served(url):
    status, headers, _body = raw_get(url, f"/gradio_api/file={FACE}")
    assert status == 200 and headers["content-type"] == "image/png"


@pytest.mark.parametrize("target", SERVER_FILES)
def test_a_file_reference_to_a_server_file_is_refused(url, target):
    """A FileData pointing at a file of the server's instead of an upload."""
    stream = call(url, "detect_faces", [{"path": target, "meta": {"_type": "gradio.FileData"}}])
    assert "event: error" in stream
    assert "root:" not in stream and "def build_demo" not in stream


def test_another_sessions_upload_cannot_be_guessed(url):
    """Uploads are stored under a SHA-256 of their bytes salted with a secret per-install seed (Gradio's
    hash_seed), so another session's upload cannot be named, even by someone who has the same photo. A guessed
    path is refused like any other server path."""
    (path,) = upload(url, "face.png", FACE.read_bytes()).json()
    assert len(Path(path).parent.name) == 64 and hashlib.sha256(FACE.read_bytes()).hexdigest() not in path
    guessed = str(Path(path).parent.with_name("0" * 64) / "face.png")
    stream = call(url, "detect_faces", [{"path": guessed, "meta": {"_type": "gradio.FileData"}}])
    assert "event: error" in stream
    assert raw_get(url, f"/gradio_api/file={guessed}")[0] in (403, 404)


def test_uploads_over_the_size_limit_are_refused(url):
    limit = SETTINGS.images.max_file_bytes
    response = upload(url, "big.png", b"\0" * (limit + 1))
    assert response.status_code == 413
    assert upload(url, "small.png", FACE.read_bytes()).status_code == 200


@pytest.mark.parametrize(
    ("name", "content", "kind"),
    [("page.html", b"<html><script>alert(document.cookie)</script></html>", "text/html"),
     ("logo.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "image/svg+xml")],
)
def test_html_and_svg_uploads_are_never_served_back_as_live_documents(url, name, content, kind):
    """Gradio 6 accepts the upload but serves it back as a download (application/octet-stream, attachment), so a
    script inside never runs in the app's origin."""
    response = upload(url, name, content, kind)
    if response.status_code != 200:
        return  # refused at upload would be fine too
    (path,) = response.json()
    status, headers, _ = raw_get(url, f"/gradio_api/file={path}")
    if status != 200:
        return  # refused when fetched: fine
    assert headers.get("content-type", "").split(";")[0] not in ("text/html", "image/svg+xml"), headers
    assert headers.get("content-disposition", "").startswith("attachment"), headers


def test_a_foreign_origin_gets_no_cors_permission(url):
    evil = {"Origin": "http://evil.example"}
    response = httpx.get(f"{url}config", headers=evil, timeout=30)
    assert response.headers.get("access-control-allow-origin") not in ("*", "http://evil.example")
    preflight = httpx.options(f"{url}gradio_api/queue/join", timeout=30, headers={
        **evil, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.headers.get("access-control-allow-origin") not in ("*", "http://evil.example")
    # The app's own origin (a page served from this host) is still allowed.
    own = httpx.get(f"{url}config", headers={"Origin": url.rstrip("/")}, timeout=30)
    assert own.headers.get("access-control-allow-origin") == url.rstrip("/")


OUT_OF_RANGE = [("id_scale", 99), ("semantic_scale", -7), ("style_strength", 42), ("mix_start", -3),
                ("mix_end", 9), ("guidance", 1e9), ("steps", 10_000), ("seed", -5), ("seed", 2**40),
                ("num_images", 1000), ("face_index", -9)]


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE)
def test_api_callers_sending_numbers_the_sliders_would_stop_are_refused(client, name, value):
    """The sliders stop a person; a script sends what it likes. Gradio 6 checks each slider's and number's
    range on the server before our handler runs, and answers with the limit."""
    with pytest.raises(AppError, match=r"is (greater|less) than (maximum|minimum) value"):
        generate(client, FACE, **{"steps": 1, name: value})


def test_what_reaches_the_handler_is_clamped_again(client):
    """Values Gradio lets through are clamped by ``GenerationRequest``: a 50,000-character prompt (the textbox's
    max_length is only enforced in the browser), strengths typed into Compare's text boxes. The PNG metadata
    shows what actually ran."""
    *_, files, _ = generate(client, FACE, prompt="x" * 50_000, negative_prompt="n" * 50_000, steps=1)
    meta = gen.read_metadata(files[0])
    limit = SETTINGS.max_prompt_chars
    assert meta["request"]["prompt"] == "x" * limit and meta["request"]["negative_prompt"] == "n" * limit

    _grid, gallery, files, _info, _seed = client.predict(
        photo=handle_file(str(FACE)), prompt="a person", mode="strengths", id_scales="99, -5",
        semantic_scales="1e9", steps=1, api_name="/compare")
    cells = [gen.read_metadata(f) for f in files[1:]]
    assert sorted((c["id_scale"], c["semantic_scale"]) for c in cells) == [
        (gen.ID_SCALE_RANGE[0], gen.SEMANTIC_SCALE_RANGE[1]), (gen.ID_SCALE_RANGE[1], gen.SEMANTIC_SCALE_RANGE[1])]


def test_an_aspect_ratio_outside_the_list_is_refused(client):
    with pytest.raises(AppError):
        generate(client, FACE, aspect_ratio="99999x99999", steps=1)


# --- 5. privacy ---------------------------------------------------------------------------------------------------


def test_no_prompt_file_name_or_image_bytes_in_logs_at_info(client, tmp_path, caplog):
    photo = tmp_path / f"holiday-{SECRET}.png"
    photo.write_bytes(FACE.read_bytes())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # as app.main: our client's request lines are not the server
    with caplog.at_level(logging.INFO):
        generate(client, photo, prompt=f"a person holding a {SECRET}")
        with pytest.raises(AppError):
            generate(client, photo, prompt=f"another {SECRET}", face_index=7)  # a failing request logs too
    text = caplog.text
    assert SECRET not in text
    assert all(len(record.getMessage()) < 2000 for record in caplog.records)  # no image payloads


def test_outputs_carry_our_metadata_and_none_of_the_inputs_exif_or_gps(client, tmp_path):
    image = Image.open(FACE).convert("RGB")
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0132] = "2024:01:02 03:04:05"  # DateTime
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (51.0, 30.0, 12.5), 3: "W", 4: (0.0, 7.0, 39.0)})
    photo = tmp_path / "with-gps.jpg"
    image.save(photo, format="JPEG", exif=exif, quality=95)
    assert Image.open(photo).getexif().get_ifd(0x8825)  # the input really has GPS

    *_, files, seed = generate(client, photo, prompt="a person")
    with Image.open(files[0]) as output:
        assert output.format == "PNG"
        assert not output.getexif() and not output.getexif().get_ifd(0x8825)
        assert "exif" not in output.info and "icc_profile" not in output.info
        raw = Path(files[0]).read_bytes()
        assert b"PhoneMaker" not in raw and b"eXIf" not in raw
        assert json.loads(output.text[gen.METADATA_KEY])["seed"] == seed


def test_no_flagging_folder_is_created(served, client, tmp_path):
    demo, _ = served
    places = [Path.cwd(), ROOT]
    before = {p for base in places for p in (base / ".gradio" / "flagged", base / "flagged") if p.exists()}
    generate(client, FACE)
    after = {p for base in places for p in (base / ".gradio" / "flagged", base / "flagged") if p.exists()}
    assert after <= before and not (after - before)
    assert "flag" not in json.dumps(demo.get_config_file()).lower()


def test_the_upload_cache_is_emptied_on_the_configured_schedule(engine):
    with serve(engine, delete_cache=(1, 1)) as (demo, url):
        client = Client(url, verbose=False)
        kept = {p for s in demo.temp_file_sets for p in s}  # the example photos, cached at start-up
        response = upload(url, "face.png", FACE.read_bytes())
        (uploaded,) = response.json()
        generate(client, FACE)
        made = {p for s in demo.temp_file_sets for p in s} - kept  # this request's upload and outputs
        cached = [Path(uploaded), *map(Path, made)]
        assert len(cached) >= 3 and all(p.exists() for p in cached[:1])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(p.exists() for p in cached):
            time.sleep(0.5)
        assert not [p for p in cached if p.exists()]
    assert app.DELETE_CACHE == (app.SERVER.delete_cache_every_s, app.SERVER.delete_cache_age_s)
