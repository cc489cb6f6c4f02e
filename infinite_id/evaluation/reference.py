"""The public adapter alone, run by diffusers' own implementation: the reference our identity stream must reach.

``build_reference(pipe, adapter_file)`` makes a plain diffusers ``StableDiffusionXLPipeline`` on the same
components as an ``InfiniteIDPipeline`` (the same VAE, text encoders, scheduler config and CLIP image encoder; a
copy of the UNet with diffusers' stock attention processors) and loads the adapter file into it with diffusers'
``load_ip_adapter``, which also loads an IP-Adapter-FaceID file's LoRA onto the whole UNet through PEFT. The call
follows diffusers' documented usage of each adapter:

* FaceID-Plus(V2): ``ip_adapter_image_embeds`` = ``[zeros ; normed ArcFace embedding]``; the CLIP embeddings of the
  aligned crop from ``prepare_ip_adapter_image_embeds``, set on the projection layer with ``shortcut`` (V2) and
  ``shortcut_scale`` (our ``s_scale``). The crop is handed over as the BGR array OpenCV gives, as in diffusers'
  FaceID-Plus example and the authors' README (docs/weights.md).
* Plus-Face: ``ip_adapter_image`` = the face crop (RGB), encoded by diffusers itself (null image: zero pixels).
* InstantID's adapter: ``ip_adapter_image_embeds`` = ``[zeros ; raw ArcFace embedding]`` as one token.

Used by the parity tests (tests/test_parity.py) and ``verify-weights``. It changes nothing on ``pipe``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FACEID_LORA = "faceid_0"  # the adapter name diffusers' load_ip_adapter gives the first FaceID LoRA


@dataclass
class DiffusersReference:
    """diffusers' SDXL pipeline with one identity adapter loaded by ``load_ip_adapter``."""

    pipe: object  # diffusers.StableDiffusionXLPipeline
    kind: str  # the adapter kind of our encoder: faceid-plusv2, plus-face or instantid
    has_lora: bool  # diffusers loaded a FaceID LoRA (PEFT adapter FACEID_LORA)

    @torch.no_grad()
    def __call__(self, prompt, face, *, id_scale: float = 1.0, lora_scale: float = 1.0, s_scale: float = 1.0,
                 num_images_per_prompt: int = 1, **kwargs):
        """One diffusers call for ``face`` (a FaceResult: ``embedding``, ``clip_crop``, ``embedding_norm``).

        ``kwargs`` go to the pipeline (``num_inference_steps``, ``guidance_scale``, ``generator``, ``height``,
        ``width``, ``negative_prompt``, ``output_type``). The scales are set on the reference pipeline first, through
        diffusers' own setters (``set_ip_adapter_scale``, ``set_adapters``)."""
        ref = self.pipe
        ref.set_ip_adapter_scale(id_scale)
        if self.has_lora:
            ref.set_adapters([FACEID_LORA], adapter_weights=[lora_scale])
        device, dtype = ref._execution_device, ref.unet.dtype
        n = num_images_per_prompt
        if self.kind == "plus-face":
            return ref(prompt, ip_adapter_image=[face.clip_crop.convert("RGB")], num_images_per_prompt=n, **kwargs)
        embedding = torch.tensor(np.array(face.embedding, dtype=np.float32))[None]
        if self.kind == "instantid":
            raw = embedding * float(getattr(face, "embedding_norm", 1.0))
            embeds = torch.cat([torch.zeros_like(raw), raw])[:, None, None].to(device, dtype)  # [2, 1 image, 1 token]
            return ref(prompt, ip_adapter_image_embeds=[embeds], num_images_per_prompt=n, **kwargs)
        if self.kind != "faceid-plusv2":
            raise ValueError(f"There is no diffusers reference for {self.kind!r} adapters.")
        bgr = np.ascontiguousarray(np.asarray(face.clip_crop.convert("RGB"))[:, :, ::-1])
        clip_embeds = ref.prepare_ip_adapter_image_embeds([[bgr]], None, device, n, True)[0]
        layer = ref.unet.encoder_hid_proj.image_projection_layers[0]
        layer.clip_embeds, layer.shortcut, layer.shortcut_scale = clip_embeds.to(dtype), True, float(s_scale)
        embeds = torch.cat([torch.zeros_like(embedding), embedding])[:, None].to(device, dtype)  # [2, 1 image, 512]
        return ref(prompt, ip_adapter_image_embeds=[embeds], num_images_per_prompt=n, **kwargs)


def build_reference(pipe, adapter_file: str | Path, device: torch.device | None = None) -> DiffusersReference:
    """diffusers' ``StableDiffusionXLPipeline`` on ``pipe``'s components with ``adapter_file`` loaded by
    ``load_ip_adapter`` (from its local folder; nothing is downloaded). The UNet is a copy: diffusers' loader
    changes the UNet it loads into. ``device``: where the copy works (the copy is made where ``pipe.unet`` is,
    which may be the CPU while the reference runs; ``verify-weights`` parks it there)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    kind = getattr(pipe.id_encoder, "kind", None)
    if kind not in ("faceid-plusv2", "plus-face", "instantid"):
        raise ValueError(f"The loaded identity branch is {kind!r}; a diffusers reference exists for the public "
                         "adapters only (faceid-plusv2, plus-face, instantid).")
    path = Path(adapter_file)
    if not path.is_file():
        raise ValueError(f"The adapter file {path.name} is not here, so the diffusers reference cannot load it.")
    unet = copy.deepcopy(pipe.unet)
    unet.set_attn_processor(AttnProcessor2_0())  # diffusers' stock processors; ours (and their weights) are dropped
    needs_clip = getattr(pipe.id_encoder, "needs_clip", False)
    ref = StableDiffusionXLPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2, unet=unet, scheduler=copy.deepcopy(pipe.scheduler),
        image_encoder=pipe.image_encoder if needs_clip else None,
        feature_extractor=pipe.feature_extractor if needs_clip else None,
        force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt, add_watermarker=False,
    )
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None,
                        local_files_only=True)
    if device is not None:
        ref.unet.to(device)  # with the adapter's projection and LoRA layers diffusers added to it
    has_lora = FACEID_LORA in (getattr(ref.unet, "peft_config", None) or {})
    return DiffusersReference(ref, kind, has_lora)
