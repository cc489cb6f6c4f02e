"""Weights from hub or disk: the download plan, the dry run, the start-up check, the device policy, loading a real
pipeline from local folders, fast mode. Offline: the hub cache is a temporary folder and the network is blocked."""

import dataclasses
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from adapter_specs import faceid_plusv2_image_proj, ip_adapter_layers, nested, random_tensors
from conftest import generate, random_identity

from infinite_id.adapters.convert import load_adapter
from infinite_id.config import ModelSettings, model_settings_from_env
from infinite_id.method.attention import check_installed
from infinite_id.method.checkpoint import save_checkpoint
from infinite_id.models import device as dev
from infinite_id.models import fetching, hub
from infinite_id.models.fast import FAST_MODES, apply_fast_mode, fast_mode, sampling_defaults
from infinite_id.models.fetching import startup_check
from infinite_id.models.hub import Location, MissingWeightsError, Needed, plan_files, resolve
from infinite_id.models.options import add_model_arguments, download_main, settings_from_args
from infinite_id.testing import CROSS_DIM, VISION_DIM, tiny_pipeline

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULTS = ModelSettings()  # the defaults, without this machine's environment


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or download fails the test."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and insightface root, offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def put_in_cache(cache: Path, repo_id: str, filename: str, data: bytes = b"x") -> Path:
    """A file laid out as huggingface_hub stores it (refs/main -> snapshots/<commit>/<filename>)."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sources(files: list[Needed]) -> set[tuple[str | None, str]]:
    return {(f.repo_id, f.filename) for f in files}


# --- the plan ---------------------------------------------------------------------------------------------------


def test_locations(tmp_path):
    assert Location.parse("h94/IP-Adapter/models/image_encoder") == Location("h94/IP-Adapter", "models/image_encoder")
    assert Location.parse("owner/repo/sub/model.safetensors").is_file
    assert Location.parse(str(tmp_path)).local == tmp_path
    assert Location.parse("./not/there").local is not None
    with pytest.raises(ValueError, match="neither an existing path nor a hub reference"):
        Location.parse("justaname")


def test_default_plan_is_the_published_files(tmp_path):
    files = plan_files(resolve(DEFAULTS, fp16=True, face_root=tmp_path))
    got = sources(files)
    for name in ("model_index.json", "unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors",
                 "text_encoder_2/model.fp16.safetensors", "tokenizer_2/vocab.json", "scheduler/scheduler_config.json"):
        assert (SDXL, name) in got
    assert not any(f.repo_id == SDXL and f.filename.startswith("vae/") for f in files)  # fp16: the fixed VAE instead
    assert ("madebyollin/sdxl-vae-fp16-fix", "diffusion_pytorch_model.safetensors") in got
    assert ("h94/IP-Adapter", "models/image_encoder/model.safetensors") in got
    assert ("h94/IP-Adapter-FaceID", "ip-adapter-faceid-plusv2_sdxl.bin") in got
    faces = [f for f in files if f.pack]
    assert {f.pack for f in faces} == {"buffalo_l"} and all(f.url.endswith("buffalo_l.zip") for f in faces)
    assert {f.local for f in faces} == {tmp_path / "models" / "buffalo_l" / n for n in hub.FACE_PACK_FILES["buffalo_l"]}


def test_plans_follow_dtype_adapter_and_all(tmp_path):
    bf16 = sources(plan_files(resolve(DEFAULTS, fp16=False, face_root=tmp_path)))
    assert (SDXL, "vae/diffusion_pytorch_model.fp16.safetensors") in bf16
    assert not any(repo == "madebyollin/sdxl-vae-fp16-fix" for repo, _ in bf16)
    instant = plan_files(resolve(dataclasses.replace(DEFAULTS, adapter="instantid"), fp16=True, face_root=tmp_path))
    assert ("InstantX/InstantID", "ip-adapter.bin") in sources(instant)
    assert not any(f.role == "CLIP image encoder" for f in instant)  # InstantID reads no CLIP features
    assert {(f.pack, f.repo_id) for f in instant if f.pack} == {("antelopev2", "DIAMONIK7777/antelopev2")}
    everything = plan_files(resolve(DEFAULTS, fp16=True, face_root=tmp_path), everything=True)
    got = sources(everything)
    assert {("h94/IP-Adapter", "sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors"),
            ("InstantX/InstantID", "ip-adapter.bin"), ("h94/IP-Adapter-FaceID", "ip-adapter-faceid-plusv2_sdxl.bin"),
            ("ByteDance/Hyper-SD", "Hyper-SDXL-8steps-CFG-lora.safetensors"),
            ("ByteDance/SDXL-Lightning", "sdxl_lightning_8step_lora.safetensors"),
            (SDXL, "vae/diffusion_pytorch_model.fp16.safetensors")} <= got
    assert {f.pack for f in everything if f.pack} == {"buffalo_l", "antelopev2"}
    single = plan_files(resolve(dataclasses.replace(DEFAULTS, base_model="someone/finetune/model.safetensors"),
                                fp16=True, face_root=tmp_path))
    assert ("someone/finetune", "model.safetensors") in sources(single)
    assert (SDXL, "unet/config.json") in sources(single) and not any(f.filename.endswith("fp16.safetensors")
                                                                       for f in single if f.repo_id == SDXL)


def test_settings_from_environment_and_flags(monkeypatch):
    monkeypatch.setenv("INFINITE_ID_BASE_MODEL", "me/my-sdxl")
    monkeypatch.setenv("INFINITE_ID_ADAPTER", "instantid")
    monkeypatch.setenv("INFINITE_ID_FAST_MODE", "hyper-sd")
    monkeypatch.setenv("INFINITE_ID_VARIANT", "")
    env = model_settings_from_env()
    assert (env.base_model, env.adapter, env.fast_mode, env.variant) == ("me/my-sdxl", "instantid", "hyper-sd", None)
    import argparse

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    flags = settings_from_args(parser.parse_args(["--adapter", "plus-face", "--s-scale", "0.5"]), env)
    assert (flags.base_model, flags.adapter, flags.s_scale) == ("me/my-sdxl", "plus-face", 0.5)


# --- dry run, start-up check, fetching ----------------------------------------------------------------------------


def test_dry_run_lists_every_file_and_its_state_without_network(cache, tmp_path, no_network, capsys):
    cached = put_in_cache(cache, "h94/IP-Adapter-FaceID", "ip-adapter-faceid-plusv2_sdxl.bin")
    # Planning for a GPU box (fp16, so the fp16-fix VAE) works on a machine without one.
    assert download_main(["--dry-run", "--device", dev.ACCELERATOR, "--face-root", str(tmp_path / "faces")]) == 0
    out = capsys.readouterr().out
    assert f"cached at {cached}" in out
    assert "source: hub h94/IP-Adapter-FaceID : ip-adapter-faceid-plusv2_sdxl.bin" in out
    assert "source: hub madebyollin/sdxl-vae-fp16-fix : diffusion_pytorch_model.safetensors" in out
    assert "source: insightface download https://github.com/deepinsight/insightface/releases/download/" in out
    expected = len(plan_files(resolve(DEFAULTS, fp16=True, face_root=tmp_path / "faces")))
    assert out.count("MISSING") == expected - 1
    assert f"{expected} files, {expected - 1} missing. Run `python -m infinite_id download`" in out


def test_startup_check_offline_with_an_empty_cache_is_one_readable_message(cache, tmp_path, no_network):
    with pytest.raises(MissingWeightsError) as caught:
        startup_check(DEFAULTS, fp16=True, face_root=tmp_path / "faces")
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    lines = message.splitlines()
    assert lines[0].startswith("Infinite-ID cannot start: ") and lines[0].endswith("weight files are missing.")
    for role in ("base model", "VAE", "CLIP image encoder", "identity adapter", "face models (buffalo_l)"):
        assert any(line.startswith(f"  - {role}:") for line in lines), role
    assert f"looked in the Hugging Face cache {cache}" in message
    assert str(tmp_path / "faces" / "models" / "buffalo_l") in message
    assert "Offline mode is on" in message and "`python -m infinite_id download`" in message
    assert "Traceback" not in message and len(lines) <= 12 and max(map(len, lines)) < 400


def test_startup_check_passes_when_everything_is_here(cache, tmp_path, no_network):
    files = plan_files(resolve(DEFAULTS, fp16=True, face_root=tmp_path))
    for item in files:
        if item.pack:
            item.local.parent.mkdir(parents=True, exist_ok=True)
            item.local.write_bytes(b"onnx")
        else:
            put_in_cache(cache, item.repo_id, item.filename)
    startup_check(DEFAULTS, fp16=True, face_root=tmp_path)
    assert fetching.fetch(files[0]) == fetching.find_local(files[0])  # cached: no download attempted


def test_offline_fetch_never_downloads(cache, no_network):
    item = Needed("identity adapter", "ip-adapter.bin", repo_id="InstantX/InstantID")
    with pytest.raises(MissingWeightsError, match="identity adapter: ip-adapter.bin \\(from InstantX/InstantID"):
        fetching.fetch(item)


def test_download_fetches_only_what_is_missing(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake_download(repo_id, filename, cache_dir=None, local_dir=None, **_):
        calls.append((repo_id, filename))
        if local_dir:
            path = Path(local_dir) / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            return str(path)
        return str(put_in_cache(Path(cache_dir), repo_id, filename))

    def fake_insightface(item):
        for name in hub.FACE_PACK_FILES[item.pack]:
            (item.local.parent / name).parent.mkdir(parents=True, exist_ok=True)
            (item.local.parent / name).write_bytes(b"onnx")
        return item.local

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(fetching, "_insightface_fetch", fake_insightface)
    args = ["--adapter", "instantid", "--dtype", "fp16", "--face-root", str(tmp_path / "faces")]
    put_in_cache(cache, "InstantX/InstantID", "ip-adapter.bin")
    assert download_main(args) == 0
    assert ("InstantX/InstantID", "ip-adapter.bin") not in calls and (SDXL, "model_index.json") in calls
    assert ("DIAMONIK7777/antelopev2", "glintr100.onnx") in calls  # straight into the insightface folder
    assert (tmp_path / "faces" / "models" / "antelopev2" / "glintr100.onnx").is_file()
    calls.clear()
    assert download_main(args) == 0 and calls == []
    assert "All " in capsys.readouterr().out


# --- device policy ----------------------------------------------------------------------------------------------


def test_device_policy(monkeypatch):
    monkeypatch.delenv("INFINITE_ID_DTYPE", raising=False)
    monkeypatch.delenv("INFINITE_ID_DEVICE", raising=False)
    cpu = torch.device("cpu")
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda native=native: native)
        assert dev.pick_dtype(cpu)[0] == expected
        assert dev.pick_dtype(cpu, "fp16")[0] == expected  # fp16 on CPU falls back
    assert dev.pick_dtype(cpu, "fp32")[0] == torch.float32
    monkeypatch.setenv("INFINITE_ID_DTYPE", "fp32")
    assert dev.pick_dtype(cpu)[0] == torch.float32
    monkeypatch.delenv("INFINITE_ID_DTYPE")
    assert dev.pick_dtype(torch.device("mps"))[0] == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = dev.pick_device()
    assert gpu.type == dev.ACCELERATOR
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dev.pick_dtype(gpu)[0] == torch.float16 and dev.pick_dtype(gpu, "bf16")[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dev.pick_dtype(gpu, "bf16")[0] == torch.float16
    assert dev.DevicePlan(gpu, torch.float16, "").needs_fixed_vae
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        dev.pick_device(dev.ACCELERATOR)
    with pytest.raises(ValueError, match="Unknown dtype"):
        dev.parse_dtype("fp8")


def test_the_accelerator_is_named_in_one_place():
    root = Path(__file__).resolve().parents[1]
    literal = re.compile(r"""["']cuda(:\d+)?["']""")
    offenders = [str(p.relative_to(root)) for p in [*root.glob("infinite_id/*.py"), root / "app.py"]
                 if p.is_file() and p.name != "device.py" and literal.search(p.read_text())]
    assert offenders == []


# --- loading a pipeline from local folders ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    """A tiny SDXL-layout diffusers folder, a CLIP image-encoder folder and a FaceID-PlusV2-layout file on disk."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from infinite_id import testing

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tokenizer = testing.tiny_tokenizer()
    text_config = testing._text_config(len(tokenizer))
    StableDiffusionXLPipeline(
        vae=testing.tiny_vae(), text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer=tokenizer,
        tokenizer_2=testing.tiny_tokenizer(), unet=testing.tiny_unet(), scheduler=testing.tiny_scheduler(),
    ).save_pretrained(root / "base")
    testing.tiny_image_encoder()[0].save_pretrained(root / "clip")
    spec = {**{f"image_proj.{k}": v for k, v in faceid_plusv2_image_proj(cross=CROSS_DIM, clip_dim=VISION_DIM).items()},
            **{f"ip_adapter.{k}": v for k, v in ip_adapter_layers([64] * 8, CROSS_DIM, lora_rank=4).items()}}
    torch.save(nested(random_tensors(spec)), root / "faceid.bin")
    return root


def test_load_pipeline_from_local_folders(local_models, cache, no_network):
    from infinite_id.models.loading import load_pipeline

    pipe = load_pipeline(base_model=str(local_models / "base"), image_encoder=str(local_models / "clip"),
                         adapter_path=str(local_models / "faceid.bin"), device="cpu", dtype="fp32",
                         face_analyzer=False)
    assert pipe.weights_info["kind"] == "faceid-plusv2" and pipe.weights_info["fast_mode"] == "off"
    assert pipe.id_encoder.kind == "faceid-plusv2" and pipe.unet.dtype == torch.float32
    assert pipe.id_encoder.null_clip.shape == (1, 17, VISION_DIM)  # the zero-pixel CLIP pass ran after placement
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # the paper's sampler
    assert (pipe.sampling_defaults.num_inference_steps, pipe.sampling_defaults.guidance_scale) == (30, 5.0)
    out = generate(pipe, method="adapter", id_embeds=random_identity(1), num_inference_steps=1)
    assert out.images.shape == (1, 4, 32, 32) and torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="is an IP-Adapter-FaceID-PlusV2 checkpoint"):
        load_pipeline(base_model=str(local_models / "base"), adapter="instantid",
                      adapter_path=str(local_models / "faceid.bin"), device="cpu", dtype="fp32", face_analyzer=False)


