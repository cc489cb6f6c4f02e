"""The identity inputs of a call: photos -> identity features -> identity tokens and the null identity.

A mixin of ``InfiniteIDPipeline`` (diffusers' habit of one mixin per feature). It reads the pipeline's
``face_analyzer``, ``feature_extractor``, ``image_encoder`` and ``id_encoder``; it stores nothing per call.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from .id_encoder import IdentityFeatures
from .ops import average_identity

CLIP_CHANNEL_ORDERS = ("rgb", "bgr")


def clip_channel_order_for(encoder, requested: str | None = None) -> str:
    """The channel order of the CLIP crop: ``requested`` ("rgb"/"bgr"), or the encoder's own when None.

    Each encoder says which order its adapter was trained and published with (``encoder.clip_channel_order``:
    IP-Adapter-FaceID-PlusV2's reference usage hands CLIP the crop in OpenCV's BGR order; see docs/weights.md).
    """
    if requested is None or str(requested).strip() == "":
        return getattr(encoder, "clip_channel_order", "rgb")
    order = str(requested).strip().lower()
    if order not in CLIP_CHANNEL_ORDERS:
        raise ValueError(f"clip_channel_order must be 'rgb' or 'bgr' (or None for the adapter's own), got {requested!r}.")
    return order


def swap_red_blue(image: PIL.Image.Image) -> PIL.Image.Image:
    """The same pixels with the first and last channel swapped: what an OpenCV (BGR) array looks like to a
    processor that reads channels in order."""
    r, g, b = image.convert("RGB").split()
    return PIL.Image.merge("RGB", (b, g, r))


class IdentityInputsMixin:
    """``encode_identity`` (public: compute once, reuse as ``id_embeds``) and the per-call token layout."""

    @torch.no_grad()
    def encode_identity(self, id_image, clip_channel_order: str | None = None) -> IdentityFeatures:
        """Photo(s) of one person -> raw identity features, averaged over the photos.

        ``id_image``: a photo (anything ``load_image`` takes), a face already picked from ``face_analyzer``
        (a FaceResult), or a list of those, all of the *same* person. Pass the result as ``id_embeds`` to reuse it.
        ``clip_channel_order``: "rgb" or "bgr", the order the CLIP crop is handed to the image processor in; None
        uses the order the adapter was trained and published with (``id_encoder.clip_channel_order``).
        """
        encoder = self._require_encoder()
        order = clip_channel_order_for(encoder, clip_channel_order)
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
            if order == "bgr":
                crops = [swap_red_blue(c) for c in crops]
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

    def _id_tokens(self, id_image, id_embeds, batch: int, images_per_prompt: int,
                   clip_channel_order: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity tokens ``[batch, N, D]`` for the conditional rows, and the null identity of the same shape."""
        encoder = self._require_encoder()
        if id_embeds is None:
            if id_image is None:
                raise ValueError("This method needs the person's photo: pass id_image (or precomputed id_embeds).")
            id_embeds = self.encode_identity(id_image, clip_channel_order)
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
