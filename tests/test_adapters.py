"""Public identity adapters converted on load: exact SDXL key names and shapes, tiny forward passes, wrong files.

SDXL-sized checks run on shapes only (a meta-device SDXL UNet and zero-stride tensors), so they cost no memory.
Forward checks run the same converters on tiny files through ``tiny_pipeline()``.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from adapter_specs import (
    SD15_CONTEXT,
    SD15_HIDDEN,
    SDXL_HIDDEN,
    SDXL_UNET_CONFIG,
    faceid_plusv2_image_proj,
    ip_adapter_layers,
    nested,
    random_tensors,
    resampler_image_proj,
    sdxl_file,
    shapes_only,
)
from conftest import generate
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from infinite_id.adapters.convert import convert_adapter, load_adapter
from infinite_id.adapters.encoders import ADAPTERS, FaceIDPlusEncoder, InstantIDEncoder, PlusFaceEncoder
from infinite_id.method.attention import id_adapter_layers, install_id_processors
from infinite_id.method.id_encoder import IdentityFeatures
from infinite_id.testing import CROSS_DIM, VISION_DIM, tiny_pipeline

STEPS = 1  # one denoising step shows every difference these tests look for
TINY_CLIP_TOKENS = 17


# --- SDXL size: key names and shapes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_unet():
    """The real SDXL UNet architecture with our processors, on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        install_id_processors(unet)
    return unet


def convert_meta(unet, flat, what, kind=None):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... is a no-op": shapes are the point
        return convert_adapter(unet, flat, what, kind)


def test_sdxl_layer_numbering_is_ip_adapter_numbering(sdxl_unet):
    layers = id_adapter_layers(sdxl_unet)
    assert sorted(layers) == list(range(1, 140, 2))  # 70 cross-attention layers, numbered 1, 3, ..., 139
    assert [p.to_k_ip.out_features for p in layers.values()] == SDXL_HIDDEN
    assert {p.to_k_ip.in_features for p in layers.values()} == {2048}


def test_published_sdxl_shapes_are_written_down():
    faceid = sdxl_file("faceid-plusv2")
    assert faceid["image_proj.proj.0.weight"] == (1024, 512)
    assert faceid["image_proj.proj.2.weight"] == (8192, 1024)
    assert faceid["image_proj.perceiver_resampler.proj_in.weight"] == (2048, 1280)
    assert faceid["image_proj.perceiver_resampler.layers.3.0.to_kv.weight"] == (4096, 2048)
    assert faceid["image_proj.perceiver_resampler.layers.3.1.1.weight"] == (8192, 2048)
    assert faceid["ip_adapter.139.to_k_ip.weight"] == (1280, 2048)
    assert faceid["ip_adapter.0.to_q_lora.down.weight"] == (128, 640)
    assert faceid["ip_adapter.1.to_k_lora.down.weight"] == (128, 2048)
    assert faceid["ip_adapter.1.to_out_lora.up.weight"] == (640, 128)
    assert len(faceid) == 12 + 4 * 11 + 70 * 2 + 140 * 8  # 11 tensors per perceiver layer
    plus = sdxl_file("plus-face")
    assert plus["image_proj.latents"] == (1, 16, 1280) and plus["image_proj.proj_in.weight"] == (1280, 1280)
    assert plus["image_proj.proj_out.weight"] == (2048, 1280) and len(plus) == 7 + 4 * 11 + 140
    instant = sdxl_file("instantid")
    assert instant["image_proj.proj_in.weight"] == (1280, 512) and instant["image_proj.latents"] == (1, 16, 1280)


@pytest.mark.parametrize("kind,tokens,face_pack,needs_clip", [
    ("faceid-plusv2", 4, "buffalo_l", True), ("plus-face", 16, None, True), ("instantid", 16, "antelopev2", False),
])
def test_sdxl_files_convert_strictly(sdxl_unet, kind, tokens, face_pack, needs_clip):
    converted = convert_meta(sdxl_unet, shapes_only(sdxl_file(kind)), f"{kind}.bin")
    encoder = converted.encoder
    assert converted.kind == kind and encoder.kind == kind
    assert encoder.num_tokens == tokens and encoder.cross_attention_dim == 2048
    assert encoder.face_pack == face_pack == ADAPTERS[kind].face_pack and encoder.needs_clip == needs_clip
    assert converted.lora_rank == (128 if kind == "faceid-plusv2" else None)
    if kind == "faceid-plusv2":
        assert encoder.image_proj.perceiver_resampler.layers[0][0].heads == 32 and encoder.clip_layer == -2
    else:
        assert encoder.image_proj.layers[0][0].heads == 20


