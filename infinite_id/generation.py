"""What the app and the CLI share: one generation request, from widget values to saved, reproducible PNGs.

* ``GenerationRequest``: every knob, clamped server-side to its DESIGN 2.5 range (a request is never trusted).
* ``IdentityCache``: a person's photo(s) -> ``Identity`` (features for ``id_embeds`` and the reference ArcFace
  embedding), encoded once per photo (keyed by a hash of the pixels) and reused, e.g. across a Compare grid.
* ``generate`` / ``compare`` / ``mix``: one pipeline call per image set, seeds per image (image ``i`` of a request
  with seed ``s`` is reproduced alone with seed ``s + i``), progress per step, cooperative cancel, and the face
  similarity of every output to the reference.
* ``save_png`` / ``read_metadata``: our metadata (prompt, negative, seed, every setting, method, model ids) in
  the PNG, and nothing of the input photo's EXIF/GPS.

Per-call values travel as arguments; nothing here is stored on the shared pipeline.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import random
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .config import SETTINGS
from .grid import labelled_grid
from .id_encoder import IdentityFeatures
from .images import load_image
from .ops import interpolate_identities
from .pipeline import METHODS
from .styles import default_style_name, get_style

SOFTWARE = "infinite-id"
METADATA_KEY = "infinite_id"  # PNG text chunk holding our JSON metadata
METADATA_VERSION = 1
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
MAX_COMPARE_CELLS = 16

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


class GenerationError(ValueError):
    """A generation that could not give a usable image. The message is meant for the person who asked."""


class GenerationCancelled(GenerationError):
    def __init__(self):
        super().__init__("The generation was cancelled.")


class OutOfMemory(GenerationError):
    pass


class GenerationTimeout(GenerationError):
    """A request that ran past its time limit (``config.ServerSettings.request_timeout_s``): a hung or far too
    slow step is cut at the next step instead of holding the GPU slot for everyone behind it."""

    def __init__(self):
        super().__init__("The generation took longer than this server allows and was stopped. Try fewer steps, "
                         "fewer images or a smaller size.")


BLANK_MESSAGE = ("The model produced a blank image (its numbers overflowed). Please try again with another seed; if "
                 "it keeps happening, the VAE needs the fp16-fix weights.")


# --- the request --------------------------------------------------------------------------------------------------


def _number(value: Any, default: float, low: float, high: float) -> float:
    """``value`` as a float within ``[low, high]``; anything unreadable or not finite becomes ``default``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    if not math.isfinite(number):
        return default
    return min(high, max(low, number))


def _integer(value: Any, default: int, low: int, high: int) -> int:
    return int(round(_number(value, default, low, high)))


def _side(value: Any, default: int) -> int:
    """A width or height: clamped, then rounded to a multiple of 8 (the VAE's downsampling factor)."""
    side = _number(value, default, *SIDE_RANGE)
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
        set_("id_scale", _number(self.id_scale, 1.0, *ID_SCALE_RANGE))
        set_("semantic_scale", _number(self.semantic_scale, 1.0, *SEMANTIC_SCALE_RANGE))
        if self.style_strength is not None:
            set_("style_strength", _number(self.style_strength, 1.0, *STYLE_STRENGTH_RANGE))
        try:
            start, end = self.mix_window
        except (TypeError, ValueError):
            start, end = 0.0, 1.0
        start, end = _number(start, 0.0, 0.0, 1.0), _number(end, 1.0, 0.0, 1.0)
        set_("mix_window", (min(start, end), max(start, end)))
        set_("num_inference_steps", _integer(self.num_inference_steps, 30, *STEPS_RANGE))
        set_("guidance_scale", _number(self.guidance_scale, 5.0, *GUIDANCE_RANGE))
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
        values["seed"] = metadata.get("seed", values.get("seed"))
        values["num_images"] = 1
        if "mix_window" in values:
            values["mix_window"] = tuple(values["mix_window"])
        return cls(**values)


# --- identity -----------------------------------------------------------------------------------------------------


