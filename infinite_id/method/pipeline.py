"""InfiniteIDPipeline: SDXL with an identity stream beside the text stream (DESIGN 2.4).

One UNet call per step carries both streams. With classifier-free guidance the batch of each step is laid out
``[text_uncond, text_cond, id_uncond, id_cond]`` (blocks of one row per image; DESIGN 2.4's four rows, stream-major
so each stream is one block): each ID row mixes with the text row of the same image and polarity; the
unconditional ID row gets the null identity and the negative prompt. CFG is applied per stream, and each stream
has its own scheduler instance, created per call, so calls never share scheduler state.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .attention import IDCall, check_installed, install_id_processors
from .id_encoder import IdentityFeatures
from .id_lora import LORA_SCALE_RANGE
from .identity_inputs import CLIP_CHANNEL_ORDERS, IdentityInputsMixin

METHODS = ("infinite-id", "adapter", "text")
logger = logging.getLogger(__name__)


@dataclass
class InfiniteIDPipelineOutput(BaseOutput):
    """``images``: the output (ID stream; the only stream for ``adapter``/``text``).
    ``text_images``: the text stream of ``infinite-id`` (the same seed without identity), else None."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    text_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


@dataclass(frozen=True)
class _Layout:
    """Which batch rows hold which stream. Rows are stream-major, polarity next, ``batch`` rows per block:
    ``[text_uncond, text_cond, id_uncond, id_cond]`` with CFG. Every stream is then one contiguous block (a slice,
    so the attention processors work on views), and identity row i mixes with text row i of the text block."""

    streams: tuple[str, ...]  # ("text", "id"), ("id",) or ("text",)
    polarities: tuple[str, ...]  # ("uncond", "cond") with CFG, ("cond",) without
    batch: int

    def rows(self, stream: str) -> slice:
        size = len(self.polarities) * self.batch
        s = self.streams.index(stream)
        return slice(s * size, (s + 1) * size)

    def per_row(self, by_polarity: dict[str, torch.Tensor]) -> torch.Tensor:
        """Lay out a per-image tensor given for each polarity over all rows."""
        return torch.cat([by_polarity[p] for _ in self.streams for p in self.polarities])

    @property
    def key(self) -> str:
        """Names this layout in a call's K/V cache (a string: a constant to torch.compile's guards)."""
        return f"{'+'.join(self.streams)}|{'+'.join(self.polarities)}|{self.batch}"


STREAMS = {"infinite-id": ("text", "id"), "adapter": ("id",), "text": ("text",)}


@dataclass(frozen=True)
class _DenoisePlan:
    """What one call's denoising loop needs besides tensors. Built per call, never stored on the pipeline."""

    streams: tuple[str, ...]
    batch: int
    cfg: bool
    guidance_scale: float
    steps: int
    mix_steps: tuple[float, float]  # step i mixes when start <= i < end
    cfg_cutoff: float
    keep_text: bool  # the caller wants the text stream's images
    # IDCall knobs: id_scale, semantic_scale, style_strength, mix_layers, adain_cross, lora_scale.
    knobs: dict = field(hash=False)

    def layout(self, i: int) -> _Layout:
        active = self.streams
        if not self.keep_text and len(self.streams) == 2 and i >= self.mix_steps[1]:
            active = ("id",)  # past the mixing window nothing reads the text stream any more
        with_uncond = self.cfg and i < self.cfg_cutoff * self.steps
        return _Layout(active, ("uncond", "cond") if with_uncond else ("cond",), self.batch)


