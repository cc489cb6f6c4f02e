"""One call from hub or disk to a working pipeline: ``load_pipeline(...) -> InfiniteIDPipeline``.

Steps: 1 resolve the settings (arguments > environment > defaults) and the device policy; 2 make sure every file
is here (download what is missing, or fail with one message listing all of it when offline); 3 load the base
model's components (a diffusers folder or one .safetensors file), the VAE and, when the adapter needs it, the CLIP
image encoder; 4 build the pipeline from components (not ``from_pretrained`` on our subclass, which would look for
an ``id_encoder`` folder); 5 load the identity adapter (converted on load) and the face analyzer its embeddings
need; 6 fast mode; 7 the VRAM tier's memory options (``models.tiers``), the device or CPU offload, and ``torch.compile`` when asked.
The attention kernel and the tier are settled in step 1, before any weight loads: an explicit ``--attention
xformers`` that cannot run stops the program at once (``method.backends``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import torch

from ..adapters.convert import load_adapter
from ..config import COMPILE_MODES, SETTINGS, ModelSettings
from ..method.attention import fill_kv_cache, set_attention_backend
from ..method.backends import resolve_backend
from ..method.pipeline import InfiniteIDPipeline
from . import fast as fast_modes  # module-qualified: load_pipeline's ``fast_mode`` argument shadows the name
from . import fetching, hub, licences, tiers
from .device import free_memory, plan

logger = logging.getLogger(__name__)
MEMORY_MODES = tiers.MEMORY_MODES


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
    attention: str | None = None,
    vram_tier: str | None = None,
    compile: str | bool | None = None,
) -> InfiniteIDPipeline:
    """Build the real pipeline. Every argument left None comes from ``models`` (default ``SETTINGS.models``,
    i.e. the defaults with INFINITE_ID_* environment overrides); see docs/weights.md.

    ``face_analyzer``: True builds the insightface analyzer the adapter needs (buffalo_l, or antelopev2 for
    InstantID), False/None loads none (pass ``id_embeds``), anything else is used as the analyzer.
    ``local_files_only``: None follows ``HF_HUB_OFFLINE``. Raises ``hub.MissingWeightsError`` (a ValueError)
    listing every missing file when something is not here and cannot be downloaded.
    ``attention``: auto | sdpa | xformers (``method.backends``); ``vram_tier``: auto | 24 | 16 | 12 | 8 | 6
    (``models.tiers``; an explicit ``memory_mode`` overrides its placement); ``compile``: a ``torch.compile`` mode
    (True: "default"), see :func:`compile_unet`.
    """
    # 1. Settings: the arguments given over ``models``.
    models = _settings(models, base_model=base_model, vae=vae, image_encoder=image_encoder, adapter=adapter,
                       adapter_path=adapter_path, device=None if device is None else str(device),
                       dtype=None if dtype is None or isinstance(dtype, torch.dtype) else dtype, fast_mode=fast_mode,
                       memory_mode=memory_mode, s_scale=s_scale, attention=attention, vram_tier=vram_tier,
                       compile={True: "default", False: "off"}.get(compile, compile))
    device_plan = plan(models.device, dtype if isinstance(dtype, torch.dtype) else models.dtype)
    logger.info("Device: %s", device_plan.reason)
    # 1b. Attention kernel, VRAM tier and compile settle before anything loads: a wrong request fails in seconds.
    backend = resolve_backend(models.attention, device_plan.device, device_plan.dtype)
    tier = tiers.choose(models.vram_tier, free_memory(device_plan.device), models.memory_mode)
    compile_mode = _check_compile(models.compile, tier)
    resolved = hub.resolve(models, fp16=device_plan.dtype == torch.float16, face_pack=face_pack, face_root=face_root)
    cache = Path(cache_dir).expanduser() if cache_dir else fetching.hub_cache_dir()
    lookup = {"local_files_only": local_files_only, "cache_dir": cache}

    # 2. Everything present (or downloaded now) before loading anything: one complete message when not.
    fetching.fetch_all(hub.plan_files(resolved, faces=face_analyzer is True), **lookup)

    # 3-4. Components and the pipeline.
    components = _base_components(resolved, device_plan.dtype, lookup)
    if resolved.vae is not None:
        components["vae"] = _load_vae(resolved.vae, device_plan.dtype, lookup)
    encoder, processor = _image_encoder(resolved, device_plan.dtype, lookup)
    mode = fast_modes.fast_mode(models.fast_mode)
    components["scheduler"] = fast_modes.scheduler_for(None, components["scheduler"].config)
    pipe = InfiniteIDPipeline(
        **components, image_encoder=encoder, feature_extractor=processor, id_encoder=None,
        face_analyzer=_face_analyzer(face_analyzer, resolved),
    )

    # 5. The identity branch.
    adapter_file, info = _identity_branch(pipe, resolved, models, lookup)

    # 6. Fast mode: a distilled LoRA fused into the UNet, and its scheduler.
    if mode is not None:
        lora_file = fetching.local_file(resolved.fast_lora, role="fast-mode LoRA", **lookup)
        fast_modes.apply_fast_mode(pipe, mode, str(lora_file))

    # 7. Attention kernel, memory options and placement, compile; then the null identity's CLIP pass, on the device
    # (not in fp16 on a CPU).
    set_attention_backend(pipe.unet, backend)
    tier = tiers.apply(pipe, tier, device_plan.device)
    if compile_mode != "off":
        compile_unet(pipe, compile_mode)
    if getattr(pipe.id_encoder, "needs_clip", False) and hasattr(pipe.id_encoder, "set_null_clip_from"):
        pipe.id_encoder.set_null_clip_from(pipe.image_encoder, pipe._execution_device)
    pipe.set_progress_bar_config(disable=True)
    # Plain attributes for the app/CLI: which weights are in use and the sampling defaults they imply.
    pipe.weights_info = {**info, "base_model": models.base_model, "device": device_plan.reason,
                         "fast_mode": mode.name if mode else "off", "attention": backend.name,
                         "vram_tier": tier.name, "memory": tiers.describe(tier), "memory_mode": tier.memory_mode,
                         "compile": compile_mode,
                         "license_clean": models.license_clean}
    pipe.sampling_defaults = fast_modes.sampling_defaults(models.fast_mode)
    # Where the adapter file is, for verify-weights' diffusers reference; kept out of weights_info, which goes into
    # every PNG's metadata (a path of this machine has no business there).
    pipe.adapter_file = Path(adapter_file)
    return pipe


def _settings(models: ModelSettings | None, **given) -> ModelSettings:
    """``models`` (default ``SETTINGS.models``) with every argument that was given (not None) put over it."""
    return dataclasses.replace(models or SETTINGS.models, **{k: v for k, v in given.items() if v is not None})


def _identity_branch(pipe: InfiniteIDPipeline, resolved, models: ModelSettings, lookup: dict) -> tuple[Path, dict]:
    """Load the identity adapter into ``pipe``: (its file, what ``load_adapter`` says of it)."""
    adapter_file = fetching.local_file(resolved.adapter_file, role="identity adapter", **lookup)
    if models.license_clean and resolved.adapter.name == "infinite-id":
        licences.check_checkpoint(adapter_file)  # before it touches the pipeline
    # A file of one's own is checked against the adapter named for it, or recognised when none is named.
    kind = models.adapter if models.adapter_path else resolved.adapter.name
    info = load_adapter(pipe, adapter_file, kind, s_scale=models.s_scale, null_clip=False)
    _check_face_pack(pipe)
    logger.info("Identity adapter: %s (%s, %s tokens, LoRA %s)", info["title"], info["file"], info["num_tokens"],
                info["lora"])
    return adapter_file, info


def _check_face_pack(pipe: InfiniteIDPipeline) -> None:
    """An adapter trained on one pack's ArcFace embeddings cannot read another pack's: they are different spaces."""
    needed = getattr(pipe.id_encoder, "face_pack", None)
    pack = getattr(pipe.face_analyzer, "pack", None)
    if needed and pack in hub.FACE_PACK_FILES and pack != needed:
        raise ValueError(f"{pipe.id_encoder.title} was trained on {needed} face embeddings, but the face analyzer "
                         f"uses {pack}: identities would not transfer. Use --face-pack {needed} (or name the adapter "
                         f"with --adapter so the right pack is chosen).")


def _base_components(resolved: hub.Resolved, dtype: torch.dtype, lookup: dict) -> dict:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = resolved.base
    if base.is_file:
        checkpoint = fetching.local_file(base, role="base model (single file)", **lookup)
        configs = fetching.local_folder(hub.Location(hub.DEFAULT_BASE_MODEL),
                                     hub.base_model_files(None, with_vae=True, weights=False), role="base configs",
                                     **lookup)
        single = StableDiffusionXLPipeline.from_single_file(
            str(checkpoint), config=str(configs), torch_dtype=dtype, local_files_only=True)
        return {name: getattr(single, name) for name in
                ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")}

    from diffusers import DDIMScheduler

    variant = resolved.settings.variant
    if base.local is None:
        folder = fetching.local_folder(base, hub.base_model_files(variant, with_vae=resolved.vae is None),
                                    role="base model", **lookup)
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


def _load_vae(location: hub.Location, dtype: torch.dtype, lookup: dict):
    from diffusers import AutoencoderKL

    if location.is_file:
        return AutoencoderKL.from_single_file(str(fetching.local_file(location, role="VAE", **lookup)), torch_dtype=dtype)
    folder = fetching.local_folder(location, ["config.json", "diffusion_pytorch_model.safetensors"], role="VAE", **lookup)
    return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)


def _image_encoder(resolved: hub.Resolved, dtype: torch.dtype, lookup: dict):
    """The CLIP ViT-H/14 image tower and the preprocessing IP-Adapter uses (CLIPImageProcessor defaults: 224 px,
    OpenAI mean/std), or (None, None) when the adapter reads no CLIP features."""
    if resolved.image_encoder is None:
        return None, None
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    folder = fetching.local_folder(resolved.image_encoder, ["config.json", "model.safetensors"], role="CLIP image encoder",
                                **lookup)
    encoder = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype)
    size = encoder.config.image_size
    return encoder, CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=size)


def _face_analyzer(choice, resolved: hub.Resolved):
    if choice is None or choice is False:
        return None
    if choice is not True:
        return choice  # the caller's analyzer (checked against the adapter once it is loaded)
    from ..faces.analyzer import FaceAnalyzer

    if not resolved.settings.license_clean:
        return FaceAnalyzer(pack=resolved.face_pack, root=str(resolved.face_root))
    # Licence-clean: MTCNN even where the pack folder also holds a (non-commercial) SCRFD, and AuraFace's own file.
    analyzer = FaceAnalyzer(pack=resolved.face_pack, root=str(resolved.face_root), detector=licences.CLEAN_DETECTOR)
    licences.check_recognizer(analyzer.recognizer_file)
    return analyzer


def _check_compile(mode: str | None, tier: tiers.Tier) -> str:
    mode = str(mode or "off").lower()
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {mode!r}.")
    if mode != "off" and tier.memory_mode != "none":
        raise ValueError(f"--compile needs the UNet resident on the GPU, but VRAM tier {tier.name} uses "
                         f"{tier.memory_mode} CPU offload (its hooks move weights in and out of the graph); use "
                         "--vram-tier 12 or larger, or leave --compile off.")
    return mode


def compile_unet(pipe, mode: str = "default", backend: str | object = "inductor") -> None:
    """``torch.compile`` the UNet with our processors inside the graph: one graph per batch layout.

    Static shapes (``dynamic=False``): each layout (4 rows mixing; 2 rows after the window; 2 rows plain ...) gets
    its own graph, compiled on its first call; later calls with any prompt, identity or seed reuse it. The per-call
    K/V cache (``IDCall.kv_cache``: identity and text keys/values, projected once per call) is filled before each
    compiled forward, outside the graph (``fill_kv_cache``), so the graph always reads a full cache under the same
    string keys: dynamo guards on those keys and the tensors' shapes, never on a tensor's identity, and no step or
    call recompiles. Each layout's first call is logged with its time (compilation plus one step), and kept in
    ``pipe.compile_report``.
    """
    # Dynamo's default of 8 graphs per function would send the 9th layout (9 aspect presets x 3 layouts) back to
    # eager; the limit is process-wide, and the process that asks for --compile is the one serving this pipeline.
    config = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, key):
            setattr(config, key, max(getattr(config, key), 64))
    compiled = torch.compile(pipe.unet, mode=None if mode == "default" else mode, backend=backend, dynamic=False)
    compiled.register_forward_pre_hook(_fill_kv_cache, with_kwargs=True)
    report = _FirstCalls()
    compiled.register_forward_pre_hook(report.before, with_kwargs=True)
    compiled.register_forward_hook(report.after, with_kwargs=True)
    pipe.unet = compiled
    pipe.compile_report = report.seconds


def _fill_kv_cache(module, args, kwargs):
    # Runs eagerly before the compiled forward (hooks on the compiled wrapper are not traced).
    call = (kwargs.get("cross_attention_kwargs") or {}).get("id_call")
    context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    fill_kv_cache(module._orig_mod, call, context)


class _FirstCalls:
    """The time of each batch layout's first UNet call (compilation + one step), logged once per layout."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        # The start of a first call, per thread: hooks cannot pass values to each other, and two requests may run
        # the UNet at once (one per thread), so the start time cannot be one attribute.
        self._started = threading.local()
        self._lock = threading.Lock()

    @staticmethod
    def layout(args, kwargs) -> str:
        sample = args[0] if args else kwargs["sample"]
        call = (kwargs.get("cross_attention_kwargs") or {}).get("id_call")
        mixing = call is not None and call.text_rows is not None and call.mixing
        kind = "plain" if call is None else "mixing" if mixing else "identity"
        return f"batch {sample.shape[0]}, {sample.shape[-2]}x{sample.shape[-1]} latents, {kind}"

    def before(self, module, args, kwargs):
        key = self.layout(args, kwargs)
        self._started.value = (key, time.perf_counter()) if key not in self.seconds else None

    def after(self, module, args, kwargs, output):
        started = getattr(self._started, "value", None)
        if started is None:
            return
        key, start = started
        self._started.value = None
        with self._lock:
            if key in self.seconds:
                return
            self.seconds[key] = round(time.perf_counter() - start, 2)
        logger.info("torch.compile: first UNet call of layout %s took %.1f s (compilation + one step; later calls "
                    "of this layout reuse the graph).", key, self.seconds[key])