def image_hash(image: Image.Image) -> str:
    """A hash of the decoded pixels: the same photo hits the cache whatever its file name or upload copy."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Identity:
    """One person, ready to generate: ``features`` go to the pipeline as ``id_embeds``; ``reference`` (512,
    unit norm) is the ArcFace embedding outputs are compared with. ``key`` names the photos (a hash, never the
    pixels) and is recorded in the metadata."""

    features: IdentityFeatures
    reference: np.ndarray
    key: str
    face_index: int = 0
    photos: int = 1


class IdentityCache:
    """Encodes a person's photo(s) once and reuses the result. Safe to share between requests and threads.

    The key is the pixels' hash, the picked face, the extra photos' hashes and the pipeline object, so a
    different photo, face or engine is a different entry. Entries are small (features, not images); the least
    recently used go first.
    """

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        # Per pipeline, held weakly: a pipeline that is gone takes its entries with it.
        self._entries: weakref.WeakKeyDictionary[Any, OrderedDict[str, Identity]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    def encode(self, pipe, photo, face_index: int = 0, extra_photos: Sequence = (), analyzer=None) -> Identity:
        """``photo``: anything ``load_image`` takes. ``face_index``: which face of ``photo`` (0 = largest).
        ``extra_photos``: more photos of the same person (their largest face each), averaged in."""
        from .face import average_embeddings, select_face

        analyzer = analyzer if analyzer is not None else pipe.face_analyzer
        if analyzer is None:
            raise ValueError("This engine has no face analyzer, so it cannot read a photo of a person.")
        main = load_image(photo)
        extras = [load_image(p) for p in extra_photos]
        parts = [image_hash(main), f"face{int(face_index)}", *(image_hash(e) for e in extras)]
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]  # names the photos, in the metadata too
        with self._lock:
            entries = self._entries.setdefault(pipe, OrderedDict())  # features depend on the engine as well
            if key in entries:
                entries.move_to_end(key)
                self.hits += 1
                return entries[key]
            self.misses += 1
        faces = [select_face(analyzer.analyze(main), int(face_index))]
        faces += [analyzer.analyze(extra)[0] for extra in extras]
        features = pipe.encode_identity(faces)
        identity = Identity(features, average_embeddings(faces), key, int(face_index), len(faces))
        with self._lock:
            entries = self._entries.setdefault(pipe, OrderedDict())
            entries[key] = identity
            while len(entries) > self.capacity:
                entries.popitem(last=False)
        return identity


def face_thumbnail(image: Image.Image, face, size: int = 128) -> Image.Image:
    """A square crop around ``face`` (a FaceResult) with some hair and chin, ``size`` pixels, for picking faces."""
    x1, y1, x2, y2 = (float(v) for v in face.bbox[:4])
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * 0.75
    box = tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))
    return image.crop(box).resize((size, size), Image.Resampling.LANCZOS)


def output_similarity(analyzer, image: Image.Image, reference: np.ndarray | None) -> float | None:
    """ArcFace cosine of the largest face in ``image`` to ``reference``; None when there is no face to compare."""
    if analyzer is None or reference is None:
        return None
    from .face import FaceError, face_similarity
    from .images import InvalidImageError

    try:
        faces = analyzer.analyze(image)
    except (FaceError, InvalidImageError):  # an output without a usable face has no similarity, not an error
        return None
    return round(face_similarity(faces[0], reference), 4) if faces else None


# --- running ------------------------------------------------------------------------------------------------------

StepCallback = Callable[[int, int], None]  # (steps done, steps in total)


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    metadata: dict[str, Any]
    similarities: dict[str, float | None] = field(default_factory=dict)
    label: str = ""
    path: Path | None = None

    @property
    def similarity(self) -> float | None:
        """Similarity to the (first) reference person."""
        return next(iter(self.similarities.values()), None)

    def caption(self) -> str:
        parts = [self.label] if self.label else []
        if self.similarities:
            parts.append(" · ".join(_similarity_text(name, value, len(self.similarities) > 1)
                                    for name, value in self.similarities.items()))
        parts.append(f"seed {self.seed}")
        return " · ".join(parts)


def _similarity_value(value: float | None) -> str:
    return "n/a (no face found)" if value is None else f"{value:.2f}"


def _similarity_text(name: str, value: float | None, named: bool) -> str:
    return (f"{name} " if named else "identity ") + _similarity_value(value)


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    text_images: list[GeneratedImage]  # the text stream of "infinite-id": the same seeds without the person
    request: GenerationRequest  # with the seed that was used
    seconds: float

    @property
    def seed(self) -> int:
        return int(self.request.seed)

    def info(self) -> str:
        """Markdown for the app: what ran, with which settings, how long it took."""
        r = self.request
        prompt, negative, strength = r.styled()
        named = any(len(i.similarities) > 1 for i in self.images)
        lines = [
            f"**{METHOD_LABELS[r.method]}** · style *{r.style}* · seed **{r.seed}**"
            + (f" (images use seeds {r.seed}–{r.seed + len(self.images) - 1})" if len(self.images) > 1 else ""),
            f"{r.width}×{r.height} px · {r.steps} steps{' (fast mode)' if r.fast else ''} · guidance {r.guidance_scale:g}",
        ]
        if r.method != "text":
            lines.append(f"identity {r.id_scale:g}" + (
                f" · semantic {r.semantic_scale:g} · style strength {strength:g} · mixing "
                f"{r.mix_window[0]:g}–{r.mix_window[1]:g}" if r.method == "infinite-id" else ""))
        if any(i.similarities for i in self.images):
            values = "; ".join(
                " · ".join(_similarity_text(name, value, named) if named else _similarity_value(value)
                           for name, value in i.similarities.items())
                for i in self.images)
            lines.append(f"similarity to the photo{'s' if named else ''}: {values} "
                         "(ArcFace cosine; the same person is typically above 0.4)")
        lines.append(f"{self.seconds:.1f} s")
        lines.append(f"prompt: `{_md_code(prompt)}`")
        if negative:
            lines.append(f"negative: `{_md_code(negative)}`")
        return "  \n".join(lines)


def _md_code(text: str) -> str:
    return text.replace("`", "'")


def model_ids(pipe) -> dict[str, Any]:
    """Which weights made an image: what the loader recorded on the pipeline (``weights_info``: base model,
    adapter, its file, fast mode), else what diffusers knows (the base model's name or path)."""
    info = getattr(pipe, "weights_info", None)
    if isinstance(info, dict):
        return {k: v for k, v in info.items() if isinstance(v, str | int | float | bool) or v is None}
    encoder = getattr(pipe, "id_encoder", None)
    return {
        "base_model": getattr(pipe.config, "_name_or_path", None) or "unknown",
        "id_encoder": getattr(encoder, "kind", None),
    }


def _is_blank(image: Image.Image) -> bool:
    """Black or flat output: what NaNs (fp16 overflow) become after decoding. Never shown as a success."""
    pixels = np.asarray(image, dtype=np.float32)
    return bool(pixels.std() < 1.0 and pixels.mean() < 8.0)


def deadline_in(seconds: float | None) -> float | None:
    """A ``deadline`` for ``run`` that is ``seconds`` from now (None or <= 0: no limit)."""
    return time.monotonic() + seconds if seconds and seconds > 0 else None


def _free_memory() -> None:
    from .device import empty_cache, pick_device

    gc.collect()
    empty_cache(pick_device())


def _metadata(pipe, request: GenerationRequest, seed: int, method: str, identity_meta: dict | None) -> dict[str, Any]:
    prompt, negative, strength = request.styled()
    return {
        "software": SOFTWARE,
        "version": METADATA_VERSION,
        "prompt": prompt,
        "negative_prompt": negative,
        "seed": seed,
        "method": method,
        "width": request.width,
        "height": request.height,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "id_scale": request.id_scale if method != "text" else None,
        "semantic_scale": request.semantic_scale if method == "infinite-id" else None,
        "style_strength": strength if method == "infinite-id" else None,
        "mix_window": list(request.mix_window) if method == "infinite-id" else None,
        "style": request.style,
        "fast": request.fast,
        "models": model_ids(pipe),
        "identity": identity_meta,
        # The request as given (before the style template) reproduces the image: GenerationRequest.from_metadata.
        "request": {**dataclasses.asdict(request), "method": method, "num_images": 1, "seed": seed},
    }


def run(
    pipe,
    request: GenerationRequest,
    id_embeds: IdentityFeatures | torch.Tensor | None = None,
    *,
    identity_meta: dict | None = None,
    references: dict[str, np.ndarray] | None = None,
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    step_offset: int = 0,
    total_steps: int | None = None,
    deadline: float | None = None,
) -> GenerationResult:
    """One pipeline call for ``request`` (seed fixed first), with the given identity tokens or features.

    ``references``: people to measure each output against (name -> ArcFace embedding). ``on_step``/``cancel``:
    progress and a cooperative stop, checked every step (a cancelled call raises ``GenerationCancelled``; the
    pipeline restores everything it swapped in, so the next call is unaffected). ``step_offset``/``total_steps``
    let several calls report one continuous progress. ``deadline``: a ``time.monotonic()`` value; a call still
    running then raises ``GenerationTimeout`` at its next step.
    """
    request = request.with_seed()
    if request.needs_identity and id_embeds is None:
        raise ValueError("Upload a photo of the person first (or choose the text-only method).")
    prompt, negative, strength = request.styled()
    steps = request.steps
    total = total_steps if total_steps is not None else steps
    # CPU generators, one per image: the same seed gives the same starting noise on any device, and image i
    # of a batch is reproduced on its own with seed + i.
    generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.num_images)]

    def step_end(_pipe, i, _t, _tensors):
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled()
        if deadline is not None and time.monotonic() > deadline:
            raise GenerationTimeout()
        if on_step is not None:
            on_step(step_offset + i + 1, total)
        return {}

    if cancel is not None and cancel.is_set():
        raise GenerationCancelled()
    if deadline is not None and time.monotonic() > deadline:  # e.g. the last cells of a long comparison
        raise GenerationTimeout()
    started = time.perf_counter()
    oom = non_finite = False
    try:
        output = pipe(
            prompt,
            id_embeds=id_embeds if request.needs_identity else None,
            negative_prompt=negative or None,
            method=request.method,
            id_scale=request.id_scale,
            semantic_scale=request.semantic_scale,
            style_strength=strength,
            mix_window=request.mix_window,
            num_inference_steps=steps,
            guidance_scale=request.guidance_scale,
            height=request.height,
            width=request.width,
            num_images_per_prompt=request.num_images,
            generator=generators,
            callback_on_step_end=step_end,
        )
    except torch.OutOfMemoryError:  # torch.cuda.OutOfMemoryError is the same class
        oom = True  # handled outside the except block, so the traceback (and the tensors it holds) is gone
    except FloatingPointError:  # the pipeline's decode: NaN/inf even after its fp32 retry
        non_finite = True
    if non_finite:
        _free_memory()
        raise GenerationError(BLANK_MESSAGE)
    if oom:
        _free_memory()
        raise OutOfMemory(
            "The GPU ran out of memory for this request. Try fewer images or a smaller size, or start the app "
            "with --memory-mode model-offload."
        )
    seconds = time.perf_counter() - started

    analyzer = getattr(pipe, "face_analyzer", None)
    references = references or {}

    def wrap(images, method: str) -> list[GeneratedImage]:
        out = []
        for i, image in enumerate(images):
            if _is_blank(image):
                raise GenerationError(BLANK_MESSAGE)
            seed = request.seed + i
            sims = {name: output_similarity(analyzer, image, ref) for name, ref in references.items()}
            meta = _metadata(pipe, request, seed, method, identity_meta)
            meta["similarity"] = dict(sims) or None
            out.append(GeneratedImage(image=image, seed=seed, metadata=meta, similarities=sims))
        return out

    images = wrap(output.images, request.method)
    text_images = wrap(output.text_images, "text") if output.text_images is not None else []
    return GenerationResult(images, text_images, request, seconds)