class InfiniteIDPipeline(IdentityInputsMixin, StableDiffusionXLPipeline):
    """SDXL with Infinite-ID's identity stream. See DESIGN 4 for the call contract."""

    _optional_components = [*StableDiffusionXLPipeline._optional_components, "id_encoder"]
    _callback_tensor_inputs = ["latents", "text_latents"]  # what callback_on_step_end may ask for

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        id_encoder=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = False,
        face_analyzer=None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_modules(id_encoder=id_encoder)
        # Not a diffusers component (it is onnxruntime, not torch), so it is a plain attribute.
        self.face_analyzer = face_analyzer
        self._vae_upcast_lock = threading.Lock()
        self._prompt_lock = threading.Lock()
        install_id_processors(unet)

    def encode_prompt(self, *args, **kwargs):
        """diffusers' prompt encoding, one call at a time.

        The tokenizers keep their padding/truncation mode on the shared object: diffusers' ``encode_prompt`` asks
        for ``max_length`` padding and then ``longest`` (for its truncation warning), so two calls at once could get
        each other's padding: a shape error or a silently wrong embedding (found by 8 concurrent requests in
        tests/test_reliability.py). Encoding takes milliseconds; the lock costs nothing at one job at a time.
        """
        with self._prompt_lock:
            return super().encode_prompt(*args, **kwargs)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        id_image=None,
        id_embeds: IdentityFeatures | torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        method: str = "infinite-id",
        id_scale: float = 1.0,
        semantic_scale: float = 1.0,
        style_strength: float = 1.0,
        mix_window: tuple[float, float] = (0.0, 1.0),
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_dict: bool = True,
        mix_layers: tuple[str, ...] | None = None,
        adain_cross: bool = True,
        timesteps: list[int] | None = None,
        return_text_images: bool = True,
        cfg_cutoff: float = 1.0,
        lora_scale: float = 1.0,
        clip_channel_order: str | None = None,
    ):
        """Generate images of the person in ``id_image`` following ``prompt``.

        ``mix_layers``: name prefixes of the self-attention layers that mix (None: all). ``adain_cross``: AdaIN-mean
        on the cross-attention image keys/values as well, towards the text keys/values (the paper's; only in
        ``"infinite-id"``, inside the mixing window). ``lora_scale``: strength of the loaded adapter's LoRA on the
        identity stream, 0 to 2 (1.0: as the adapter was trained; 0: off; ignored when the adapter has none).
        ``clip_channel_order``: "rgb" or "bgr" for the CLIP crop when ``id_image`` is read here (None: the order the
        adapter was published with; see ``encode_identity``).
        Work that does not change ``.images`` can be skipped: with ``return_text_images=False`` the text stream
        leaves the batch once the mixing window has ended (the ID stream no longer reads it) and ``.text_images``
        is None; ``cfg_cutoff < 1`` drops the unconditional rows for the last part of the schedule (CFG
        truncation; this does change the images slightly, so it is off by default).
        """
        # 1. Check inputs.
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_call_inputs(
            method, id_scale, semantic_scale, style_strength, mix_window, height, width, num_inference_steps,
            num_images_per_prompt, cfg_cutoff, callback_on_step_end_tensor_inputs, lora_scale, clip_channel_order,
        )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) * num_images_per_prompt
        streams = STREAMS[method]

        # 2. Encode the prompt (the unconditional rows of both streams use the negative prompt).
        cfg = guidance_scale > 1.0
        prompt_rows = self._encode_prompt_rows(prompts, negative_prompt, num_images_per_prompt, cfg, height, width)

        # 3. Identity tokens: the person's on conditional rows, the null identity on unconditional ones.
        tokens = None
        if "id" in streams:
            cond_tokens, null_tokens = self._id_tokens(id_image, id_embeds, batch, num_images_per_prompt,
                                                       clip_channel_order)
            tokens = {"uncond": null_tokens, "cond": cond_tokens}

        # 4. Timesteps: every stream gets its own fresh scheduler, so no call touches self.scheduler's state.
        schedulers, ts = self._stream_schedulers(streams, num_inference_steps, timesteps)

        # 5. One initial latent per image, shared by both streams.
        dtype = prompt_rows["cond"][0].dtype
        x = self._initial_latents(streams, schedulers, batch, height, width, generator, latents, dtype)

        # 6. Denoise: one UNet call per step carries every active stream and polarity.
        plan = _DenoisePlan(
            streams=streams, batch=batch, cfg=cfg, guidance_scale=guidance_scale, steps=len(ts),
            mix_steps=(mix_window[0] * len(ts), mix_window[1] * len(ts)), cfg_cutoff=cfg_cutoff,
            keep_text=return_text_images,
            knobs=dict(id_scale=id_scale, semantic_scale=semantic_scale, style_strength=style_strength,
                       mix_layers=mix_layers, adain_cross=bool(adain_cross) and method == "infinite-id",
                       lora_scale=float(lora_scale)),
        )
        x = self._denoise(plan, schedulers, ts, x, prompt_rows, tokens,
                          callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 7. Decode the identity stream (the only stream of the other methods) and, if wanted, the text stream.
        images = self._decode(x["id" if "id" in streams else "text"], output_type)
        text_images = None
        if method == "infinite-id" and return_text_images:
            text_images = self._decode(x["text"], output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, text_images
        return InfiniteIDPipelineOutput(images=images, text_images=text_images)

    def check_call_inputs(self, method, id_scale, semantic_scale, style_strength, mix_window, height, width, steps,
                          images, cfg_cutoff, callback_inputs, lora_scale=1.0, clip_channel_order=None) -> None:
        """Every rule for a call's arguments, each failure a ValueError naming the argument (diffusers'
        ``check_inputs`` habit); and our attention processors must still be installed."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
        for name, value in (("id_scale", id_scale), ("semantic_scale", semantic_scale),
                            ("style_strength", style_strength)):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value}.")
        low, high = LORA_SCALE_RANGE
        if not np.isfinite(lora_scale) or not low <= lora_scale <= high:
            raise ValueError(f"lora_scale must be between {low:g} and {high:g} (1 is the strength the adapter was "
                             f"trained with, 0 turns its LoRA off), got {lora_scale}.")
        if clip_channel_order is not None and str(clip_channel_order).strip().lower() not in CLIP_CHANNEL_ORDERS:
            raise ValueError(f"clip_channel_order must be 'rgb' or 'bgr' (or None for the adapter's own), got "
                             f"{clip_channel_order!r}.")
        start, end = mix_window
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"mix_window must be (start, end) with 0 <= start <= end <= 1, got {mix_window}.")
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}.")
        if steps < 1 or images < 1:
            raise ValueError("num_inference_steps and num_images_per_prompt must be at least 1.")
        if not 0.0 <= cfg_cutoff <= 1.0:
            raise ValueError(f"cfg_cutoff must be between 0 and 1, got {cfg_cutoff}.")
        unknown = [k for k in callback_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, "
                             f"not {unknown}.")
        check_installed(self.unet)

    def _encode_prompt_rows(self, prompts, negative_prompt, images_per_prompt, cfg, height, width) -> dict:
        """Prompt and pooled embeddings per polarity, and SDXL's size conditioning (``time_ids``)."""
        device = self._execution_device
        embeds, neg_embeds, pooled, neg_pooled = self.encode_prompt(
            prompts, device=device, num_images_per_prompt=images_per_prompt, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt,
        )
        time_ids = self._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=embeds.dtype,
            text_encoder_projection_dim=self.text_encoder_2.config.projection_dim,
        ).to(device)
        return {"cond": (embeds, pooled), "uncond": (neg_embeds, neg_pooled), "time_ids": time_ids}

    def _stream_schedulers(self, streams, steps, timesteps) -> tuple[dict, torch.Tensor]:
        schedulers = {s: self._fresh_scheduler() for s in streams}
        for s in streams:
            ts, _ = retrieve_timesteps(schedulers[s], steps, self._execution_device, timesteps)
        return schedulers, ts

    def _initial_latents(self, streams, schedulers, batch, height, width, generator, latents, dtype) -> dict:
        device = self._execution_device
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device, dtype) * schedulers[streams[0]].init_noise_sigma
        return {s: latents.clone() for s in streams}

    def _denoise(self, plan: _DenoisePlan, schedulers, ts, x, prompt_rows, tokens, callback, callback_inputs):
        """The denoising loop. A step's batch layout depends on the step (the text stream leaves after the mixing
        window when its image is not wanted; the unconditional rows leave after ``cfg_cutoff``); the per-row
        inputs of each layout are built once per call."""
        rows_cache: dict[_Layout, dict] = {}
        kv_cache: dict = {}  # identity (and text) keys/values per cross-attention layer, projected once this call
        out_stream = "id" if "id" in plan.streams else "text"
        for i, t in enumerate(ts):
            layout = plan.layout(i)
            if layout not in rows_cache:
                rows_cache[layout] = self._batch_rows(layout, prompt_rows, tokens)
            x = self._step(plan, layout, rows_cache[layout], schedulers, i, t, x, kv_cache)
            if callback is not None:
                values = {"latents": x[out_stream], "text_latents": x.get("text")}
                result = callback(self, i, t, {k: values[k] for k in callback_inputs if k in values}) or {}
                if "latents" in result:
                    x[out_stream] = result["latents"]
        return x

    def _batch_rows(self, layout: _Layout, prompt_rows: dict, tokens: dict | None) -> dict:
        """The per-row inputs of one batch layout: prompt and pooled embeddings, time ids, and which rows hold
        the identity stream (with its tokens) and the text stream it mixes with (slices: no tensor is read)."""
        rows = {
            "prompt": layout.per_row({p: prompt_rows[p][0] for p in layout.polarities}),
            "pooled": layout.per_row({p: prompt_rows[p][1] for p in layout.polarities}),
            "id_rows": None, "text_rows": None, "other_rows": None, "tokens": None,
        }
        rows["time_ids"] = prompt_rows["time_ids"].repeat(rows["prompt"].shape[0], 1)
        if "id" in layout.streams:
            rows["id_rows"] = layout.rows("id")
            rows["tokens"] = torch.cat([tokens[p] for p in layout.polarities])  # the identity block's order
            # The rows outside the identity stream are the text stream's (none for the adapter).
            text = layout.rows("text") if "text" in layout.streams else None
            rows["text_rows"] = text
            rows["other_rows"] = text if text is not None else slice(0, 0)
        return rows

    def _step(self, plan: _DenoisePlan, layout: _Layout, rows: dict, schedulers, i, t, x, kv_cache) -> dict:
        """One UNet call for every active stream and polarity, CFG per stream, one scheduler step per stream."""
        call = None
        if rows["id_rows"] is not None:
            start, end = plan.mix_steps
            call = IDCall(
                id_rows=rows["id_rows"], id_tokens=rows["tokens"], text_rows=rows["text_rows"],
                mixing=start <= i < end, other_rows=rows["other_rows"], kv_cache=kv_cache,
                tokens_key="+".join(layout.polarities), layout_key=layout.key, **plan.knobs,
            )
        active, polarities = layout.streams, layout.polarities
        scaled = {s: schedulers[s].scale_model_input(x[s], t) for s in active}
        noise = self.unet(
            torch.cat([scaled[s] for s in active for _ in polarities]), t, encoder_hidden_states=rows["prompt"],
            cross_attention_kwargs=None if call is None else {"id_call": call},
            added_cond_kwargs={"text_embeds": rows["pooled"], "time_ids": rows["time_ids"]}, return_dict=False,
        )[0]
        noise = noise.view(len(active), len(polarities), plan.batch, *noise.shape[1:])  # [stream, polarity, image]
        guided = noise[:, 0] + plan.guidance_scale * (noise[:, 1] - noise[:, 0]) if len(polarities) == 2 else noise[:, 0]
        x = dict(x)
        for j, s in enumerate(active):
            x[s] = schedulers[s].step(guided[j], t, x[s], return_dict=False)[0]
        return x

    def _fresh_scheduler(self):
        return copy.deepcopy(self.scheduler)

    def _decode(self, latents: torch.Tensor, output_type: str):
        """Latents -> images. A decode that gives NaN/inf (fp16 overflow) is retried once in fp32; if the numbers
        are still not finite, ``FloatingPointError`` is raised: a black or NaN image is never returned."""
        if output_type == "latent":
            return latents
        vae = self.vae
        finite_latents = bool(torch.isfinite(latents).all())
        if vae.config.get("latents_mean") is not None and vae.config.get("latents_std") is not None:
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor

        def decode_fp32() -> torch.Tensor:
            if vae.dtype == torch.float32:
                return vae.decode(latents.float(), return_dict=False)[0]
            original = vae.dtype
            vae.to(torch.float32)  # the caller holds _vae_upcast_lock: the VAE is shared between calls
            try:
                return vae.decode(latents.float(), return_dict=False)[0]
            finally:
                vae.to(original)

        if vae.dtype == torch.float32:
            # Nothing to upcast: a retry at the same precision would give the same numbers.
            image = vae.decode(latents, return_dict=False)[0]
        else:
            # Another call may be switching the shared VAE to fp32 for its retry: decode one call at a time.
            with self._vae_upcast_lock:
                if vae.dtype == torch.float16 and vae.config.force_upcast:
                    image = decode_fp32()  # the original SDXL VAE overflows in fp16
                else:
                    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
                    if finite_latents and not bool(torch.isfinite(image).all()):
                        logger.warning("VAE decode overflowed in %s; retrying in fp32",
                                                            vae.dtype)
                        image = decode_fp32()
        if not bool(torch.isfinite(image).all()):
            where = "the denoised latents" if not finite_latents else "the decoded image, even in fp32"
            raise FloatingPointError(f"The generation produced NaN/inf values in {where}.")
        return self.image_processor.postprocess(image, output_type=output_type)
