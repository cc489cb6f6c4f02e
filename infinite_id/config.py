"""Frozen settings: limits, defaults and model locations, read once from the environment.

Every limit a user can hit lives here so the library, the app and the tests agree on one number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass(frozen=True)
class ImageLimits:
    """What an uploaded photo may be. Checked before pixels are decoded where possible."""

    max_pixels: int = 40_000_000  # a 40 MP photo is larger than any phone camera; beyond that it is a bomb
    max_file_bytes: int = 30 * 1024 * 1024
    min_side: int = 64  # smaller than this holds no usable face
    max_aspect_ratio: float = 8.0
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "HEIF", "GIF", "MPO")


@dataclass(frozen=True)
class FaceSettings:
    """Face detection: model pack, where it lives, and what counts as a usable face."""

    pack: str = "buffalo_l"
    root: str = field(default_factory=lambda: os.environ.get("INFINITE_ID_FACE_ROOT", os.path.expanduser("~/.insightface")))
    det_sizes: tuple[int, ...] = (640, 480, 320)  # multi-scale retry: 640 first, then smaller
    min_det_score: float = 0.5
    floor_det_score: float = 0.3  # below this a detection is noise ("no face"); up to min_det_score, "unclear face"
    min_face_px: int = 48  # shorter side of the face box, in pixels of the uploaded photo
    # Mean brightness (0-255) under which a photo with no face found is called too dark rather than faceless
    # (MTCNN still finds the astronaut darkened to a mean of 13, not at 9; the Hubble deep field's mean is 19).
    dark_brightness: float = 16.0
    pad_fraction: float = 0.5  # padding retry: a black border this fraction of the longer side, on every side
    clip_crop_size: int = 224  # the aligned crop for the CLIP image encoder
    clip_crop_context: float = 1.0  # 1.0: insightface's norm_crop framing (IP-Adapter-FaceID-Plus's); >1 zooms out


def _env_str(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "reduce-overhead")  # torch.compile of the UNet


@dataclass(frozen=True)
class ModelSettings:
    """Which weights to load and how (docs/weights.md). Each is overridable by argument, CLI flag or environment.

    A location is a hub reference (``owner/repo``, ``owner/repo/subfolder`` or ``owner/repo/path/file``) or a
    local folder or file. None means the policy default (resolved in ``infinite_id.models.hub``): ``vae`` None is the
    fp16-fix VAE in fp16 and the base model's own VAE otherwise; ``device``/``dtype`` None follow
    ``infinite_id.models.device``.
    """

    base_model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    vae: str | None = None
    image_encoder: str = "h94/IP-Adapter/models/image_encoder"
    adapter: str | None = None  # None: faceid-plusv2, or with adapter_path whatever the file is (recognised)
    adapter_path: str | None = None  # a file for the adapter instead of its published one (or a native checkpoint)
    s_scale: float = 1.0  # FaceID-PlusV2's structure (CLIP) weight
    fast_mode: str | None = None  # "hyper-sd" or "lightning": a step-distilled LoRA and its scheduler
    fast_lora_path: str | None = None
    variant: str | None = "fp16"  # the base model's weight files to fetch (fp16 halves the download)
    device: str | None = None
    dtype: str | None = None
    # Only models whose licence permits commercial use (infinite_id.models.licences; docs/weights.md).
    license_clean: bool = False
    memory_mode: str | None = None  # none | model | sequential CPU offload; None: the VRAM tier's (none on a CPU)
    vram_tier: str = "auto"  # auto (from the accelerator's free memory) | 24 | 16 | 12 | 8 | 6 (models/tiers.py)
    attention: str = "auto"  # auto (xformers if it runs and matches SDPA, else SDPA) | sdpa | xformers
    compile: str = "off"  # off | default | max-autotune-no-cudagraphs | reduce-overhead: torch.compile the UNet


def model_settings_from_env() -> ModelSettings:
    """ModelSettings with INFINITE_ID_* overrides (BASE_MODEL, VAE, IMAGE_ENCODER, ADAPTER, ADAPTER_PATH, ...,
    MEMORY_MODE, VRAM_TIER, ATTENTION, COMPILE)."""
    d = ModelSettings()
    variant = os.environ.get("INFINITE_ID_VARIANT")
    return ModelSettings(
        base_model=_env_str("INFINITE_ID_BASE_MODEL") or d.base_model,
        vae=_env_str("INFINITE_ID_VAE"),
        image_encoder=_env_str("INFINITE_ID_IMAGE_ENCODER") or d.image_encoder,
        adapter=_env_str("INFINITE_ID_ADAPTER"),
        adapter_path=_env_str("INFINITE_ID_ADAPTER_PATH"),
        s_scale=_env_float("INFINITE_ID_S_SCALE", d.s_scale),
        fast_mode=_env_str("INFINITE_ID_FAST_MODE"),
        fast_lora_path=_env_str("INFINITE_ID_FAST_LORA"),
        variant=d.variant if variant is None else (variant.strip() or None),
        device=_env_str("INFINITE_ID_DEVICE"),
        dtype=_env_str("INFINITE_ID_DTYPE"),
        memory_mode=_env_str("INFINITE_ID_MEMORY_MODE") or d.memory_mode,
        license_clean=os.environ.get("INFINITE_ID_LICENSE_CLEAN", "").strip().lower() in ("1", "true", "yes", "on"),
        vram_tier=_env_str("INFINITE_ID_VRAM_TIER") or d.vram_tier,
        attention=_env_str("INFINITE_ID_ATTENTION") or d.attention,
        compile=_env_str("INFINITE_ID_COMPILE") or d.compile,
    )


@dataclass(frozen=True)
class Settings:
    images: ImageLimits = field(default_factory=ImageLimits)
    faces: FaceSettings = field(default_factory=FaceSettings)
    max_prompt_chars: int = 1000
    models: ModelSettings = field(default_factory=model_settings_from_env)


def load_settings() -> Settings:
    """Settings with environment overrides (INFINITE_ID_*)."""
    images = ImageLimits(
        max_pixels=_env_int("INFINITE_ID_MAX_PIXELS", ImageLimits.max_pixels),
        max_file_bytes=_env_int("INFINITE_ID_MAX_FILE_BYTES", ImageLimits.max_file_bytes),
        min_side=_env_int("INFINITE_ID_MIN_SIDE", ImageLimits.min_side),
        max_aspect_ratio=_env_float("INFINITE_ID_MAX_ASPECT", ImageLimits.max_aspect_ratio),
    )
    faces = FaceSettings(
        pack=os.environ.get("INFINITE_ID_FACE_PACK", FaceSettings.pack),
        min_det_score=_env_float("INFINITE_ID_MIN_DET_SCORE", FaceSettings.min_det_score),
        min_face_px=_env_int("INFINITE_ID_MIN_FACE_PX", FaceSettings.min_face_px),
    )
    return Settings(images=images, faces=faces)


SETTINGS = load_settings()


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ServerSettings:
    """How the app serves many people (DESIGN 7, docs/reliability.md). Environment: INFINITE_ID_<FIELD>."""

    # One GPU job at a time in production: the pipeline has no per-call state on shared objects, so more is
    # correct (tests/test_reliability.py runs 8 at once), but on one GPU it only splits the memory.
    gpu_concurrency: int = 1
    queue_max_size: int = 16  # beyond this a request gets Gradio's "queue is full" answer at once
    session_jobs: int = 1  # GPU jobs one browser session may have waiting or running, so nobody fills the queue
    # Gradio's upload/output cache: checked every `delete_cache_every_s`, files older than `delete_cache_age_s` go.
    delete_cache_every_s: int = 1800
    delete_cache_age_s: int = 3600
    request_timeout_s: float = 600.0  # a request still denoising after this is stopped at its next step
    watermark: bool = False  # the SDXL invisible watermark on outputs (needs the invisible-watermark package)
    # "module:function" taking a list of PIL images, returning one bool per image (True: not to be shown).
    safety_checker: str | None = None


def load_server_settings() -> ServerSettings:
    d = ServerSettings()
    return ServerSettings(
        gpu_concurrency=max(1, _env_int("INFINITE_ID_GPU_CONCURRENCY", d.gpu_concurrency)),
        queue_max_size=max(1, _env_int("INFINITE_ID_QUEUE_MAX_SIZE", d.queue_max_size)),
        session_jobs=max(1, _env_int("INFINITE_ID_SESSION_JOBS", d.session_jobs)),
        delete_cache_every_s=max(1, _env_int("INFINITE_ID_DELETE_CACHE_EVERY_S", d.delete_cache_every_s)),
        delete_cache_age_s=max(1, _env_int("INFINITE_ID_DELETE_CACHE_AGE_S", d.delete_cache_age_s)),
        request_timeout_s=_env_float("INFINITE_ID_REQUEST_TIMEOUT_S", d.request_timeout_s),
        watermark=_env_bool("INFINITE_ID_WATERMARK"),
        safety_checker=_env_str("INFINITE_ID_SAFETY_CHECKER"),
    )


SERVER = load_server_settings()
