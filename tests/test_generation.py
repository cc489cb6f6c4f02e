"""The generation layer the app and the CLI share: clamping, styles, seeds, identity cache, similarity, PNG metadata,
grids, and the CLI and app entry points on the tiny engine."""

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infinite_id import service as gen  # noqa: E402
from infinite_id.cli import compare_main, generate_main  # noqa: E402
from infinite_id.faces.tiny_pack import synthetic_face_photo  # noqa: E402
from infinite_id.models.engines import load_engine  # noqa: E402
from infinite_id.service.grid import labelled_grid  # noqa: E402
from infinite_id.service.styles import DEFAULT_STYLE, get_style, load_styles  # noqa: E402

ASSETS = ROOT / "assets"


@pytest.fixture(scope="module")
def engine():
    return load_engine("tiny")


@pytest.fixture(scope="module")
def face_photo():
    return Image.open(ASSETS / "synthetic_face.png").convert("RGB")


def test_request_clamps_every_knob_to_its_range():
    r = gen.GenerationRequest(
        prompt="x" * 5000, id_scale=99, semantic_scale=-1, style_strength=float("nan"), mix_window=(0.9, 0.2),
        num_inference_steps=0, guidance_scale=1e9, width=5000, height=4999, seed=-1, num_images=50,
    )
    assert len(r.prompt) == 1000
    assert (r.id_scale, r.semantic_scale, r.style_strength) == (1.5, 0.0, 1.0)
    assert r.mix_window == (0.2, 0.9)
    assert (r.num_inference_steps, r.guidance_scale, r.num_images) == (1, 20.0, 4)
    assert r.width % 8 == 0 and r.height % 8 == 0 and r.width * r.height <= gen.MAX_PIXELS
    assert r.seed is None and 0 <= r.with_seed().seed <= gen.MAX_SEED
    assert gen.GenerationRequest("a", seed=2**40).seed == gen.MAX_SEED
    assert gen.GenerationRequest("a", id_scale="junk").id_scale == 1.0
    assert gen.GenerationRequest("a", fast=True, num_inference_steps=30).steps == gen.FAST_STEPS
    with pytest.raises(ValueError, match="There is no style called"):
        gen.GenerationRequest("a", style="Nonexistent")
    with pytest.raises(ValueError, match="method must be one of"):
        gen.GenerationRequest("a", method="dreambooth")


def test_style_presets():
    styles = load_styles()
    assert len(styles) >= 12
    for name in ("Comic book", "Disney cartoon", "Oil painting", "Ghibli animation", "Ukiyo-e", "Watercolor",
                 DEFAULT_STYLE):
        assert name in styles
    for style in styles.values():
        assert style.prompt.count("{prompt}") == 1 and 0 <= style.style_strength <= 1
    prompt, negative = get_style("Oil painting").apply("a man in a {red} hat", "blurry")
    assert prompt.startswith("oil painting of a man in a {red} hat,") and negative.startswith("blurry, ")
    request = gen.GenerationRequest("a cat", style="Ukiyo-e")
    assert request.styled()[2] == get_style("Ukiyo-e").style_strength  # the preset's recommended strength
    assert gen.GenerationRequest("a cat", style="Ukiyo-e", style_strength=0.2).styled()[2] == 0.2


def test_aspect_ratio_presets_are_sdxl_sizes_and_scale_for_the_tiny_engine():
    sizes = {gen.size_for(label) for label in gen.ASPECT_RATIOS}
    assert sizes == {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                     (1536, 640), (640, 1536)}
    for label, (w, h) in gen.ASPECT_RATIOS.items():
        tw, th = gen.size_for(label, 64)
        assert tw % 8 == 0 and th % 8 == 0 and 32 <= tw <= 96 and 32 <= th <= 96
        assert math.isclose(tw / th, w / h, rel_tol=0.25)


def test_identity_cache_keys_on_pixels_and_face(engine, face_photo, tmp_path):
    cache = gen.IdentityCache()
    first = cache.encode(engine.pipe, face_photo)
    path = tmp_path / "copy.png"
    face_photo.save(path)
    again = cache.encode(engine.pipe, str(path))  # another file, the same pixels
    assert again is first and (cache.hits, cache.misses) == (1, 1)
    group = ASSETS / "synthetic_group.png"
    assert cache.encode(engine.pipe, group, face_index=1).key != cache.encode(engine.pipe, group).key
    assert np.isclose(np.linalg.norm(first.reference), 1.0, atol=1e-4)



