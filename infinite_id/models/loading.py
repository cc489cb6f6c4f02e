"""One call from hub or disk to a working pipeline: ``load_pipeline(...) -> InfiniteIDPipeline``.

Steps: 1 resolve the settings (arguments > environment > defaults) and the device policy; 2 make sure every file
is here (download what is missing, or fail with one message listing all of it when offline); 3 load the base
model's components (a diffusers folder or one .safetensors file), the VAE and, when the adapter needs it, the CLIP
image encoder; 4 build the pipeline from components (not ``from_pretrained`` on our subclass, which would look for
an ``id_encoder`` folder); 5 load the identity adapter (converted on load) and the face analyzer its embeddings
need; 6 fast mode; 7 move to the device or set up CPU offload.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..adapters.convert import load_adapter
from ..config import SETTINGS, ModelSettings
from ..method.pipeline import InfiniteIDPipeline
from . import fast as fast_modes  # module-qualified: load_pipeline's ``fast_mode`` argument shadows the name
from . import hub
from .device import DevicePlan, plan

logger = logging.getLogger(__name__)
MEMORY_MODES = ("none", "model", "sequential")


def load_pipeline(
    base_model: str | None = None,
    vae: str | None = None,
    image_encoder: str | None = None,
    adapter: str | None = None,
    adapter_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    local_files_only: bool | None = None,
    fast_mode: str | None = None,
    memory_mode: str | None = None,
    face_analyzer=True,
    *,
    s_scale: float | None = None,
    models: ModelSettings | None = None,
    face_pack: str | None = None,
    face_root: str | None = None,
    cache_dir: str | Path | None = None,
) -> InfiniteIDPipeline:
    """Build the real pipeline. Every argument left None comes from ``models`` (default ``SETTINGS.models``,
    i.e. the defaults with INFINITE_ID_* environment overrides); see docs/weights.md.

    ``face_analyzer``: True builds the insightface analyzer the adapter needs (buffalo_l, or antelopev2 for
    InstantID), False/None loads none (pass ``id_embeds``), anything else is used as the analyzer.
    ``local_files_only``: None follows ``HF_HUB_OFFLINE``. Raises ``hub.MissingWeightsError`` (a ValueError)
    listing every missing file when something is not here and cannot be downloaded.
    """
    given = dict(base_model=base_model, vae=vae, image_encoder=image_encoder, adapter=adapter,
                 adapter_path=adapter_path, device=None if device is None else str(device),
                 dtype=None if dtype is None or isinstance(dtype, torch.dtype) else dtype, fast_mode=fast_mode,
                 memory_mode=memory_mode, s_scale=s_scale)
    models = dataclasses.replace(models or SETTINGS.models, **{k: v for k, v in given.items() if v is not None})
    if models.memory_mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {', '.join(MEMORY_MODES)}, got {models.memory_mode!r}.")
    device_plan = plan(models.device, dtype if isinstance(dtype, torch.dtype) else models.dtype)
    logger.info("Device: %s", device_plan.reason)
    resolved = hub.resolve(models, fp16=device_plan.dtype == torch.float16, face_pack=face_pack, face_root=face_root)
    cache = Path(cache_dir).expanduser() if cache_dir else hub.hub_cache_dir()
    fetch = {"local_files_only": local_files_only, "cache_dir": cache}

    # 2. Everything present (or downloaded now) before loading anything: one complete message when not.
    hub.fetch_all(hub.plan_files(resolved, faces=face_analyzer is True), **fetch)

    # 3-4. Components and the pipeline.
    components = _base_components(resolved, device_plan.dtype, fetch)
    if resolved.vae is not None:
        components["vae"] = _load_vae(resolved.vae, device_plan.dtype, fetch)
    encoder, processor = _image_encoder(resolved, device_plan.dtype, fetch)
    mode = fast_modes.fast_mode(models.fast_mode)
    components["scheduler"] = fast_modes.scheduler_for(None, components["scheduler"].config)
    pipe = InfiniteIDPipeline(
        **components, image_encoder=encoder, feature_extractor=processor, id_encoder=None,
        face_analyzer=_face_analyzer(face_analyzer, resolved),
    )

    # 5. The identity branch.
    adapter_file = hub.local_file(resolved.adapter_file, role="identity adapter", **fetch)
    # A file of one's own is checked against the adapter named for it, or recognised when none is named.
    kind = models.adapter if models.adapter_path else resolved.adapter.name
    info = load_adapter(pipe, adapter_file, kind, s_scale=models.s_scale, null_clip=False)
    _check_face_pack(pipe)
    logger.info("Identity adapter: %s (%s, %s tokens, LoRA %s)", info["title"], info["file"], info["num_tokens"],
                info["lora"])

    # 6. Fast mode: a distilled LoRA fused into the UNet, and its scheduler.
    if mode is not None:
        lora_file = hub.local_file(resolved.fast_lora, role="fast-mode LoRA", **fetch)
        fast_modes.apply_fast_mode(pipe, mode, str(lora_file))

    # 7. Device and memory; then the null identity's CLIP pass, on the device (not in fp16 on a CPU).
    _place(pipe, device_plan, models.memory_mode)
    if getattr(pipe.id_encoder, "needs_clip", False) and hasattr(pipe.id_encoder, "set_null_clip_from"):
        pipe.id_encoder.set_null_clip_from(pipe.image_encoder, pipe._execution_device)
    pipe.set_progress_bar_config(disable=True)
    # Plain attributes for the app/CLI: which weights are in use and the sampling defaults they imply.
    pipe.weights_info = {**info, "base_model": models.base_model, "device": device_plan.reason,
                         "fast_mode": mode.name if mode else "off"}
    pipe.sampling_defaults = fast_modes.sampling_defaults(models.fast_mode)
    # Where the adapter file is, for verify-weights' diffusers reference; kept out of weights_info, which goes into
    # every PNG's metadata (a path of this machine has no business there).
    pipe.adapter_file = Path(adapter_file)
    return pipe


def _check_face_pack(pipe: InfiniteIDPipeline) -> None:
    """An adapter trained on one pack's ArcFace embeddings cannot read another pack's: they are different spaces."""
    needed = getattr(pipe.id_encoder, "face_pack", None)
    pack = getattr(pipe.face_analyzer, "pack", None)
    if needed and pack in hub.FACE_PACK_FILES and pack != needed:
        raise ValueError(f"{pipe.id_encoder.title} was trained on {needed} face embeddings, but the face analyzer "
                         f"uses {pack}: identities would not transfer. Use --face-pack {needed} (or name the adapter "
                         f"with --adapter so the right pack is chosen).")


def _base_components(resolved: hub.Resolved, dtype: torch.dtype, fetch: dict) -> dict:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = resolved.base
    if base.is_file:
        checkpoint = hub.local_file(base, role="base model (single file)", **fetch)
        configs = hub.local_folder(hub.Location(hub.DEFAULT_BASE_MODEL),
                                   hub.base_model_files(None, with_vae=True, weights=False), role="base configs",
                                   **fetch)
        single = StableDiffusionXLPipeline.from_single_file(
            str(checkpoint), config=str(configs), torch_dtype=dtype, local_files_only=True)
        return {name: getattr(single, name) for name in
                ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")}

    from diffusers import DDIMScheduler

    variant = resolved.settings.variant
    if base.local is None:
        folder = hub.local_folder(base, hub.base_model_files(variant, with_vae=resolved.vae is None),
                                  role="base model", **fetch)
    else:
        folder = base.local
    variant = hub.local_variant(folder, variant)  # a local folder may hold only the full-precision files

    parts = {
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, variant=variant),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=dtype,
                                                                      variant=variant),
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        "tokenizer_2": CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, variant=variant),
        "scheduler": DDIMScheduler.from_pretrained(folder / "scheduler"),
    }
    if resolved.vae is None:
        parts["vae"] = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, variant=variant)
    return parts


def _load_vae(location: hub.Location, dtype: torch.dtype, fetch: dict):
    from diffusers import AutoencoderKL

    if location.is_file:
        return AutoencoderKL.from_single_file(str(hub.local_file(location, role="VAE", **fetch)), torch_dtype=dtype)
    folder = hub.local_folder(location, ["config.json", "diffusion_pytorch_model.safetensors"], role="VAE", **fetch)
    return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)


def _image_encoder(resolved: hub.Resolved, dtype: torch.dtype, fetch: dict):
    """The CLIP ViT-H/14 image tower and the preprocessing IP-Adapter uses (CLIPImageProcessor defaults: 224 px,
    OpenAI mean/std), or (None, None) when the adapter reads no CLIP features."""
    if resolved.image_encoder is None:
        return None, None
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    folder = hub.local_folder(resolved.image_encoder, ["config.json", "model.safetensors"], role="CLIP image encoder",
                              **fetch)
    encoder = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype)
    size = encoder.config.image_size
    return encoder, CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=size)


def _face_analyzer(choice, resolved: hub.Resolved):
    if choice is None or choice is False:
        return None
    if choice is not True:
        return choice  # the caller's analyzer (checked against the adapter once it is loaded)
    from ..faces.analyzer import FaceAnalyzer

    return FaceAnalyzer(pack=resolved.face_pack, root=str(resolved.face_root))


def _place(pipe: InfiniteIDPipeline, device_plan: DevicePlan, memory_mode: str) -> None:
    if memory_mode == "none" or not device_plan.is_accelerator:
        pipe.to(device_plan.device)
        return
    # The ID encoder is small and is called with a dataclass accelerate's hooks cannot move: keep it resident.
    pipe._exclude_from_cpu_offload = [*getattr(pipe, "_exclude_from_cpu_offload", []), "id_encoder"]
    if memory_mode == "model":
        pipe.enable_model_cpu_offload(device=device_plan.device)
    else:
        pipe.enable_sequential_cpu_offload(device=device_plan.device)
