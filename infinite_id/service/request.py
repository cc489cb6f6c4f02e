"""One generation request: every knob clamped server-side to its DESIGN 2.5 range, the aspect-ratio
presets, sizes and seeds. A request is never trusted: ``GenerationRequest.__post_init__`` clamps every value."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

from ..config import SETTINGS
from ..method.id_lora import LORA_SCALE_RANGE
from ..method.identity_inputs import CLIP_CHANNEL_ORDERS
from ..method.pipeline import METHODS
from .styles import default_style_name, get_style

MAX_SEED = 2**32 - 1

# DESIGN 2.5 ranges; the UI sliders use the same numbers.
ID_SCALE_RANGE = (0.0, 1.5)
SEMANTIC_SCALE_RANGE = (0.0, 3.0)
STYLE_STRENGTH_RANGE = (0.0, 1.0)
STEPS_RANGE = (1, 100)
GUIDANCE_RANGE = (0.0, 20.0)
NUM_IMAGES_RANGE = (1, 4)
SIDE_RANGE = (32, 2048)  # pixels; the tiny engine draws at ~64, SDXL at ~1024
MAX_PIXELS = 2048 * 2048
FAST_STEPS = 8  # fast mode: the step count the step-distilled LoRAs are made for (Hyper-SD 8-step CFG)

METHOD_LABELS = {"text": "Text only (plain SDXL)", "adapter": "Adapter baseline", "infinite-id": "Infinite-ID"}


# SDXL's native buckets (about one megapixel each). The label is what a person picks; the size is at SDXL scale
# and ``size_for`` scales it to the engine's native resolution (the tiny engine draws at 64 px).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1 square · 1024×1024": (1024, 1024),
    "4:3 landscape · 1152×896": (1152, 896),
    "3:4 portrait · 896×1152": (896, 1152),
    "3:2 landscape · 1216×832": (1216, 832),
    "2:3 portrait · 832×1216": (832, 1216),
    "16:9 wide · 1344×768": (1344, 768),
    "9:16 tall · 768×1344": (768, 1344),
    "21:9 panorama · 1536×640": (1536, 640),
    "9:21 tall · 640×1536": (640, 1536),
}
DEFAULT_ASPECT = next(iter(ASPECT_RATIOS))


def clamped(value: Any, default: float, low: float, high: float) -> float:
    """``value`` as a float within ``[low, high]``; anything unreadable or not finite becomes ``default``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    if not math.isfinite(number):
        return default
    return min(high, max(low, number))


def _flag(value: Any, default: bool) -> bool:
    """A yes/no setting; the strings an API client may send ("false", "0", "off") read as no."""
    if isinstance(value, str):
        text = value.strip().lower()
        return default if not text else text in ("1", "true", "yes", "on")
    return default if value is None else bool(value)


def channel_order(value: Any) -> str | None:
    """``None`` (the adapter's own order), "rgb" or "bgr"; anything else is a ValueError with the choices."""
    if value is None or str(value).strip() == "":
        return None
    order = str(value).strip().lower()
    if order not in CLIP_CHANNEL_ORDERS:
        raise ValueError(f"The CLIP channel order must be 'rgb' or 'bgr' (or empty for the adapter's own); got {value!r}.")
    return order


def _integer(value: Any, default: int, low: int, high: int) -> int:
    return int(round(clamped(value, default, low, high)))


def _side(value: Any, default: int) -> int:
    """A width or height: clamped, then rounded to a multiple of 8 (the VAE's downsampling factor)."""
    side = clamped(value, default, *SIDE_RANGE)
    return max(SIDE_RANGE[0], int(round(side / 8)) * 8)


def size_for(aspect: str | None, native: int = 1024) -> tuple[int, int]:
    """``(width, height)`` of an aspect-ratio preset at an engine whose native square side is ``native``."""
    width, height = ASPECT_RATIOS.get(aspect or DEFAULT_ASPECT, ASPECT_RATIOS[DEFAULT_ASPECT])
    scale = native / 1024
    return max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8)


def native_size(pipe) -> int:
    """The square side the pipeline's UNet was trained at (1024 for SDXL, 64 for the tiny engine)."""
    return int(pipe.default_sample_size * pipe.vae_scale_factor)