def test_a_photo_is_decoded_once_on_its_way_to_the_identity(engine, face_photo, tmp_path, monkeypatch):
    """Upload -> identity cache -> face analyzer -> identity tokens: the file is opened and decoded once; the
    analyzer takes the cache's decoded image as it is (load_image returns its own output untouched)."""
    import infinite_id.images as images

    path = tmp_path / "once.png"
    face_photo.save(path)
    opened, real_open = [], images._open
    monkeypatch.setattr(images, "_open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    decoded = images.load_image(str(path))
    assert images.load_image(decoded) is decoded and len(opened) == 1
    opened.clear()
    gen.IdentityCache().encode(engine.pipe, str(path))
    assert len(opened) == 1

def test_similarity_of_a_face_to_itself_and_of_noise(engine, face_photo):
    identity = gen.IdentityCache().encode(engine.pipe, face_photo)
    assert gen.output_similarity(engine.face_analyzer, face_photo, identity.reference) > 0.95
    other = synthetic_face_photo(320, faces=[(160, 160, 90, 7)], seed=3)
    assert gen.output_similarity(engine.face_analyzer, other, identity.reference) < 0.9
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    assert gen.output_similarity(engine.face_analyzer, noise, identity.reference) is None


def test_png_metadata_round_trip_without_input_exif(engine, face_photo, tmp_path):
    identity = gen.IdentityCache().encode(engine.pipe, face_photo)
    request = gen.GenerationRequest("a person", style="Watercolor", num_inference_steps=1, width=64, height=64,
                                    seed=4, num_images=2)
    result = gen.generate(engine.pipe, request, identity)
    # An output that came with EXIF (GPS) of its own must not carry it into the file.
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0)}
    result.images[1].image.info["exif"] = exif.tobytes()
    paths = gen.save_images(result.images, tmp_path)
    with Image.open(paths[1]) as saved:
        assert not saved.getexif() and "exif" not in saved.info and "parameters" in saved.text
    meta = gen.read_metadata(paths[1])
    assert meta["seed"] == 5 and meta["identity"]["key"] == identity.key
    reproduced = gen.GenerationRequest.from_metadata(meta)
    assert reproduced.seed == 5 and reproduced.num_images == 1 and reproduced.style == "Watercolor"
    assert gen.read_metadata(ASSETS / "synthetic_face.png") == {}


def _count_decodes(pipe, monkeypatch) -> list:
    """Each VAE decode the pipeline makes, by the number of latents it decodes."""
    calls, real = [], pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, *a, **kw: calls.append(z.shape[0]) or real(z, *a, **kw))
    return calls


@pytest.mark.parametrize("window", [(0.0, 1.0), (0.0, 0.5)])
def test_a_request_without_the_text_stream_skips_its_work_and_keeps_the_images(engine, face_photo, tmp_path,
                                                                               monkeypatch, window):
    """The app's Generate call asks for the text stream only when it is shown: one decode instead of two, and with
    a window that ends early the text stream leaves the batch. Same images: bit for bit with the whole window
    (the same batch all along), within rounding otherwise; recorded, so a reproduction runs the same call."""
    identity = gen.IdentityCache().encode(engine.pipe, face_photo)
    request = gen.GenerationRequest("a person", num_inference_steps=4, width=64, height=64, seed=3,
                                    mix_window=window)
    decodes = _count_decodes(engine.pipe, monkeypatch)
    both = gen.generate(engine.pipe, request, identity)
    assert len(decodes) == 2 and len(both.text_images) == 1
    decodes.clear()
    alone = gen.generate(engine.pipe, request.replace(text_stream=False), identity)
    assert len(decodes) == 1 and alone.text_images == []
    got, want = (np.asarray(r.images[0].image, dtype=np.int16) for r in (alone, both))
    assert np.abs(got - want).max() <= (0 if window == (0.0, 1.0) else 1)
    meta = gen.read_metadata(gen.save_images(alone.images, tmp_path)[0])
    assert meta["request"]["text_stream"] is False
    assert gen.GenerationRequest.from_metadata(meta).text_stream is False
    assert gen.GenerationRequest.from_metadata({"request": {"prompt": "x"}}).text_stream is True  # older PNGs
    assert gen.GenerationRequest("x", text_stream="false").text_stream is False  # as an API client may send it


def test_only_the_methods_comparison_decodes_a_text_stream(engine, face_photo, monkeypatch):
    identity = gen.IdentityCache().encode(engine.pipe, face_photo)
    request = gen.GenerationRequest("a person", num_inference_steps=2, width=64, height=64, seed=3)
    decodes = _count_decodes(engine.pipe, monkeypatch)
    grid = gen.compare(engine.pipe, request, identity, "strengths", id_scales=(0.5, 1.0), semantic_scales=(1.0,))
    assert len(grid.cells) == 2 and len(decodes) == 2  # one per cell, none for an unseen text stream
    decodes.clear()
    methods = gen.compare(engine.pipe, request.replace(text_stream=False), identity, "methods")
    assert len(methods.cells) == 3 and len(decodes) == 3  # adapter, Infinite-ID, and its text stream (the text cell)


