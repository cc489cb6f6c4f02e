"""The key names and shapes of the public identity-adapter files, written down from the published architectures.

Sources: tencent-ailab/IP-Adapter ``ip_adapter/resampler.py`` (Resampler, PerceiverAttention, FeedForward),
``ip_adapter/ip_adapter_faceid.py`` (ProjPlusModel, FacePerceiverResampler, LoRA rank 128 on every attention
processor), ``ip_adapter/ip_adapter.py`` (IPAdapterPlusXL: Resampler dim 1280, 20 heads, 16 queries, ViT-H input),
InstantX/InstantID ``pipeline_stable_diffusion_xl_instantid.py`` (Resampler dim 1280, 20 heads, 16 queries,
512-d ArcFace input, output = UNet cross-attention dim), and diffusers' ``_convert_ip_adapter_image_proj_to_diffusers``
/ ``_convert_ip_adapter_attn_to_diffusers`` / ``_load_ip_adapter_loras`` (which read the same keys).

Every function takes the sizes as arguments with the published SDXL values as defaults, so the same spec builds
the SDXL-sized dict (shapes only: zero-stride tensors, no memory) and the tiny one the forward tests run.
"""

from __future__ import annotations

import torch

Spec = dict[str, tuple[int, ...]]

# SDXL base: 70 cross-attention layers (transformer blocks) in unet.attn_processors order, which is
# down_blocks, up_blocks, mid_block (the order UNet2DConditionModel registers them). Each block has attn1 then
# attn2, so layer j's attn1 is processor 2j and its attn2 (the IP-Adapter key number) is 2j + 1.
SDXL_HIDDEN = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10
SDXL_CONTEXT = 2048
# SD 1.5: 16 cross-attention layers with 768-d context.
SD15_HIDDEN = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
SD15_CONTEXT = 768

SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def perceiver_layers(prefix: str, dim: int, depth: int = 4, ff_mult: int = 4) -> Spec:
    """``{prefix}layers.{i}.0`` PerceiverAttention (64-d heads, inner width = dim), ``.1`` FeedForward."""
    spec: Spec = {}
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        for norm in ("norm1", "norm2"):
            spec[f"{p}0.{norm}.weight"] = (dim,)
            spec[f"{p}0.{norm}.bias"] = (dim,)
        spec[f"{p}0.to_q.weight"] = (dim, dim)
        spec[f"{p}0.to_kv.weight"] = (2 * dim, dim)
        spec[f"{p}0.to_out.weight"] = (dim, dim)
        spec[f"{p}1.0.weight"] = (dim,)
        spec[f"{p}1.0.bias"] = (dim,)
        spec[f"{p}1.1.weight"] = (dim * ff_mult, dim)
        spec[f"{p}1.3.weight"] = (dim, dim * ff_mult)
    return spec


def faceid_plusv2_image_proj(cross: int = 2048, clip_dim: int = 1280, face_dim: int = 512, tokens: int = 4) -> Spec:
    """ProjModelFaceIdPlus: ArcFace MLP 512 -> 1024 -> GELU -> 4 x 2048, LayerNorm, perceiver (width 2048, 32
    heads) reading 1280-d CLIP ViT-H hidden states."""
    spec: Spec = {
        "proj.0.weight": (2 * face_dim, face_dim),
        "proj.0.bias": (2 * face_dim,),
        "proj.2.weight": (cross * tokens, 2 * face_dim),
        "proj.2.bias": (cross * tokens,),
        "norm.weight": (cross,),
        "norm.bias": (cross,),
        "perceiver_resampler.proj_in.weight": (cross, clip_dim),
        "perceiver_resampler.proj_in.bias": (cross,),
        "perceiver_resampler.proj_out.weight": (cross, cross),
        "perceiver_resampler.proj_out.bias": (cross,),
        "perceiver_resampler.norm_out.weight": (cross,),
        "perceiver_resampler.norm_out.bias": (cross,),
    }
    spec.update(perceiver_layers("perceiver_resampler.", cross))
    return spec


def resampler_image_proj(in_dim: int = 1280, dim: int = 1280, queries: int = 16, out: int = 2048) -> Spec:
    """Resampler (IP-Adapter-Plus-Face SDXL: in_dim 1280 CLIP; InstantID: in_dim 512 ArcFace)."""
    spec: Spec = {
        "latents": (1, queries, dim),
        "proj_in.weight": (dim, in_dim),
        "proj_in.bias": (dim,),
        "proj_out.weight": (out, dim),
        "proj_out.bias": (out,),
        "norm_out.weight": (out,),
        "norm_out.bias": (out,),
    }
    spec.update(perceiver_layers("", dim))
    return spec


def ip_adapter_layers(hidden: list[int], context: int, lora_rank: int | None = None) -> Spec:
    """Per-layer image K/V (``{2j+1}.to_k_ip.weight [hidden, context]``) and, for FaceID files, the LoRA of every
    attention processor: ``{n}.to_{q,k,v,out}_lora.down.weight [rank, in]`` / ``.up.weight [out, rank]``."""
    spec: Spec = {}
    for j, h in enumerate(hidden):
        spec[f"{2 * j + 1}.to_k_ip.weight"] = (h, context)
        spec[f"{2 * j + 1}.to_v_ip.weight"] = (h, context)
        if lora_rank:
            for n, kv_in in ((2 * j, h), (2 * j + 1, context)):  # attn1 reads itself, attn2 the text context
                for part, in_dim in (("to_q", h), ("to_k", kv_in), ("to_v", kv_in), ("to_out", h)):
                    spec[f"{n}.{part}_lora.down.weight"] = (lora_rank, in_dim)
                    spec[f"{n}.{part}_lora.up.weight"] = (h, lora_rank)
    return spec


def sdxl_file(kind: str) -> Spec:
    """The flattened key -> shape map of each public SDXL file."""
    if kind == "faceid-plusv2":
        image_proj, layers = faceid_plusv2_image_proj(), ip_adapter_layers(SDXL_HIDDEN, SDXL_CONTEXT, lora_rank=128)
    elif kind == "plus-face":
        image_proj, layers = resampler_image_proj(in_dim=1280), ip_adapter_layers(SDXL_HIDDEN, SDXL_CONTEXT)
    elif kind == "instantid":
        image_proj, layers = resampler_image_proj(in_dim=512), ip_adapter_layers(SDXL_HIDDEN, SDXL_CONTEXT)
    else:
        raise ValueError(kind)
    return {**{f"image_proj.{k}": v for k, v in image_proj.items()}, **{f"ip_adapter.{k}": v for k, v in layers.items()}}


def shapes_only(spec: Spec) -> dict[str, torch.Tensor]:
    """Zero-stride zero tensors of the right shapes: an SDXL-sized state dict that costs no memory."""
    zero = torch.zeros(())
    return {k: zero.expand(shape) for k, shape in spec.items()}


def random_tensors(spec: Spec, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Small random weights (LayerNorm weights near 1) so a tiny adapter computes something non-trivial."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in spec.items():
        t = torch.randn(shape, generator=g) * scale
        if ("norm" in key or key.endswith(".1.0.weight")) and key.endswith("weight") and len(shape) == 1:
            t = t + 1.0
        out[key] = t
    return out


def nested(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The ``.bin`` layout: ``{"image_proj": {...}, "ip_adapter": {...}}``."""
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        out[head][rest] = value
    return out