def resolve_seed(seed: Any) -> int:
    """A concrete seed: ``seed`` clamped to ``[0, 2**32 - 1]``, or a fresh random one for None / negative / junk."""
    try:
        value = int(seed) if seed is not None and seed != "" else -1
    except (TypeError, ValueError):
        value = -1
    if value < 0:
        return random.SystemRandom().randrange(MAX_SEED + 1)
    return min(value, MAX_SEED)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything a generation depends on besides the person. Values are clamped on construction.

    ``seed`` None means "pick one"; call ``with_seed()`` to fix it before running (``generate`` does).
    ``style_strength`` None means the style preset's recommendation. ``fast`` runs ``FAST_STEPS`` steps.
    ``lora_scale``: the adapter's LoRA on the identity stream (0 to 2; 1 as trained; ignored without one).
    ``adain_cross``: AdaIN-mean in the cross-attention too ("infinite-id" only). ``clip_channel_order``: "rgb" or
    "bgr" for the CLIP crop, None for the adapter's published order (it takes effect when the photo is encoded:
    ``IdentityCache.encode``). ``text_stream``: also return the text stream's images ("infinite-id": the same seed
    without the person). Without them the call skips their decode, and with a mixing window that ends before the
    last step the text stream leaves the batch there (the pipeline's ``return_text_images``): the same images
    (bit for bit with the full window, within rounding otherwise), for less work. Recorded in the PNG, so a
    reproduction runs the same batch.
    """

    prompt: str
    negative_prompt: str = ""
    style: str = ""
    method: str = "infinite-id"
    id_scale: float = 1.0
    semantic_scale: float = 1.0
    style_strength: float | None = None
    mix_window: tuple[float, float] = (0.0, 1.0)
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    width: int = 1024
    height: int = 1024
    seed: int | None = None
    num_images: int = 1
    fast: bool = False
    lora_scale: float = 1.0
    adain_cross: bool = True
    clip_channel_order: str | None = None
    text_stream: bool = True

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
        limit = SETTINGS.max_prompt_chars
        set_("prompt", str(self.prompt or "").strip()[:limit])
        set_("negative_prompt", str(self.negative_prompt or "").strip()[:limit])
        set_("style", get_style(self.style or default_style_name()).name)
        method = str(self.method or "infinite-id").strip().lower()
        if method not in METHODS:
            raise ValueError(f"The method must be one of {', '.join(METHODS)}; got {self.method!r}.")
        set_("method", method)
        set_("id_scale", clamped(self.id_scale, 1.0, *ID_SCALE_RANGE))
        set_("semantic_scale", clamped(self.semantic_scale, 1.0, *SEMANTIC_SCALE_RANGE))
        if self.style_strength is not None:
            set_("style_strength", clamped(self.style_strength, 1.0, *STYLE_STRENGTH_RANGE))
        try:
            start, end = self.mix_window
        except (TypeError, ValueError):
            start, end = 0.0, 1.0
        start, end = clamped(start, 0.0, 0.0, 1.0), clamped(end, 1.0, 0.0, 1.0)
        set_("mix_window", (min(start, end), max(start, end)))
        set_("num_inference_steps", _integer(self.num_inference_steps, 30, *STEPS_RANGE))
        set_("guidance_scale", clamped(self.guidance_scale, 5.0, *GUIDANCE_RANGE))
        width, height = _side(self.width, 1024), _side(self.height, 1024)
        if width * height > MAX_PIXELS:  # keep the aspect ratio, shrink to the pixel budget
            shrink = math.sqrt(MAX_PIXELS / (width * height))
            width, height = _side(width * shrink - 4, 1024), _side(height * shrink - 4, 1024)
        set_("width", width)
        set_("height", height)
        if self.seed is not None:
            seed = _integer(self.seed, -1, -1, MAX_SEED)
            set_("seed", None if seed < 0 else seed)
        set_("num_images", _integer(self.num_images, 1, *NUM_IMAGES_RANGE))
        set_("fast", bool(self.fast))
        set_("lora_scale", clamped(self.lora_scale, 1.0, *LORA_SCALE_RANGE))
        set_("adain_cross", _flag(self.adain_cross, True))
        set_("clip_channel_order", channel_order(self.clip_channel_order))
        set_("text_stream", _flag(self.text_stream, True))

    def replace(self, **changes) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    def with_seed(self) -> GenerationRequest:
        """This request with a concrete seed (a random one when it has none)."""
        return self if self.seed is not None else self.replace(seed=resolve_seed(None))

    @property
    def steps(self) -> int:
        """The number of denoising steps that will run."""
        return FAST_STEPS if self.fast else self.num_inference_steps

    @property
    def needs_identity(self) -> bool:
        return self.method != "text"

    def styled(self) -> tuple[str, str, float]:
        """The prompt and negative prompt with the style applied, and the style strength to use."""
        style = get_style(self.style)
        prompt, negative = style.apply(self.prompt, self.negative_prompt)
        strength = style.style_strength if self.style_strength is None else self.style_strength
        return prompt, negative, strength

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> GenerationRequest:
        """The request that reproduces an image we saved (``read_metadata``), for one image with its own seed."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in metadata.get("request", {}).items() if k in known}
        if int(metadata.get("version", 1) or 1) < 2:
            # Made before issue 14: the FaceID LoRA and AdaIN-cross were off and the CLIP crop went in as RGB.
            values = {"lora_scale": 0.0, "adain_cross": False, "clip_channel_order": "rgb", **values}
        values["seed"] = metadata.get("seed", values.get("seed"))
        values["num_images"] = 1
        if "mix_window" in values:
            values["mix_window"] = tuple(values["mix_window"])
        return cls(**values)


