"""Infinite-ID: identity-preserved personalization via ID-semantics decoupling, on diffusers SDXL.

The package is cut into layers (docs/architecture.md): ``method`` (the paper), ``adapters`` (public identity
adapters), ``faces``, ``models`` (weights and pipeline building), ``service`` (what the app, CLI and API share),
``ui`` (Gradio), ``training`` and ``evaluation``. The names below are the documented surface; they are imported on
first use, so ``import infinite_id`` stays light.
"""

import logging

from ._lazy import lazy_exports


def _without_torchvision_notice(record: logging.LogRecord) -> bool:
    # Without torchvision, transformers serves its PIL image processors and says so at every start (diffusers
    # imports CLIPImageProcessor). The PIL one is what the adapters' reference code used, and torchvision is not a
    # dependency here, so the notice only misleads: "install torchvision" is not a fix for anything.
    return "requires torchvision (not installed); falling back to" not in record.getMessage()


# A filter on transformers' logger by name: nothing of transformers is imported for it.
logging.getLogger("transformers.utils.import_utils").addFilter(_without_torchvision_notice)

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "IDCall": ".method.attention",
    "IDCrossAttnProcessor": ".method.attention",
    "MixedSelfAttnProcessor": ".method.attention",
    "install_id_processors": ".method.attention",
    "CLIPMapper": ".method.id_encoder",
    "FaceMapper": ".method.id_encoder",
    "IdentityFeatures": ".method.id_encoder",
    "InfiniteIDEncoder": ".method.id_encoder",
    "adain_mean": ".method.ops",
    "average_identity": ".method.ops",
    "interpolate_identities": ".method.ops",
    "stack_identities": ".method.ops",
    "InfiniteIDPipeline": ".method.pipeline",
    "InfiniteIDPipelineOutput": ".method.pipeline",
    "FaceAnalyzer": ".faces.analyzer",
    "FaceError": ".faces.analyzer",
    "FaceResult": ".faces.analyzer",
    "NoFaceError": ".faces.analyzer",
    "face_similarity": ".faces.analyzer",
    "load_pipeline": ".models.loading",
})
