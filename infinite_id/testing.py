"""Tiny real components, built offline in seconds: for tests, benchmarks and the app's engine check.

Everything here is the real class (diffusers UNet/VAE/scheduler, transformers CLIP text and vision models and
tokenizer, our ID encoder and processors) at tiny sizes with seeded random weights. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .method.id_encoder import InfiniteIDEncoder
from .method.pipeline import InfiniteIDPipeline

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tiny-clip-tokenizer"

# Tiny sizes. The UNet keeps SDXL's structure (text_time added conditions, two text encoders whose hidden states
# are concatenated into the cross-attention context, a down/up path with cross-attention transformer blocks).
TEXT_DIM = 32  # each text encoder's hidden size; cross-attention dim = 2 * TEXT_DIM
CROSS_DIM = 2 * TEXT_DIM
VISION_DIM = 32
VISION_IMAGE = 32
VISION_PATCH = 8  # (32 / 8)^2 + 1 = 17 CLIP tokens
FACE_DIM = 512  # ArcFace embeddings keep their real size: the tiny face pack outputs 512-d vectors


def tiny_scheduler() -> DDIMScheduler:
    """DDIM configured as SDXL's (the paper samples with DDIM)."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )


def tiny_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
        cross_attention_dim=CROSS_DIM,
        norm_num_groups=8,
    )


def tiny_vae() -> AutoencoderKL:
    vae = AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=4.0,  # random encoder means have std ~0.25: scale latents to unit variance like SDXL's
        force_upcast=False,
    )
    # A trained VAE's posterior is nearly deterministic; a random one has std ~1, which would drown the image in
    # sampling noise during training. Pin the log-variance channels of quant_conv low.
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:] = 0
        vae.quant_conv.bias[half:] = -12.0
    return vae


def _text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_size=TEXT_DIM, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=vocab_size, hidden_act="gelu", projection_dim=TEXT_DIM,
    )


def tiny_image_encoder() -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessorPil]:
    config = CLIPVisionConfig(
        hidden_size=VISION_DIM, image_size=VISION_IMAGE, patch_size=VISION_PATCH, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=37, projection_dim=VISION_DIM,
    )
    processor = CLIPImageProcessorPil(size={"shortest_edge": VISION_IMAGE}, crop_size=VISION_IMAGE)
    return CLIPVisionModelWithProjection(config), processor


def tiny_id_encoder() -> InfiniteIDEncoder:
    tokens = (VISION_IMAGE // VISION_PATCH) ** 2 + 1
    return InfiniteIDEncoder(
        face_dim=FACE_DIM, clip_dim=VISION_DIM, clip_tokens=tokens, cross_attention_dim=CROSS_DIM, face_tokens=4,
        face_hidden_dim=64,
    )


def tiny_face_analyzer(seed: int = 0, **kwargs):
    """The face stack on a synthetic ONNX pack, run through insightface's own code (see ``tiny_face``)."""
    from .faces.tiny_pack import tiny_face_analyzer as build

    return build(seed, **kwargs)


def tiny_pipeline(seed: int = 0, face_analyzer="tiny") -> InfiniteIDPipeline:
    """A tiny InfiniteIDPipeline with seeded random weights, fully offline. Default size 64x64 px.

    ``face_analyzer="tiny"`` attaches the synthetic-pack face stack, so ``id_image`` works as in the real
    pipeline (photos from ``tiny_face.synthetic_face_photo`` have faces it finds); pass None for none.
    """
    if isinstance(face_analyzer, str) and face_analyzer == "tiny":
        face_analyzer = tiny_face_analyzer()
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    unet = tiny_unet()
    vae = tiny_vae()
    text_encoder = CLIPTextModel(_text_config(vocab))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab))
    image_encoder, feature_extractor = tiny_image_encoder()
    id_encoder = tiny_id_encoder()
    pipe = InfiniteIDPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=tiny_scheduler(), image_encoder=image_encoder,
        feature_extractor=feature_extractor, id_encoder=id_encoder, face_analyzer=face_analyzer,
    )
    # The processors' image K/V projections are created after the UNet: seed them too, with a scale that makes the
    # identity branch visible in tiny outputs (real weights come from a checkpoint).
    gen = torch.Generator().manual_seed(seed + 1)
    for proc in pipe.unet.attn_processors.values():
        for lin in (getattr(proc, "to_k_ip", None), getattr(proc, "to_v_ip", None)):
            if lin is not None:
                lin.weight.data = torch.randn(lin.weight.shape, generator=gen) * 0.5
    pipe.set_progress_bar_config(disable=True)
    return pipe