def test_faceid_file_given_as_plus_face_names_both(sdxl_unet):
    with pytest.raises(ValueError, match=r"is an IP-Adapter-FaceID-PlusV2 checkpoint .*perceiver_resampler.*not "
                                         r"IP-Adapter-Plus-Face"):
        convert_meta(sdxl_unet, shapes_only(sdxl_file("faceid-plusv2")), "faceid.bin", "plus-face")
    with pytest.raises(ValueError, match="is an InstantID face adapter checkpoint .*512-d ArcFace"):
        convert_meta(sdxl_unet, shapes_only(sdxl_file("instantid")), "ip-adapter.bin", "plus-face")


def test_sd15_adapter_on_sdxl_says_so(sdxl_unet):
    sd15 = {**{f"image_proj.{k}": v for k, v in resampler_image_proj(1280, 768, 16, 768).items()},
            **{f"ip_adapter.{k}": v for k, v in ip_adapter_layers(SD15_HIDDEN, SD15_CONTEXT).items()}}
    message = (r"16 cross-attention layers and 768-d context \(Stable Diffusion 1\.5\), but this one has 70 layers "
               r"with 2048-d context \(SDXL\)")
    with pytest.raises(ValueError, match=message):
        convert_meta(sdxl_unet, shapes_only(sd15), "ip-adapter-plus-face_sd15.bin", "plus-face")


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("ip_adapter.57.to_v_ip.weight"), r"1 missing keys: 57\.to_v_ip\.weight"),
    (lambda s: s.pop("ip_adapter.0.to_q_lora.up.weight"),
     r"The LoRA in faceid\.bin does not match this UNet's attention layers: it has no 0\.to_q_lora\.up\.weight"),
    (lambda s: s.__setitem__("ip_adapter.1.extra.weight", torch.zeros(1)), r"1 unexpected keys: 1\.extra\.weight"),
    (lambda s: s.__setitem__("image_proj.perceiver_resampler.layers.1.0.to_out.weight", torch.zeros(()).expand(2048, 1024)),
     r"1 mis-shaped keys: perceiver_resampler\.layers\.1\.0\.to_out\.weight: file \(2048, 1024\) vs model \(2048, 2048\)"),
    (lambda s: s.pop("image_proj.perceiver_resampler.layers.2.1.3.weight"),
     r"\(image_proj\).*1 missing keys: perceiver_resampler\.layers\.2\.1\.3\.weight"),
])
def test_strict_failures_name_the_keys(sdxl_unet, change, message):
    state = shapes_only(sdxl_file("faceid-plusv2"))
    change(state)
    with pytest.raises(ValueError, match=message):
        convert_meta(sdxl_unet, state, "faceid.bin")


def test_files_that_are_not_identity_adapters(sdxl_unet):
    plain = {"image_proj.proj.weight": torch.zeros(()).expand(8192, 1280), "image_proj.norm.weight": torch.zeros(2048),
             "ip_adapter.1.to_k_ip.weight": torch.zeros(()).expand(640, 2048)}
    with pytest.raises(ValueError, match="plain IP-Adapter .* not an identity adapter"):
        convert_meta(sdxl_unet, plain, "ip-adapter_sdxl.bin")
    with pytest.raises(ValueError, match="no ip_adapter.* keys"):
        convert_meta(sdxl_unet, {"image_proj.latents": torch.zeros(1, 2, 3)}, "half.bin")


# --- tiny size: forward passes through the real pipeline --------------------------------------------------------


def tiny_spec(kind: str, hidden: list[int], lora_rank: int | None = 4) -> dict[str, tuple]:
    if kind == "faceid-plusv2":
        image_proj, rank = faceid_plusv2_image_proj(cross=CROSS_DIM, clip_dim=VISION_DIM), lora_rank
    elif kind == "plus-face":
        image_proj, rank = resampler_image_proj(in_dim=VISION_DIM, dim=64, queries=16, out=CROSS_DIM), None
    else:
        image_proj, rank = resampler_image_proj(in_dim=512, dim=64, queries=16, out=CROSS_DIM), None
    return {**{f"image_proj.{k}": v for k, v in image_proj.items()},
            **{f"ip_adapter.{k}": v for k, v in ip_adapter_layers(hidden, CROSS_DIM, rank).items()}}


