"""Public identity adapters (IP-Adapter-FaceID-PlusV2, IP-Adapter-Plus-Face, InstantID) as identity branches:
their projection models and conversion on load (their LoRA runs in ``method.id_lora``), and LoRAs fused into the
whole UNet (fast mode). Builds on ``method``.
"""

from .._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "ConvertedAdapter": ".convert",
    "check_adapter_layers": ".convert",
    "convert_adapter": ".convert",
    "expected_layer_state": ".convert",
    "load_adapter": ".convert",
    "read_state_dict": ".convert",
    "split_adapter_state": ".convert",
    "AdapterInfo": ".encoders",
    "FaceIDPlusEncoder": ".encoders",
    "FaceIDPlusProjection": ".encoders",
    "InstantIDEncoder": ".encoders",
    "PlusFaceEncoder": ".encoders",
    "PublicEncoder": ".encoders",
    "adapter_info": ".encoders",
    "build_encoder": ".encoders",
    "detect_kind": ".encoders",
    "apply_unet_lora": ".lora",
    "FacePerceiverResampler": ".resampler",
    "PerceiverAttention": ".resampler",
    "Resampler": ".resampler",
    "feed_forward": ".resampler",
})