def _identity_meta(identity: Identity | None) -> dict | None:
    if identity is None:
        return None
    return {"key": identity.key, "face_index": identity.face_index, "photos": identity.photos}


def generate(
    pipe,
    request: GenerationRequest,
    identity: Identity | None = None,
    *,
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    deadline: float | None = None,
) -> GenerationResult:
    """Images of ``identity`` following ``request``; each measured against the person's photo."""
    return run(
        pipe, request, identity.features if identity is not None else None,
        identity_meta=_identity_meta(identity),
        references={"identity": identity.reference} if identity is not None else None,
        on_step=on_step, cancel=cancel, deadline=deadline,
    )


# --- compare ------------------------------------------------------------------------------------------------------

COMPARE_MODES = ("methods", "strengths", "styles")


@dataclass
class CompareResult:
    grid: Image.Image
    cells: list[GeneratedImage]
    seed: int
    seconds: float
    title: str


def parse_values(text: str | Sequence[float] | None, low: float, high: float, default: Sequence[float]) -> list[float]:
    """"0.5, 1, 1.5" -> [0.5, 1.0, 1.5], each clamped to ``[low, high]``, duplicates dropped, at most 4."""
    if text is None or text == "":
        items: Sequence = default
    elif isinstance(text, str):
        items = [t for t in text.replace(";", ",").replace(" ", ",").split(",") if t.strip()]
    else:
        items = text
    values: list[float] = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"{item!r} is not a number. Write strengths like: 0.5, 1, 1.5") from None
        value = round(_number(value, default[0], low, high), 3)
        if value not in values:
            values.append(value)
    if not values:
        values = list(default)
    return values[:4]