def test_cancelled_generation_raises_and_the_next_call_is_unaffected(engine, face_photo):
    identity = gen.IdentityCache().encode(engine.pipe, face_photo)
    request = gen.GenerationRequest("a person", num_inference_steps=1, width=64, height=64, seed=9)
    before = gen.generate(engine.pipe, request, identity).images[0].image
    cancel = threading.Event()
    steps = []

    def stop_after_first(done, total):
        steps.append((done, total))
        cancel.set()

    with pytest.raises(gen.GenerationCancelled):
        gen.generate(engine.pipe, request.replace(num_inference_steps=20), identity, on_step=stop_after_first,
                     cancel=cancel)
    assert steps == [(1, 20)]
    after = gen.generate(engine.pipe, request, identity).images[0].image
    assert np.array_equal(np.asarray(before), np.asarray(after))


def test_blank_outputs_are_detected():
    assert gen.is_blank(Image.new("RGB", (64, 64)))
    assert not gen.is_blank(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))


def test_parse_values_and_grid():
    assert gen.parse_values("0.5, 1 ;2", 0, 1.5, default=(1.0,)) == [0.5, 1.0, 1.5]
    assert gen.parse_values("", 0, 3, default=(0.0, 1.0)) == [0.0, 1.0]
    with pytest.raises(ValueError, match="is not a number"):
        gen.parse_values("a lot", 0, 3, default=(1.0,))
    cells = [[Image.new("RGB", (64, 48), "red"), None], [Image.new("RGB", (64, 48), "blue")] * 2]
    grid = labelled_grid(cells, ["row a", "row b"], ["col 1", "col 2"], [["x", ""], ["y", "z"]], title="t")
    assert grid.mode == "RGB" and grid.width > 2 * 256 and grid.height > 2 * 192


def test_cli_generate_and_compare_write_pngs(tmp_path, capsys):
    photo = str(ASSETS / "synthetic_face.png")
    rc = generate_main(["--engine", "tiny", "--photo", photo, "--prompt", "a person", "--style", "Ukiyo-e",
                        "--steps", "1", "--seed", "3", "--text-stream", "--out", str(tmp_path)])
    assert rc == 0
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == ["infinite-id-3-0.png", "text-stream-3-0.png"]  # each name says the method once
    meta = gen.read_metadata(tmp_path / written[0])
    assert meta["style"] == "Ukiyo-e" and meta["seed"] == 3

    rc = generate_main(["--engine", "tiny", "--photo", photo, "--reproduce", str(tmp_path / written[0]),
                        "--out", str(tmp_path / "again")])
    assert rc == 0
    assert gen.read_metadata(next((tmp_path / "again").glob("*.png")))["prompt"] == meta["prompt"]

    rc = compare_main(["--engine", "tiny", "--photo", photo, "--mode", "methods", "--steps", "1", "--seed", "2",
                       "--out", str(tmp_path / "cmp")])
    assert rc == 0
    grid = tmp_path / "cmp" / "compare-methods-grid-2.png"
    assert grid.exists() and len(gen.read_metadata(grid)["cells"]) == 3

    # A real photo works on the tiny engine too (its face stack has a real detector, issue 16); a faceless one
    # gets the sentence.
    rc = generate_main(["--engine", "tiny", "--photo", str(ASSETS / "astronaut.jpg"), "--steps", "1",
                        "--out", str(tmp_path / "astronaut")])
    assert rc == 0 and len(list((tmp_path / "astronaut").glob("*.png"))) == 1
    Image.new("RGB", (256, 256), (90, 120, 150)).save(tmp_path / "wall.png")
    rc = generate_main(["--engine", "tiny", "--photo", str(tmp_path / "wall.png"), "--steps", "1"])
    assert rc == 1 and "No face was found" in capsys.readouterr().err


def test_app_without_weights_stops_with_the_startup_message(tmp_path):
    pytest.importorskip("infinite_id.models.loading")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "INFINITE_ID_FACE_ROOT": str(tmp_path / "faces"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "app.py")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    assert "python -m infinite_id download" in done.stderr and "Traceback" not in done.stderr


def test_examples_manifest_points_at_licensed_files():
    manifest = json.loads((ASSETS / "examples.json").read_text())
    licences = (ASSETS / "README.md").read_text()
    files = {e["photo"] for e in manifest["generate"]} | {e[k] for e in manifest["mix"] for k in ("photo_a", "photo_b")}
    for name in files:
        assert (ASSETS / name).exists() and f"`{name}`" in licences
    for entry in manifest["generate"]:
        get_style(entry["style"])