def test_a_face_analyzer_of_another_embedding_space_is_refused(local_models, cache, no_network):
    from types import SimpleNamespace

    from infinite_id.models.loading import load_pipeline

    with pytest.raises(ValueError, match="trained on buffalo_l face embeddings, but the face analyzer uses antelopev2"):
        load_pipeline(base_model=str(local_models / "base"), image_encoder=str(local_models / "clip"),
                      adapter_path=str(local_models / "faceid.bin"), device="cpu", dtype="fp32",
                      face_analyzer=SimpleNamespace(pack="antelopev2"))


def test_load_pipeline_offline_names_everything_missing(cache, tmp_path, no_network):
    from infinite_id.models.loading import load_pipeline

    with pytest.raises(MissingWeightsError) as caught:
        load_pipeline(device="cpu", dtype="fp32", face_root=str(tmp_path / "faces"))
    message = str(caught.value)
    for what in ("base model", "CLIP image encoder", "identity adapter", "face models (buffalo_l)"):
        assert f"- {what}:" in message


# --- fast mode and native checkpoints ---------------------------------------------------------------------------


def tiny_lora(pipe, seed=0, scale=0.3) -> dict[str, torch.Tensor]:
    """A LoRA in kohya's key format (what the Hyper-SD and Lightning files use) on every attention projection."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                          "attn1.to_out.0", "attn2.to_out.0")):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=g) * scale
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=g) * scale
            state[f"{key}.alpha"] = torch.tensor(4.0)
    return state


def test_fast_mode_lora_changes_both_streams_and_keeps_our_processors(identity):
    pipe = tiny_pipeline(seed=0)
    before = generate(pipe, id_embeds=identity, num_inference_steps=1)
    processors = dict(pipe.unet.attn_processors)
    defaults = apply_fast_mode(pipe, "hyper-sd", tiny_lora(pipe))
    check_installed(pipe.unet)
    assert all(processors[k] is v for k, v in pipe.unet.attn_processors.items())
    assert (defaults.num_inference_steps, defaults.guidance_scale) == (8, 5.0) == (
        sampling_defaults("hyper-sd").num_inference_steps, sampling_defaults("hyper-sd").guidance_scale)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.timestep_spacing == "trailing"
    after = generate(pipe, id_embeds=identity, num_inference_steps=1)
    assert (after.images - before.images).abs().max() > 1e-2
    assert (after.text_images - before.text_images).abs().max() > 1e-2  # the LoRA is in the UNet: both streams
    neutral = generate(pipe, id_embeds=identity, num_inference_steps=1, id_scale=0, semantic_scale=0, style_strength=0)
    assert (neutral.images - neutral.text_images).abs().max() < 1e-3  # the method's identity still holds


def test_fast_mode_table():
    assert fast_mode(None) is None and fast_mode("off") is None and fast_mode("on") is FAST_MODES["hyper-sd"]
    lightning = FAST_MODES["lightning"]
    assert (lightning.defaults.num_inference_steps, lightning.defaults.guidance_scale) == (8, 1.0)
    assert lightning.scheduler == "euler-trailing"
    assert (sampling_defaults().num_inference_steps, sampling_defaults().guidance_scale) == (30, 5.0)
    with pytest.raises(ValueError, match="Unknown fast mode 'lcm'; choose one of hyper-sd, lightning"):
        fast_mode("lcm")


def test_native_checkpoints_load_through_load_adapter(tmp_path):
    path = save_checkpoint(tiny_pipeline(seed=5), tmp_path / "native.safetensors", base_model="tiny")
    dst = tiny_pipeline(seed=0)
    assert load_adapter(dst, path)["kind"] == "infinite-id"
    with pytest.raises(ValueError, match="is a native Infinite-ID checkpoint, not IP-Adapter-Plus-Face"):
        load_adapter(dst, path, "plus-face")


# --- the real thing -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_defaults_make_one_1024_image():
    """Loads the real default weights and makes one 1024 x 1024 image. Needs a CUDA GPU and the downloaded weights
    (`python -m infinite_id download`); skipped otherwise, with the reason."""
    if not dev.accelerator_available():
        pytest.skip("needs a CUDA GPU")
    try:
        startup_check()
    except MissingWeightsError as exc:
        pytest.skip(f"the real weights are not downloaded: {str(exc).splitlines()[0]}")
    from PIL import Image

    from infinite_id.models.loading import load_pipeline

    pipe = load_pipeline()
    photo = Image.open(Path(__import__("insightface").__file__).parent / "data" / "images" / "Tom_Hanks_54745.png")
    out = pipe("a photo of a man as an astronaut, detailed, sharp", id_image=photo.convert("RGB"),
               generator=torch.Generator(pipe.device).manual_seed(0), height=1024, width=1024)
    image = np.asarray(out.images[0])
    assert image.shape == (1024, 1024, 3) and image.std() > 10  # not black, not flat
