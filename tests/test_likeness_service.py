"""The likeness knobs of issue 14 through the service layer and the CLI: ``lora_scale`` (clamped to [0, 2]),
``adain_cross`` and ``clip_channel_order`` in the request, the identity cache, the pipeline call and the PNG
metadata, on the tiny engine with a FaceID-PlusV2-format adapter (which carries a LoRA)."""

from __future__ import annotations

from pathlib import Path

import pytest

from infinite_id import service as gen
from infinite_id.cli import generate_main
from infinite_id.models.engines import load_engine

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FACE = ASSETS / "synthetic_face.png"


@pytest.fixture(scope="module")
def engine():
    return load_engine("tiny", adapter="faceid-plusv2")


def test_request_clamps_lora_scale_and_reads_the_likeness_knobs():
    r = gen.GenerationRequest("a", lora_scale=7)
    assert r.lora_scale == 2.0 and gen.LORA_SCALE_RANGE == (0.0, 2.0)
    assert gen.GenerationRequest("a", lora_scale=-1).lora_scale == 0.0
    assert gen.GenerationRequest("a", lora_scale="junk").lora_scale == 1.0
    assert gen.GenerationRequest("a", lora_scale=float("nan")).lora_scale == 1.0
    defaults = gen.GenerationRequest("a")
    assert (defaults.lora_scale, defaults.adain_cross, defaults.clip_channel_order) == (1.0, True, None)
    assert gen.GenerationRequest("a", adain_cross="false").adain_cross is False
    assert gen.GenerationRequest("a", adain_cross=0).adain_cross is False
    assert gen.GenerationRequest("a", clip_channel_order=" BGR ").clip_channel_order == "bgr"
    assert gen.GenerationRequest("a", clip_channel_order="").clip_channel_order is None
    with pytest.raises(ValueError, match="CLIP channel order must be 'rgb' or 'bgr'"):
        gen.GenerationRequest("a", clip_channel_order="rbg")


def test_lora_scale_reaches_the_pipeline_and_the_png_metadata(engine, tmp_path):
    identity = gen.IdentityCache().encode(engine.pipe, FACE, analyzer=engine.face_analyzer)
    assert identity.clip_channel_order == "bgr"  # FaceID-PlusV2's published order
    base = gen.GenerationRequest("a person", method="adapter", num_inference_steps=1, width=64, height=64, seed=4)
    on = gen.generate(engine.pipe, base, identity)
    off = gen.generate(engine.pipe, base.replace(lora_scale=0.0), identity)
    assert on.images[0].image.tobytes() != off.images[0].image.tobytes()  # the LoRA acts through the service
    meta = on.images[0].metadata
    assert (meta["lora_scale"], meta["clip_channel_order"], meta["version"]) == (1.0, "bgr", 2)
    assert meta["adain_cross"] is None  # AdaIN-cross is an Infinite-ID knob; the adapter never runs it
    path = gen.save_images(off.images, tmp_path)[0]
    again = gen.GenerationRequest.from_metadata(gen.read_metadata(path))
    assert again.lora_scale == 0.0 and again.method == "adapter"


def test_images_saved_before_issue_14_reproduce_with_the_old_behaviour():
    old = {"version": 1, "seed": 3, "request": {"prompt": "a", "method": "infinite-id", "seed": 3}}
    r = gen.GenerationRequest.from_metadata(old)
    assert (r.lora_scale, r.adain_cross, r.clip_channel_order) == (0.0, False, "rgb")
    new = {"version": 2, "seed": 3, "request": {"prompt": "a", "seed": 3}}
    assert gen.GenerationRequest.from_metadata(new).adain_cross is True


def test_identity_cache_keys_the_clip_channel_order_and_the_request_must_agree(engine):
    cache = gen.IdentityCache()
    bgr = cache.encode(engine.pipe, FACE, analyzer=engine.face_analyzer)
    rgb = cache.encode(engine.pipe, FACE, analyzer=engine.face_analyzer, clip_channel_order="rgb")
    assert rgb.key == bgr.key  # the same photo: the metadata names it the same way
    assert (rgb.features.clip - bgr.features.clip).abs().max() > 1e-3 and cache.misses == 2
    assert cache.encode(engine.pipe, FACE, analyzer=engine.face_analyzer, clip_channel_order="bgr") is bgr
    request = gen.GenerationRequest("a", num_inference_steps=1, width=64, height=64, seed=1, clip_channel_order="rgb")
    with pytest.raises(ValueError, match="encoded with the CLIP crop in BGR order, but the request asks for RGB"):
        gen.generate(engine.pipe, request, bgr)


def test_cli_generate_takes_the_likeness_flags(tmp_path, capsys):
    code = generate_main(["--engine", "tiny", "--adapter", "faceid-plusv2", "--photo", str(FACE), "--steps", "1",
                          "--seed", "2", "--lora-scale", "0.5", "--no-adain-cross", "--clip-channel-order", "rgb",
                          "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    meta = gen.read_metadata(next(tmp_path.glob("infinite-id-*.png")))
    assert (meta["lora_scale"], meta["adain_cross"], meta["clip_channel_order"]) == (0.5, False, "rgb")
    assert meta["models"]["lora"] == "rank 4, identity stream only"


def test_adain_cross_reaches_the_pipeline_through_the_service(engine):
    identity = gen.IdentityCache().encode(engine.pipe, FACE, analyzer=engine.face_analyzer)
    request = gen.GenerationRequest("a", num_inference_steps=2, width=64, height=64, seed=1, style_strength=1.0)
    on = gen.generate(engine.pipe, request, identity)
    off = gen.generate(engine.pipe, request.replace(adain_cross=False), identity)
    assert on.images[0].image.tobytes() != off.images[0].image.tobytes()
    assert on.text_images[0].image.tobytes() == off.text_images[0].image.tobytes()  # the text stream: untouched
    assert (on.images[0].metadata["adain_cross"], off.images[0].metadata["adain_cross"]) == (True, False)
