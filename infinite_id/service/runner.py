"""One pipeline call per image set: seeds per image (image ``i`` of a request with seed ``s`` is reproduced alone
with seed ``s + i``), progress per step, cooperative cancel, a time limit, out-of-memory and blank outputs as
sentences, and the face similarity of every output to the reference. Nothing is stored on the shared pipeline."""

from __future__ import annotations

import dataclasses
import functools
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..method.id_encoder import IdentityFeatures
from .identity import Identity, output_similarity
from .outputs import METADATA_VERSION, SOFTWARE
from .request import METHOD_LABELS, GenerationRequest


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

    @property
    def has_lora(self) -> bool:
        """Whether the adapter that made these images carries a LoRA (``lora_scale`` had an effect)."""
        return carries_lora((self.images[0].metadata.get("models") or {}) if self.images else {})

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
            lines.append(f"identity {r.id_scale:g}" + (f" · adapter LoRA {r.lora_scale:g}" if self.has_lora else "") + (
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


def carries_lora(weights: dict) -> bool:
    """Whether the adapter the loader recorded in ``weights`` (``pipe.weights_info``, or an image's "models"
    metadata) carries a LoRA: its "lora" entry is "none" or the LoRA's rank."""
    return str(weights.get("lora", "none")) != "none"


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


def is_blank(image: Image.Image) -> bool:
    """Black or flat output: what NaNs (fp16 overflow) become after decoding. Never shown as a success."""
    pixels = np.asarray(image, dtype=np.float32)
    return bool(pixels.std() < 1.0 and pixels.mean() < 8.0)


def deadline_in(seconds: float | None) -> float | None:
    """A ``deadline`` for ``run`` that is ``seconds`` from now (None or <= 0: no limit)."""
    return time.monotonic() + seconds if seconds and seconds > 0 else None


def _free_memory() -> None:
    from ..models.device import empty_cache, pick_device

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
        "lora_scale": request.lora_scale if method != "text" else None,
        "adain_cross": request.adain_cross if method == "infinite-id" else None,
        "clip_channel_order": (identity_meta or {}).get("clip_channel_order") if method != "text" else None,
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
    _check_stop(cancel, deadline)  # e.g. the last cells of a long comparison, timed out before they start
    total = total_steps if total_steps is not None else request.steps

    def step_end(_pipe, i, _t, _tensors):
        _check_stop(cancel, deadline)
        if on_step is not None:
            on_step(step_offset + i + 1, total)
        return {}

    started = time.perf_counter()
    output = _call_pipeline(pipe, request, id_embeds, step_end)
    seconds = time.perf_counter() - started
    wrap = functools.partial(_wrap, pipe, request, identity_meta=identity_meta, references=references or {})
    images = wrap(output.images, request.method)
    text_images = wrap(output.text_images, "text") if output.text_images is not None else []
    return GenerationResult(images, text_images, request, seconds)


def _check_stop(cancel: threading.Event | None, deadline: float | None) -> None:
    """Raise ``GenerationCancelled`` once ``cancel`` is set, ``GenerationTimeout`` once ``deadline`` has passed."""
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled()
    if deadline is not None and time.monotonic() > deadline:
        raise GenerationTimeout()


def _call_pipeline(pipe, request: GenerationRequest, id_embeds, step_end):
    """The pipeline call itself, with out-of-memory and non-finite outputs turned into sentences."""
    prompt, negative, strength = request.styled()
    # CPU generators, one per image: the same seed gives the same starting noise on any device, and image i
    # of a batch is reproduced on its own with seed + i.
    generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.num_images)]
    try:
        return pipe(
            prompt,
            id_embeds=id_embeds if request.needs_identity else None,
            negative_prompt=negative or None,
            method=request.method,
            id_scale=request.id_scale,
            semantic_scale=request.semantic_scale,
            style_strength=strength,
            mix_window=request.mix_window,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            height=request.height,
            width=request.width,
            num_images_per_prompt=request.num_images,
            generator=generators,
            callback_on_step_end=step_end,
            lora_scale=request.lora_scale,
            adain_cross=request.adain_cross,
            return_text_images=request.text_stream,
        )
    # Both are answered outside their except blocks, so the traceback (and the tensors it holds) is gone first.
    except torch.OutOfMemoryError:  # torch.cuda.OutOfMemoryError is the same class
        non_finite = False
    except FloatingPointError:  # the pipeline's decode: NaN/inf even after its fp32 retry
        non_finite = True
    _free_memory()
    if non_finite:
        raise GenerationError(BLANK_MESSAGE)
    raise OutOfMemory(
        # The sentence reaches web users too, so no command-line flag: docs/weights.md has the memory modes.
        "The GPU ran out of memory for this request. Try fewer images or a smaller size; if it keeps "
        "happening, the server needs a lower memory mode (docs/weights.md)."
    )


def _wrap(pipe, request: GenerationRequest, images, method: str, *, identity_meta: dict | None,
          references: dict[str, np.ndarray]) -> list[GeneratedImage]:
    """The pipeline's images with their seeds, PNG metadata and similarity to each reference person."""
    analyzer = getattr(pipe, "face_analyzer", None)
    out = []
    for i, image in enumerate(images):
        if is_blank(image):
            raise GenerationError(BLANK_MESSAGE)
        seed = request.seed + i
        sims = {name: output_similarity(analyzer, image, ref) for name, ref in references.items()}
        meta = _metadata(pipe, request, seed, method, identity_meta)
        meta["similarity"] = dict(sims) or None
        out.append(GeneratedImage(image=image, seed=seed, metadata=meta, similarities=sims))
    return out


def _identity_meta(identity: Identity | None) -> dict | None:
    if identity is None:
        return None
    return {"key": identity.key, "face_index": identity.face_index, "photos": identity.photos,
            "clip_channel_order": identity.clip_channel_order}


def _check_channel_order(request: GenerationRequest, identity: Identity | None) -> None:
    """The CLIP crop's order acts when the photo is encoded: an identity encoded in the other order than the
    request asks for would silently ignore the setting."""
    wanted, used = request.clip_channel_order, getattr(identity, "clip_channel_order", None)
    if identity is not None and wanted and used and wanted != used:
        raise ValueError(f"This person's photo was encoded with the CLIP crop in {used.upper()} order, but the "
                         f"request asks for {wanted.upper()}: encode the photo again with "
                         f"clip_channel_order={wanted!r} (IdentityCache.encode).")


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
    _check_channel_order(request, identity)
    return run(
        pipe, request, identity.features if identity is not None else None,
        identity_meta=_identity_meta(identity),
        references={"identity": identity.reference} if identity is not None else None,
        on_step=on_step, cancel=cancel, deadline=deadline,
    )


