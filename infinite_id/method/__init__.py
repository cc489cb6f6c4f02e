"""The paper (DESIGN 2): AdaIN-mean and identity ops, the ID encoder, the attention processors, the
two-stream InfiniteIDPipeline and the native checkpoint format. Depends on nothing else in the package but
``config`` and ``images``.
"""

from .._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "IDCall": ".attention",
    "IDCrossAttnProcessor": ".attention",
    "MixedSelfAttnProcessor": ".attention",
    "attention_layers": ".attention",
    "check_installed": ".attention",
    "id_adapter_layers": ".attention",
    "install_id_processors": ".attention",
    "set_attention_backend": ".attention",
    "AttentionBackendError": ".backends",
    "merge_partials": ".backends",
    "resolve_backend": ".backends",
    "check_state_dict": ".checkpoint",
    "encoder_from_metadata": ".checkpoint",
    "identity_state_dict": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "read_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "CLIPMapper": ".id_encoder",
    "FaceMapper": ".id_encoder",
    "IdentityFeatures": ".id_encoder",
    "InfiniteIDEncoder": ".id_encoder",
    "IdentityLoRA": ".id_lora",
    "LORA_SCALE_RANGE": ".id_lora",
    "check_lora_state": ".id_lora",
    "id_lora_state_dict": ".id_lora",
    "install_id_lora": ".id_lora",
    "lora_rank": ".id_lora",
    "remove_id_lora": ".id_lora",
    "CLIP_CHANNEL_ORDERS": ".identity_inputs",
    "clip_channel_order_for": ".identity_inputs",
    "adain_mean": ".ops",
    "average_identity": ".ops",
    "interpolate_identities": ".ops",
    "stack_identities": ".ops",
    "InfiniteIDPipeline": ".pipeline",
    "InfiniteIDPipelineOutput": ".pipeline",
})
