"""The LoRA that IP-Adapter-FaceID files carry on every attention layer, and LoRAs fused into the UNet."""

from __future__ import annotations

import torch

from ..method.attention import attention_layers, check_installed

LORA_PARTS = (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"), ("to_out.0", "to_out_lora"))


def adapter_lora_state_dict(unet, ip_adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA inside an IP-Adapter-FaceID file, in diffusers' PEFT key format (``unet.<module>.lora_A.weight``).

    IP-Adapter's LoRALinearLayer has no alpha, i.e. a scale of 1: PEFT's default when no alpha is given.
    """
    state = {}
    for i, (name, _) in enumerate(attention_layers(unet)):
        module = name.removesuffix(".processor")
        for ours, theirs in LORA_PARTS:
            state[f"unet.{module}.{ours}.lora_A.weight"] = ip_adapter[f"{i}.{theirs}.down.weight"]
            state[f"unet.{module}.{ours}.lora_B.weight"] = ip_adapter[f"{i}.{theirs}.up.weight"]
    return state


def apply_unet_lora(pipe, lora, adapter_name: str, scale: float = 1.0) -> None:
    """Load a LoRA (a path or a state dict) into the UNet with diffusers, fuse it at ``scale`` and drop the LoRA
    layers, so inference pays nothing extra. It acts on both streams. Our attention processors stay installed: the
    LoRA wraps ``to_q``/``to_k``/``to_v``/``to_out`` linears, which the processors call."""
    pipe.load_lora_weights(lora, adapter_name=adapter_name)
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=scale, adapter_names=[adapter_name])
    pipe.unload_lora_weights()
    check_installed(pipe.unet)