@pytest.fixture(scope="module")
def tiny():
    """A tiny pipeline this module may change (the session's shared ``pipe`` must stay as it is)."""
    return tiny_pipeline(seed=3)


@pytest.fixture(scope="module")
def hidden(tiny):
    return [p.to_k_ip.out_features for p in id_adapter_layers(tiny.unet).values()]


def write(tmp_path, kind, hidden, layout="bin", seed=0, **spec_kwargs):
    flat = random_tensors(tiny_spec(kind, hidden, **spec_kwargs), seed=seed)
    if layout == "bin":
        path = tmp_path / f"{kind}.bin"
        torch.save(nested(flat), path)
    else:
        path = tmp_path / f"{kind}.safetensors"
        save_file(flat, str(path))
    return path, flat


def features(seed=1):
    g = torch.Generator().manual_seed(seed)
    face = F.normalize(torch.randn(1, 512, generator=g), dim=-1)
    return IdentityFeatures(face=face, clip=torch.randn(1, TINY_CLIP_TOKENS, VISION_DIM, generator=g))


@pytest.fixture(scope="module")
def text_baseline(tiny):
    return generate(tiny, method="text", num_inference_steps=STEPS).images


@pytest.mark.parametrize("kind,layout", [("faceid-plusv2", "bin"), ("plus-face", "safetensors"),
                                         ("instantid", "bin")])
def test_converted_adapter_drives_the_identity_branch(tiny, hidden, text_baseline, tmp_path, kind, layout):
    path, flat = write(tmp_path, kind, hidden, layout)
    info = load_adapter(tiny, path, kind)
    assert info["kind"] == kind and info["file"] == path.name
    assert isinstance(tiny.id_encoder, {"faceid-plusv2": FaceIDPlusEncoder, "plus-face": PlusFaceEncoder,
                                        "instantid": InstantIDEncoder}[kind])
    layers = id_adapter_layers(tiny.unet)
    for i, proc in layers.items():  # the file's per-layer K/V are in our processors, bit for bit
        assert torch.equal(proc.to_k_ip.weight, flat[f"ip_adapter.{i}.to_k_ip.weight"])
        assert torch.equal(proc.to_v_ip.weight, flat[f"ip_adapter.{i}.to_v_ip.weight"])
    who = features()
    with_id = generate(tiny, method="adapter", id_embeds=who, num_inference_steps=STEPS).images
    assert (with_id - text_baseline).abs().max() > 1e-2
    # id_scale=0 with the LoRA off (FaceID files carry one; it acts even at id_scale 0): exactly the text baseline.
    zero = generate(tiny, method="adapter", id_embeds=who, id_scale=0, lora_scale=0, num_inference_steps=STEPS).images
    assert (zero - text_baseline).abs().max() < 1e-4


def diffusers_projection(unet, image_proj):
    """diffusers' own converter and projection classes on the same image_proj dict (an independent reference)."""
    return unet._convert_ip_adapter_image_proj_to_diffusers(image_proj, low_cpu_mem_usage=False)


@pytest.mark.parametrize("kind", ["faceid-plusv2", "plus-face", "instantid"])
def test_our_projection_equals_diffusers(tiny, hidden, kind):
    flat = random_tensors(tiny_spec(kind, hidden), seed=4)
    image_proj = {k.removeprefix("image_proj."): v for k, v in flat.items() if k.startswith("image_proj.")}
    converted = convert_adapter(tiny.unet, flat, "tiny", kind)
    ours, ref = converted.encoder.eval(), diffusers_projection(tiny.unet, image_proj).eval()
    who = features(5)
    with torch.no_grad():
        if kind == "faceid-plusv2":
            ref.clip_embeds, ref.shortcut, ref.shortcut_scale = who.clip[:, None], True, 0.7
            expected, got = ref(who.face), ours(who, s_scale=0.7)
        elif kind == "plus-face":
            expected, got = ref(who.clip), ours(who)
        else:  # InstantID reads the raw embedding: give ours the raw norm
            raw = IdentityFeatures(face=who.face, face_norm=torch.tensor([23.5]))
            expected, got = ref(who.face[:, None] * 23.5), ours(raw)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_null_tokens_are_each_adapters_unconditional_embedding(tiny, hidden, tmp_path):
    # IP-Adapter-(FaceID-)Plus: zero ArcFace embedding and the CLIP features of an all-zero pixel tensor.
    load_adapter(tiny, write(tmp_path, "faceid-plusv2", hidden)[0])
    enc = tiny.id_encoder
    pixels = torch.zeros(1, 3, tiny.image_encoder.config.image_size, tiny.image_encoder.config.image_size)
    with torch.no_grad():
        clip0 = tiny.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
        expected = enc(IdentityFeatures(face=torch.zeros(1, 512), clip=clip0))
        zero_features = enc(IdentityFeatures(face=torch.zeros(1, 512), clip=torch.zeros_like(clip0)))
        torch.testing.assert_close(enc.null_tokens(2), expected.expand(2, -1, -1))
        assert (expected - zero_features).abs().max() > 1e-3  # zero *pixels*, not zero features
    # InstantID: a zero ArcFace embedding through the resampler.
    load_adapter(tiny, write(tmp_path, "instantid", hidden)[0])
    with torch.no_grad():
        expected = tiny.id_encoder.image_proj(torch.zeros(1, 1, 512))
        torch.testing.assert_close(tiny.id_encoder.null_tokens(1), expected)


