"""Infinite-ID: identity-preserved personalization via ID-semantics decoupling, on diffusers SDXL.

Names are imported on first use (PEP 562), so ``import infinite_id`` and light commands (``download``, the
start-up check) do not pay for torch, diffusers and transformers imports they do not need.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "IDCall": "attention",
    "IDCrossAttnProcessor": "attention",
    "MixedSelfAttnProcessor": "attention",
    "install_id_processors": "attention",
    "FaceAnalyzer": "face",
    "FaceError": "face",
    "FaceResult": "face",
    "NoFaceError": "face",
    "face_similarity": "face",
    "CLIPMapper": "id_encoder",
    "FaceMapper": "id_encoder",
    "IdentityFeatures": "id_encoder",
    "InfiniteIDEncoder": "id_encoder",
    "load_pipeline": "loading",
    "adain_mean": "ops",
    "average_identity": "ops",
    "interpolate_identities": "ops",
    "stack_identities": "ops",
    "InfiniteIDPipeline": "pipeline",
    "InfiniteIDPipelineOutput": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'infinite_id' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
