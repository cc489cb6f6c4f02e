"""The oracle: our identity stream against diffusers' own implementation of each public adapter (issue 14).

Tiny adapter files in each published format (key names and shapes from tests/adapter_specs.py; FaceID-PlusV2 with
its LoRA) are written to a folder, loaded once by our loader and once by diffusers' ``load_ip_adapter`` into a plain
``StableDiffusionXLPipeline`` on the same components (evaluation/reference.py follows diffusers' documented usage of
each adapter; its FaceID LoRA is loaded by diffusers through PEFT). Same seed, same face, same scales: the latents
must agree to fp32 rounding. The text stream must be plain diffusers SDXL bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_specs import faceid_plusv2_image_proj, ip_adapter_layers, nested, random_tensors, resampler_image_proj
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from infinite_id.adapters.convert import load_adapter
from infinite_id.evaluation.reference import build_reference
from infinite_id.faces.tiny_pack import synthetic_face_photo
from infinite_id.method.attention import id_adapter_layers
from infinite_id.method.id_lora import lora_rank
from infinite_id.testing import CROSS_DIM, VISION_DIM, tiny_face_analyzer, tiny_pipeline

STEPS, SIZE, PROMPT = 2, 64, "a photo of a person in a garden"
# Latents after 2 steps are O(1); a mapping or scale error moves them by > 1e-1. fp32 rounding between our
# processors and diffusers' (different reduction orders) stays below 1e-4.
ATOL = 1e-4
KINDS = ("faceid-plusv2", "plus-face", "instantid")
S_SCALE, ID_SCALE, LORA_SCALE = 0.7, 0.8, 0.6  # not 1.0: a dropped scale must show


def adapter_spec(kind: str, hidden: list[int], lora_rank_: int | None = 4) -> dict[str, tuple]:
    """The published keys of ``kind`` at tiny sizes (the FaceID file with its LoRA on every attention layer)."""
    if kind == "faceid-plusv2":
        image_proj, rank = faceid_plusv2_image_proj(cross=CROSS_DIM, clip_dim=VISION_DIM), lora_rank_
    elif kind == "plus-face":
        image_proj, rank = resampler_image_proj(in_dim=VISION_DIM, dim=64, queries=16, out=CROSS_DIM), None
    else:
        image_proj, rank = resampler_image_proj(in_dim=512, dim=64, queries=16, out=CROSS_DIM), None
    return {**{f"image_proj.{k}": v for k, v in image_proj.items()},
            **{f"ip_adapter.{k}": v for k, v in ip_adapter_layers(hidden, CROSS_DIM, rank).items()}}


@pytest.fixture(scope="module")
def analyzer():
    return tiny_face_analyzer()


@pytest.fixture(scope="module")
def face(analyzer):
    photo = synthetic_face_photo(256, [(128, 120, 60, 1)], seed=3)
    return analyzer.analyze(photo)[0]


def write_adapter(folder, kind: str, pipe, seed: int = 0, **spec_kwargs):
    hidden = [p.to_k_ip.out_features for p in id_adapter_layers(pipe.unet).values()]
    flat = random_tensors(adapter_spec(kind, hidden, **spec_kwargs), seed=seed)
    path = folder / f"{kind}.bin"
    torch.save(nested(flat), path)  # the published .bin layout: {"image_proj": {...}, "ip_adapter": {...}}
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory, analyzer):
    """Per adapter kind: our tiny pipeline with the file loaded, and diffusers' reference on the same file."""
    made = {}

    def get(kind: str):
        if kind not in made:
            pipe = tiny_pipeline(seed=5, face_analyzer=analyzer)
            path = write_adapter(tmp_path_factory.mktemp(kind), kind, pipe)
            load_adapter(pipe, path, kind, s_scale=S_SCALE)
            made[kind] = pipe, build_reference(pipe, path)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def plain_sdxl(pair):
    """Plain diffusers SDXL on the FaceID pipeline's components (a UNet copy with diffusers' stock processors)."""
    pipe, _ = pair("faceid-plusv2")
    unet = copy.deepcopy(pipe.unet)
    unet.set_attn_processor(AttnProcessor2_0())
    sdxl = StableDiffusionXLPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2, unet=unet, scheduler=copy.deepcopy(pipe.scheduler), add_watermarker=False)
    sdxl.set_progress_bar_config(disable=True)
    return sdxl


