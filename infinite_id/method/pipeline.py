"""InfiniteIDPipeline: SDXL with an identity stream beside the text stream (DESIGN 2.4).

One UNet call per step carries both streams. With classifier-free guidance the batch of each step is laid out
``[text_uncond, id_uncond, text_cond, id_cond]`` (blocks of one row per image): each ID row mixes with the text row
of the same polarity; the unconditional ID row gets the null identity and the negative prompt. CFG is applied per
stream, and each stream has its own scheduler instance, created per call, so calls never share scheduler state.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .attention import IDCall, check_installed, install_id_processors
from .id_encoder import IdentityFeatures
from .ops import average_identity

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
    """Which batch rows hold which stream: rows are polarity-major, stream-minor, ``batch`` rows per block."""

    streams: tuple[str, ...]  # ("text", "id"), ("id",) or ("text",)
    polarities: tuple[str, ...]  # ("uncond", "cond") with CFG, ("cond",) without
    batch: int

    def rows(self, stream: str, device) -> torch.Tensor:
        s = self.streams.index(stream)
        idx = [(p * len(self.streams) + s) * self.batch + b for p in range(len(self.polarities)) for b in range(self.batch)]
        return torch.tensor(idx, dtype=torch.long, device=device)

    def per_row(self, by_polarity: dict[str, torch.Tensor]) -> torch.Tensor:
        """Lay out a per-image tensor given for each polarity over all rows."""
        return torch.cat([by_polarity[p] for p in self.polarities for _ in self.streams])


class InfiniteIDPipeline(StableDiffusionXLPipeline):
    """SDXL with Infinite-ID's identity stream. See DESIGN 4 for the call contract."""

    _optional_components = [*StableDiffusionXLPipeline._optional_components, "id_encoder"]

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

    # ------------------------------------------------------------------ identity
    @torch.no_grad()
    def encode_identity(self, id_image) -> IdentityFeatures:
        """Photo(s) of one person -> raw identity features, averaged over the photos.

        ``id_image``: a photo (anything ``load_image`` takes), a face already picked from ``face_analyzer``
        (a FaceResult), or a list of those, all of the *same* person. Pass the result as ``id_embeds`` to reuse it.
        """
        encoder = self._require_encoder()
        photos = list(id_image) if isinstance(id_image, list | tuple) else [id_image]
        if not photos:
            raise ValueError("id_image is an empty list; give at least one photo of the person.")
        faces = [self._face(p) for p in photos] if encoder.needs_face or self.face_analyzer is not None else None
        face = clip = face_norm = None
        device = self._execution_device
        if encoder.needs_face:
            embeds = torch.stack([torch.tensor(np.asarray(f.embedding), dtype=torch.float32) for f in faces])
            face = average_identity(embeds, normalize=True)[None].to(device)
            face_norm = torch.tensor([float(np.mean([getattr(f, "embedding_norm", 1.0) for f in faces]))], device=device)
        if encoder.needs_clip:
            if self.image_encoder is None or self.feature_extractor is None:
                raise ValueError("This identity encoder needs a CLIP image encoder; the pipeline has none loaded.")
            crops = [f.clip_crop for f in faces] if faces is not None else [self._as_rgb(p) for p in photos]
            pixels = self.feature_extractor(images=crops, return_tensors="pt").pixel_values
            pixels = pixels.to(device=device, dtype=self.image_encoder.dtype)
            hidden = self.image_encoder(pixels, output_hidden_states=True).hidden_states[encoder.clip_layer]
            clip = average_identity(hidden, normalize=False)[None]
        return IdentityFeatures(face=face, clip=clip, face_norm=face_norm)

    def _face(self, photo):
        if hasattr(photo, "embedding") and hasattr(photo, "clip_crop"):
            return photo  # an already-analysed face (the "pick a face" path)
        if self.face_analyzer is None:
            raise ValueError(
                "This pipeline has no face analyzer, so it cannot read a photo. Set pipe.face_analyzer, or pass "
                "precomputed id_embeds."
            )
        return self.face_analyzer.analyze(photo)[0]  # largest face; analyze raises a clear error when there is none

    @staticmethod
    def _as_rgb(photo):
        from ..images import load_image

        return load_image(photo)

    def _require_encoder(self):
        if self.id_encoder is None:
            raise ValueError("This pipeline has no identity encoder loaded; only method='text' can run.")
        return self.id_encoder

    def _id_tokens(self, id_image, id_embeds, batch: int, images_per_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity tokens ``[batch, N, D]`` for the conditional rows, and the null identity of the same shape."""
        encoder = self._require_encoder()
        if id_embeds is None:
            if id_image is None:
                raise ValueError("This method needs the person's photo: pass id_image (or precomputed id_embeds).")
            id_embeds = self.encode_identity(id_image)
        with torch.no_grad():
            tokens = encoder(id_embeds) if isinstance(id_embeds, IdentityFeatures) else id_embeds
            tokens = tokens[None] if tokens.ndim == 2 else tokens
            tokens = tokens.to(self._execution_device, self.unet.dtype)
            prompts = batch // images_per_prompt
            if tokens.shape[0] == prompts and prompts != batch:
                tokens = tokens.repeat_interleave(images_per_prompt, dim=0)
            elif tokens.shape[0] == 1:
                tokens = tokens.expand(batch, -1, -1)
            if tokens.shape[0] != batch:
                raise ValueError(f"Got identity tokens for {tokens.shape[0]} images but the call makes {batch}.")
            null = encoder.null_tokens(1).to(tokens.dtype)
            if tokens.shape[1] % null.shape[1]:
                raise ValueError(
                    f"Identity tokens have {tokens.shape[1]} tokens, not a multiple of the encoder's {null.shape[1]}."
                )
            # Several stacked people get a null identity per person, so both CFG rows have the same token count.
            null = null.repeat(1, tokens.shape[1] // null.shape[1], 1).expand(batch, -1, -1)
        return tokens, null

    # ------------------------------------------------------------------ call
    @staticmethod
    def _check_args(method, id_scale, semantic_scale, style_strength, mix_window, height, width, steps, images):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
        for name, value in (("id_scale", id_scale), ("semantic_scale", semantic_scale), ("style_strength", style_strength)):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value}.")
        start, end = mix_window
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"mix_window must be (start, end) with 0 <= start <= end <= 1, got {mix_window}.")
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}.")
        if steps < 1 or images < 1:
            raise ValueError("num_inference_steps and num_images_per_prompt must be at least 1.")

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
        adain_cross: bool = False,
        timesteps: list[int] | None = None,
        return_text_images: bool = True,
        cfg_cutoff: float = 1.0,
    ):
        """Generate images of the person in ``id_image`` following ``prompt``.

        Steps: 1 check inputs, 2 encode the prompt, 3 encode the identity, 4 timesteps, 5 one initial latent per
        image shared by both streams, 6 lay out the batch of each step, 7 denoise, 8 decode.
        ``mix_layers``: name prefixes of the self-attention layers that mix (None: all); ``adain_cross``: AdaIN-mean
        on the cross-attention image keys/values too (off in the paper's behaviour).
        Work that does not change ``.images`` can be skipped: with ``return_text_images=False`` the text stream
        leaves the batch once the mixing window has ended (the ID stream no longer reads it) and ``.text_images``
        is None; ``cfg_cutoff < 1`` drops the unconditional rows for the last part of the schedule (CFG
        truncation; this does change the images slightly, so it is off by default).
        """
        # 1. Check inputs.
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self._check_args(
            method, id_scale, semantic_scale, style_strength, mix_window, height, width, num_inference_steps,
            num_images_per_prompt,
        )
        if not 0.0 <= cfg_cutoff <= 1.0:
            raise ValueError(f"cfg_cutoff must be between 0 and 1, got {cfg_cutoff}.")
        check_installed(self.unet)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) * num_images_per_prompt
        device = self._execution_device
        cfg = guidance_scale > 1.0
        streams = {"infinite-id": ("text", "id"), "adapter": ("id",), "text": ("text",)}[method]

        # 2. Prompt embeddings (the unconditional rows of both streams use the negative prompt).
        embeds, neg_embeds, pooled, neg_pooled = self.encode_prompt(
            prompts, device=device, num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt,
        )
        time_ids = self._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=embeds.dtype,
            text_encoder_projection_dim=self.text_encoder_2.config.projection_dim,
        ).to(device)

        # 3. Identity tokens: the person's on conditional rows, the null identity on unconditional ones.
        tokens = None
        if "id" in streams:
            cond_tokens, null_tokens = self._id_tokens(id_image, id_embeds, batch, num_images_per_prompt)
            tokens = {"uncond": null_tokens, "cond": cond_tokens}

        # 4. Timesteps: every stream gets its own fresh scheduler, so no call touches self.scheduler's state.
        schedulers = {s: self._fresh_scheduler() for s in streams}
        for s in streams:
            ts, num_inference_steps = retrieve_timesteps(schedulers[s], num_inference_steps, device, timesteps)

        # 5. One initial latent per image, shared by both streams.
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)
        latents = latents.to(device, embeds.dtype) * schedulers[streams[0]].init_noise_sigma
        x = {s: latents.clone() for s in streams}

        # 6. The batch of a step: which streams and polarities it carries, and their per-row inputs.
        start, end = (f * num_inference_steps for f in mix_window)
        rows_cache: dict[_Layout, dict] = {}

        def rows_of(layout: _Layout) -> dict:
            if layout not in rows_cache:
                rows = {
                    "prompt": layout.per_row({"uncond": neg_embeds, "cond": embeds}),
                    "pooled": layout.per_row({"uncond": neg_pooled, "cond": pooled}),
                    "id_rows": None, "text_rows": None, "other_rows": None, "tokens": None,
                }
                rows["time_ids"] = time_ids.repeat(rows["prompt"].shape[0], 1)
                if "id" in layout.streams:
                    rows["id_rows"] = layout.rows("id", device)
                    rows["tokens"] = torch.cat([tokens[p] for p in layout.polarities])
                    # The rows outside the identity stream are the text stream's (none for the adapter).
                    text = layout.rows("text", device) if "text" in layout.streams else None
                    rows["text_rows"] = text
                    rows["other_rows"] = text if text is not None else rows["id_rows"][:0]
                rows_cache[layout] = rows
            return rows_cache[layout]

        # 7. Denoise: one UNet call per step carries every active stream and polarity.
        out_stream = "id" if "id" in streams else "text"
        ip_cache: dict = {}  # identity keys/values per layer, projected once for this call
        for i, t in enumerate(ts):
            active = streams
            if not return_text_images and len(streams) == 2 and i >= end:
                active = ("id",)  # past the mixing window nothing reads the text stream any more
            polarities = ("uncond", "cond") if cfg and i < cfg_cutoff * num_inference_steps else ("cond",)
            layout = _Layout(active, polarities, batch)
            rows = rows_of(layout)
            call = None
            if rows["id_rows"] is not None:
                call = IDCall(
                    id_rows=rows["id_rows"], id_tokens=rows["tokens"], text_rows=rows["text_rows"], id_scale=id_scale,
                    semantic_scale=semantic_scale, style_strength=style_strength, mixing=start <= i < end,
                    mix_layers=mix_layers, adain_cross=adain_cross, other_rows=rows["other_rows"], ip_cache=ip_cache,
                )
            scaled = torch.cat([schedulers[s].scale_model_input(x[s], t) for s in active])
            noise = self.unet(
                torch.cat([scaled] * len(polarities)), t, encoder_hidden_states=rows["prompt"],
                cross_attention_kwargs=None if call is None else {"id_call": call},
                added_cond_kwargs={"text_embeds": rows["pooled"], "time_ids": rows["time_ids"]}, return_dict=False,
            )[0]
            noise = noise.view(len(polarities), len(active), batch, *noise.shape[1:])
            guided = noise[0] + guidance_scale * (noise[1] - noise[0]) if len(polarities) == 2 else noise[0]
            for j, s in enumerate(active):
                x[s] = schedulers[s].step(guided[j], t, x[s], return_dict=False)[0]

            if callback_on_step_end is not None:
                values = {"latents": x[out_stream], "text_latents": x.get("text")}
                callback_kwargs = {k: values[k] for k in callback_on_step_end_tensor_inputs if k in values}
                result = callback_on_step_end(self, i, t, callback_kwargs) or {}
                if "latents" in result:
                    x[out_stream] = result["latents"]

        # 8. Decode.
        images = self._decode(x[out_stream], output_type)
        text_images = None
        if method == "infinite-id" and return_text_images:
            text_images = self._decode(x["text"], output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, text_images
        return InfiniteIDPipelineOutput(images=images, text_images=text_images)

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