def compare(
    pipe,
    request: GenerationRequest,
    identity: Identity | None,
    mode: str = "methods",
    *,
    styles: Sequence[str] = (),
    id_scales: Sequence[float] = (0.5, 1.0, 1.5),
    semantic_scales: Sequence[float] = (0.0, 1.0, 2.0),
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    deadline: float | None = None,
) -> CompareResult:
    """The same person, prompt and seed across methods, an identity x semantic strength grid, or styles.

    The identity is encoded once (the caller's ``Identity``) and reused in every cell; one image per cell.
    In "methods" mode the text-only image is the text stream of the Infinite-ID call: the same seed and prompt
    without the person, i.e. plain SDXL (DESIGN 2.5), so it costs no extra call.
    """
    if mode not in COMPARE_MODES:
        raise ValueError(f"The comparison must be one of {', '.join(COMPARE_MODES)}; got {mode!r}.")
    request = request.replace(num_images=1).with_seed()
    if identity is None:
        raise ValueError("Upload a photo of the person to compare.")
    plan: list[tuple[int, int, GenerationRequest]] = []  # (row, col, request)
    if mode == "methods":
        rows, cols = [""], [METHOD_LABELS[m] for m in ("text", "adapter", "infinite-id")]
        plan = [(0, 1, request.replace(method="adapter")), (0, 2, request.replace(method="infinite-id"))]
    elif mode == "strengths":
        ids = parse_values(id_scales, *ID_SCALE_RANGE, default=(0.5, 1.0, 1.5))
        sems = parse_values(semantic_scales, *SEMANTIC_SCALE_RANGE, default=(0.0, 1.0, 2.0))
        rows, cols = [f"identity {v:g}" for v in ids], [f"semantic {v:g}" for v in sems]
        plan = [(r, c, request.replace(method="infinite-id", id_scale=i, semantic_scale=s))
                for r, i in enumerate(ids) for c, s in enumerate(sems)]
    else:
        names = [get_style(n).name for n in dict.fromkeys(styles or [request.style])]
        if len(names) > MAX_COMPARE_CELLS:
            raise ValueError(f"Pick at most {MAX_COMPARE_CELLS} styles to compare.")
        rows, cols = [""], names
        plan = [(0, c, request.replace(style=name)) for c, name in enumerate(names)]
    if len(plan) > MAX_COMPARE_CELLS:
        raise ValueError(f"That comparison has {len(plan)} images; the most is {MAX_COMPARE_CELLS}.")

    total = sum(r.steps for _, _, r in plan)
    grid: list[list[GeneratedImage | None]] = [[None] * len(cols) for _ in rows]
    started = time.perf_counter()
    done = 0
    for r, c, cell_request in plan:
        result = generate(pipe, cell_request, identity, on_step=None if on_step is None else
                          (lambda d, _t, base=done: on_step(base + d, total)), cancel=cancel,
                          deadline=deadline)
        done += cell_request.steps
        grid[r][c] = result.images[0]
        if mode == "methods" and result.text_images:
            grid[0][0] = result.text_images[0]
    cells: list[GeneratedImage] = []
    for r, row in enumerate(grid):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            cell.label = " / ".join(x for x in (rows[r], cols[c]) if x)
            cells.append(cell)
    prompt = request.prompt if len(request.prompt) <= 80 else request.prompt[:77] + "..."
    title = f'"{prompt}" · seed {request.seed}' + (f" · style {request.style}" if mode != "styles" else "")
    image = labelled_grid(
        [[cell.image if cell else None for cell in row] for row in grid],
        row_labels=rows if any(rows) else None,
        col_labels=cols,
        captions=[["" if cell is None else _short_similarity(cell) for cell in row] for row in grid],
        title=title,
    )
    return CompareResult(image, cells, int(request.seed), time.perf_counter() - started, title)


