"""Infinite-ID: identity-preserved personalization via ID-semantics decoupling, on diffusers SDXL."""

from .attention import IDCall, IDCrossAttnProcessor, MixedSelfAttnProcessor, install_id_processors
from .face import FaceAnalyzer, FaceError, FaceResult, NoFaceError, face_similarity
from .id_encoder import CLIPMapper, FaceMapper, IdentityFeatures, InfiniteIDEncoder
from .ops import adain_mean, average_identity, interpolate_identities, stack_identities
from .pipeline import InfiniteIDPipeline, InfiniteIDPipelineOutput

__all__ = [
    "CLIPMapper",
    "FaceAnalyzer",
    "FaceError",
    "FaceResult",
    "NoFaceError",
    "face_similarity",
    "FaceMapper",
    "IDCall",
    "IDCrossAttnProcessor",
    "IdentityFeatures",
    "InfiniteIDEncoder",
    "InfiniteIDPipeline",
    "InfiniteIDPipelineOutput",
    "MixedSelfAttnProcessor",
    "adain_mean",
    "average_identity",
    "install_id_processors",
    "interpolate_identities",
    "stack_identities",
]