def test_faceid_s_scale_weighs_the_clip_branch(tiny, hidden, tmp_path):
    path = write(tmp_path, "faceid-plusv2", hidden)[0]
    load_adapter(tiny, path, s_scale=0.25)
    enc, who = tiny.id_encoder, features()
    assert enc.s_scale == 0.25
    with torch.no_grad():
        ids_only = enc.image_proj.norm(enc.image_proj.proj(who.face).reshape(1, 4, CROSS_DIM))
        torch.testing.assert_close(enc(who, s_scale=0.0), ids_only)  # shortcut with s=0: the ArcFace tokens alone
        a, b = enc(who), enc(who, s_scale=1.0)
        torch.testing.assert_close(a - ids_only, 0.25 * (b - ids_only), atol=1e-5, rtol=1e-4)


def test_instantid_restores_the_raw_embedding_scale(tiny, hidden, tmp_path):
    load_adapter(tiny, write(tmp_path, "instantid", hidden)[0], embedding_norm=18.0)
    enc, who = tiny.id_encoder, features()
    with torch.no_grad():
        by_default = enc(IdentityFeatures(face=who.face))
        torch.testing.assert_close(by_default, enc(IdentityFeatures(face=who.face * 18.0)))  # raw input: as is
        measured = enc(IdentityFeatures(face=who.face, face_norm=torch.tensor([25.0])))
        torch.testing.assert_close(measured, enc.image_proj(who.face[:, None] * 25.0))


def test_a_failed_load_changes_nothing(tiny, hidden, tmp_path):
    load_adapter(tiny, write(tmp_path, "plus-face", hidden)[0])
    encoder = tiny.id_encoder
    weights = {i: p.to_k_ip.weight.clone() for i, p in id_adapter_layers(tiny.unet).items()}
    path, flat = write(tmp_path, "faceid-plusv2", hidden, seed=9)
    flat.pop("ip_adapter.3.to_v_ip.weight")
    torch.save(nested(flat), path)
    with pytest.raises(ValueError, match=r"missing keys: 3\.to_v_ip\.weight"):
        load_adapter(tiny, path)
    assert tiny.id_encoder is encoder
    assert all(torch.equal(p.to_k_ip.weight, weights[i]) for i, p in id_adapter_layers(tiny.unet).items())


def test_a_clip_encoder_of_the_wrong_width_is_named(tiny, hidden, tmp_path):
    flat = {**{f"image_proj.{k}": v for k, v in resampler_image_proj(in_dim=48, dim=64, out=CROSS_DIM).items()},
            **{f"ip_adapter.{k}": v for k, v in ip_adapter_layers(hidden, CROSS_DIM).items()}}
    path = tmp_path / "bigger-clip.safetensors"
    save_file(random_tensors(flat), str(path))
    with pytest.raises(ValueError, match="reads 48-d CLIP features, but the image encoder gives 32-d ones"):
        load_adapter(tiny, path, "plus-face")


@pytest.mark.parametrize("layout", ["bin", "safetensors"])
def test_truncated_files_are_clear_errors(tiny, hidden, tmp_path, layout):
    path = write(tmp_path, "instantid", hidden, layout)[0]
    cut = tmp_path / f"cut{path.suffix}"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint \\(truncated or corrupt\\?\\)"):
        load_adapter(tiny, cut)
    with pytest.raises(ValueError, match="Checkpoint not found"):
        load_adapter(tiny, tmp_path / "nope.bin")