def _short_similarity(cell: GeneratedImage) -> str:
    value = cell.similarity
    return "identity n/a" if value is None else f"identity {value:.2f}"


# --- identity mixing ----------------------------------------------------------------------------------------------


def mix(
    pipe,
    request: GenerationRequest,
    first: Identity,
    second: Identity,
    weight: float,
    *,
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    deadline: float | None = None,
) -> GenerationResult:
    """One person between two: their identity tokens blended ``(1 - weight) * first + weight * second``.

    Tokens, not raw features, are blended (the mapper is non-linear; blending its inputs would not give a
    point between the two people it maps to). The output is measured against both people.
    """
    weight = _number(weight, 0.5, 0.0, 1.0)
    if pipe.id_encoder is None:
        raise ValueError("This engine has no identity encoder, so it cannot mix identities.")
    with torch.no_grad():
        tokens = interpolate_identities(pipe.id_encoder(first.features), pipe.id_encoder(second.features), weight)
    request = request.replace(method="infinite-id" if request.method == "text" else request.method)
    meta = {"mix": [_identity_meta(first), _identity_meta(second)], "weight": weight}
    return run(
        pipe, request, tokens, identity_meta=meta,
        references={"person A": first.reference, "person B": second.reference},
        on_step=on_step, cancel=cancel, deadline=deadline,
    )


