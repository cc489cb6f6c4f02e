"""LoRAs fused into the whole UNet (fast mode's step-distilled LoRAs). The FaceID adapters' own LoRA is not fused:
it runs inside the attention processors on the identity stream only (``method.id_lora``)."""

from __future__ import annotations

from ..method.attention import check_installed


def apply_unet_lora(pipe, lora, adapter_name: str, scale: float = 1.0) -> None:
    """Load a LoRA (a path or a state dict) into the UNet with diffusers, fuse it at ``scale`` and drop the LoRA
    layers, so inference pays nothing extra. It acts on both streams. Our attention processors stay installed: the
    LoRA wraps ``to_q``/``to_k``/``to_v``/``to_out`` linears, which the processors call."""
    pipe.load_lora_weights(lora, adapter_name=adapter_name)
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=scale, adapter_names=[adapter_name])
    pipe.unload_lora_weights()
    check_installed(pipe.unet)