def run(call, seed=0, **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    return call(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent", **kwargs)


def ours(pipe, face, **kwargs):
    return run(pipe, id_image=face, id_scale=ID_SCALE, **kwargs)


def reference(ref, face, lora_scale=LORA_SCALE, **kwargs):
    return run(ref, face=face, id_scale=ID_SCALE, lora_scale=lora_scale, s_scale=S_SCALE, **kwargs).images


# --- the identity stream equals diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_method_equals_diffusers_load_ip_adapter(pair, face, kind):
    pipe, ref = pair(kind)
    assert ref.has_lora == (kind == "faceid-plusv2")  # diffusers loaded the FaceID LoRA itself (PEFT)
    expected = reference(ref, face)
    got = ours(pipe, face, method="adapter", lora_scale=LORA_SCALE).images
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    plain = run(pipe, method="text").images
    assert (expected - plain).abs().max() > 0.1  # the adapter visibly acts: the comparison can fail


@pytest.mark.parametrize("kind", KINDS)
def test_identity_rows_of_two_streams_equal_diffusers_with_mixing_off(pair, face, kind):
    pipe, ref = pair(kind)
    out = ours(pipe, face, semantic_scale=0, style_strength=0, adain_cross=False, lora_scale=LORA_SCALE)
    torch.testing.assert_close(out.images, reference(ref, face), atol=ATOL, rtol=0)


@pytest.mark.parametrize("lora_scale", [0.0, 1.0, 1.7])
def test_faceid_lora_scale_equals_diffusers_lora_weight(pair, face, lora_scale):
    pipe, ref = pair("faceid-plusv2")
    got = ours(pipe, face, method="adapter", lora_scale=lora_scale).images
    torch.testing.assert_close(got, reference(ref, face, lora_scale=lora_scale), atol=ATOL, rtol=0)


def test_faceid_lora_changes_the_identity_stream(pair, face):
    pipe, _ = pair("faceid-plusv2")
    on, off = ours(pipe, face, lora_scale=1.0), ours(pipe, face, lora_scale=0.0)
    assert (on.images - off.images).abs().max() > 0.1
    torch.testing.assert_close(on.text_images, off.text_images, atol=0, rtol=0)


# --- the text stream is plain SDXL, bit for bit ----------------------------------------------------------------


@pytest.mark.parametrize("knobs", [dict(semantic_scale=0, style_strength=0, adain_cross=False), {}],
                         ids=["mixing-and-adain-off", "defaults"])
def test_text_stream_is_plain_diffusers_sdxl_bit_for_bit_with_the_lora_loaded(pair, plain_sdxl, face, knobs):
    pipe, _ = pair("faceid-plusv2")
    assert lora_rank(pipe.unet) == 4
    out = ours(pipe, face, lora_scale=1.0, **knobs)
    # The same batch geometry as ours ([text_uncond, text_cond, id_uncond, id_cond]): diffusers with two images of
    # the prompt runs a batch of 4 too (image 0 at rows 0 and 2; our text stream at rows 0 and 1). Matrix products
    # give the same bits for every row of the same shape, so the comparison can be exact.
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    expected = run(plain_sdxl, num_images_per_prompt=2, generator=generators).images[:1]
    assert torch.equal(out.text_images, expected), (out.text_images - expected).abs().max()


# --- the CLIP crop's channel order ---------------------------------------------------------------------------


def test_faceid_clip_crop_defaults_to_bgr_like_the_diffusers_reference(pair, face):
    pipe, ref = pair("faceid-plusv2")
    assert pipe.id_encoder.clip_channel_order == "bgr"
    expected = reference(ref, face)  # hands CLIP the crop as OpenCV's BGR array, as the published usage does
    rgb = ours(pipe, face, method="adapter", lora_scale=LORA_SCALE, clip_channel_order="rgb").images
    assert (rgb - expected).abs().max() > 1e-2  # the order matters, so the default is a real choice
    bgr = ours(pipe, face, method="adapter", lora_scale=LORA_SCALE, clip_channel_order="bgr").images
    torch.testing.assert_close(bgr, expected, atol=ATOL, rtol=0)


def test_plus_face_and_native_read_the_crop_as_rgb(pair, face):
    pipe, _ = pair("plus-face")
    assert pipe.id_encoder.clip_channel_order == "rgb"
    assert tiny_pipeline(face_analyzer=None).id_encoder.clip_channel_order == "rgb"
    a, b = pipe.encode_identity(face), pipe.encode_identity(face, clip_channel_order="bgr")
    assert (a.clip - b.clip).abs().max() > 1e-3
    with pytest.raises(ValueError, match="clip_channel_order must be 'rgb' or 'bgr'"):
        pipe.encode_identity(face, clip_channel_order="grb")
    with pytest.raises(ValueError, match="clip_channel_order must be 'rgb' or 'bgr'"):
        run(pipe, id_image=face, clip_channel_order="yuv")


# --- InstantID: the adapter alone --------------------------------------------------------------------------------


def test_instantid_reads_the_raw_embedding_like_the_diffusers_reference(pair, face):
    pipe, ref = pair("instantid")
    assert face.embedding_norm != 1.0  # the tiny face stack records a real raw norm
    features = pipe.encode_identity(face)
    assert torch.allclose(features.face_norm, torch.tensor([face.embedding_norm]))
    torch.testing.assert_close(ours(pipe, face, method="adapter").images, reference(ref, face), atol=ATOL, rtol=0)