# --- before anyone sees an image: safety check and watermark -----------------------------------------------------

# SDXL's invisible watermark: the same 48-bit message diffusers' StableDiffusionXLWatermarker embeds (dwtDct).
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = [int(bit) for bit in bin(WATERMARK_MESSAGE)[2:]]
WATERMARK_MIN_SIDE = 256  # dwtDct needs at least this; like diffusers, smaller images are left unmarked
WITHHELD_MESSAGE = ("The safety check withheld this image, so it is not shown or kept. Please try a different "
                    "prompt.")

SafetyChecker = Callable[[list[Image.Image]], Sequence[bool]]


def load_callable(reference: str) -> Callable:
    """``"package.module:function"`` -> the function (how a safety checker is named in the settings)."""
    import importlib

    module, _, name = reference.partition(":")
    if not module or not name:
        raise ValueError(f"A safety checker is named 'package.module:function', not {reference!r}.")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:  # a start-up message, not a traceback
        raise ValueError(f"The safety checker {reference!r} cannot be loaded: {error}") from error


class OutputGuard:
    """What every output goes through before it is saved or shown, both off unless configured
    (``config.ServerSettings.watermark`` / ``.safety_checker``):

    * ``safety_checker(images) -> list[bool]``: True means the image must not be shown; it is dropped, never saved.
    * ``watermark``: SDXL's invisible watermark (the ``invisible-watermark`` package), on images of 256 px and up.

    Built once at start-up, so a checker that cannot be imported or a missing watermark package stops the app
    there, not on a request. Holds no per-call state: ``screen`` returns what it keeps.
    """

    def __init__(self, watermark: bool = False, safety_checker: SafetyChecker | str | None = None):
        self.safety_checker = load_callable(safety_checker) if isinstance(safety_checker, str) else safety_checker
        self.encoder = None
        if watermark:
            try:
                from imwatermark import WatermarkEncoder
            except ImportError as error:
                raise ValueError("The invisible watermark is switched on (INFINITE_ID_WATERMARK) but the "
                                 "invisible-watermark package is not installed: pip install invisible-watermark"
                                 ) from error
            self.encoder = WatermarkEncoder()
            self.encoder.set_watermark("bits", WATERMARK_BITS)

    @classmethod
    def from_settings(cls, settings) -> OutputGuard:
        return cls(watermark=settings.watermark, safety_checker=settings.safety_checker)

    def screen(self, items: Sequence[GeneratedImage]) -> tuple[list[GeneratedImage], int]:
        """The items that may be shown (watermarked when configured) and how many were withheld."""
        items = list(items)
        kept = items
        if self.safety_checker is not None and items:
            flags = [bool(flag) for flag in self.safety_checker([item.image for item in items])]
            if len(flags) != len(items):
                raise RuntimeError(f"The safety checker answered {len(flags)} flags for {len(items)} images.")
            kept = [item for item, flagged in zip(items, flags) if not flagged]
        for item in kept:
            item.image = self.mark(item.image)
        return kept, len(items) - len(kept)

    def mark(self, image: Image.Image) -> Image.Image:
        if self.encoder is None or min(image.size) < WATERMARK_MIN_SIDE:
            return image
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        return Image.fromarray(np.ascontiguousarray(self.encoder.encode(bgr, "dwtDct")[:, :, ::-1]))


