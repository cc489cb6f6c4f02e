"""Tiny public adapter files for the tiny engine: each public format (FaceID-PlusV2 with its LoRA, Plus-Face,
InstantID) at the tiny UNet's sizes, with seeded random weights, written as the published ``.bin`` layout and
loaded by the real converter. ``load_engine("tiny", adapter=...)`` and ``verify-weights --engine tiny`` use them,
so the adapters' whole code path (conversion, identity LoRA, CLIP channel order, diffusers' reference) runs offline
in seconds. The published key names are proven separately (tests/test_adapters.py, tests/test_parity.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters.convert import expected_layer_state, load_adapter
from ..adapters.encoders import FaceIDPlusEncoder, InstantIDEncoder, PlusFaceEncoder, adapter_info

TINY_LORA_RANK = 4


def tiny_adapter_state(pipe, kind: str, seed: int = 0, lora_rank: int | None = TINY_LORA_RANK) -> dict:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` of a tiny ``kind`` adapter for ``pipe``'s UNet (a LoRA only for
    FaceID-PlusV2, as published)."""
    kind = adapter_info(kind).name
    cross = pipe.unet.config.cross_attention_dim
    clip_dim = pipe.image_encoder.config.hidden_size if pipe.image_encoder is not None else 32
    clip_tokens = (pipe.image_encoder.config.image_size // pipe.image_encoder.config.patch_size) ** 2 + 1 \
        if pipe.image_encoder is not None else 257
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's random stream
        torch.manual_seed(seed)
        if kind == "faceid-plusv2":
            encoder = FaceIDPlusEncoder(clip_dim=clip_dim, cross_attention_dim=cross, clip_tokens=clip_tokens)
        elif kind == "plus-face":
            encoder, lora_rank = PlusFaceEncoder(clip_dim=clip_dim, dim=64, cross_attention_dim=cross,
                                                 clip_tokens=clip_tokens), None
        elif kind == "instantid":
            encoder, lora_rank = InstantIDEncoder(dim=64, cross_attention_dim=cross), None
        else:
            raise ValueError(f"There is no tiny {kind} adapter; choose faceid-plusv2, plus-face or instantid.")
        g = torch.Generator().manual_seed(seed + 1)
        layers = {}
        for key, meta in expected_layer_state(pipe.unet, lora_rank).items():
            # Visible in tiny outputs: image K/V like tiny_pipeline's, a LoRA strong enough to move the images.
            layers[key] = torch.randn(meta.shape, generator=g) * (0.5 if "_ip." in key else 0.2)
    return {"image_proj": {k: v.detach().clone() for k, v in encoder.image_proj.state_dict().items()},
            "ip_adapter": layers}


def load_tiny_adapter(pipe, kind: str, folder: str | Path, seed: int = 0) -> dict[str, str]:
    """Write the tiny ``kind`` adapter into ``folder`` and load it into ``pipe`` with ``load_adapter``; the file's
    path becomes ``pipe.adapter_file`` (as ``load_pipeline`` records it). Returns ``load_adapter``'s summary."""
    kind = adapter_info(kind).name
    path = Path(folder) / f"tiny-{kind}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_adapter_state(pipe, kind, seed), path)
    info = load_adapter(pipe, path, kind)
    pipe.adapter_file = path
    return info