# --- saving -------------------------------------------------------------------------------------------------------


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``image`` as PNG with our metadata as text chunks, and nothing else of any source file's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if metadata:
        info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
        info.add_text("parameters", _parameters_text(metadata))  # the line other SD tools display
    info.add_text("Software", SOFTWARE)
    clean = Image.frombytes("RGB", image.size, image.convert("RGB").tobytes())  # no EXIF/GPS/ICC carried over
    clean.save(path, format="PNG", pnginfo=info)
    return path


def _parameters_text(meta: dict[str, Any]) -> str:
    settings = [
        ("Steps", meta.get("num_inference_steps")), ("CFG scale", meta.get("guidance_scale")),
        ("Seed", meta.get("seed")), ("Size", f"{meta.get('width')}x{meta.get('height')}"),
        ("Method", meta.get("method")), ("ID scale", meta.get("id_scale")),
        ("Semantic scale", meta.get("semantic_scale")), ("Style strength", meta.get("style_strength")),
        ("Style", meta.get("style")), ("Model", (meta.get("models") or {}).get("base_model")),
    ]
    text = f"{meta.get('prompt', '')}\nNegative prompt: {meta.get('negative_prompt', '')}\n"
    return text + ", ".join(f"{k}: {v}" for k, v in settings if v is not None)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Our metadata from a PNG written by ``save_png`` (an empty dict for any other image)."""
    with Image.open(path) as image:
        raw = getattr(image, "text", {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def save_images(images: Sequence[GeneratedImage], folder: str | Path, stem: str = "infinite-id") -> list[Path]:
    """Save each image as ``{stem}-{seed}[-{n}].png`` in ``folder``; sets and returns their paths."""
    folder = Path(folder)
    paths = []
    for n, item in enumerate(images):
        method = item.metadata.get("method", "image")
        path = folder / f"{stem}-{method}-{item.seed}-{n}.png"
        item.path = save_png(item.image, path, item.metadata)
        paths.append(item.path)
    return paths


def save_comparison(result: CompareResult, folder: str | Path, stem: str = "compare") -> tuple[Path, list[Path]]:
    """The grid (its metadata lists every cell's) and each cell, as PNGs in ``folder``."""
    paths = save_images(result.cells, folder, stem=stem)
    metadata = {"software": SOFTWARE, "version": METADATA_VERSION, "grid": result.title,
                "cells": [cell.metadata for cell in result.cells]}
    grid = save_png(result.grid, Path(folder) / f"{stem}-grid-{result.seed}.png", metadata)
    return grid, paths
