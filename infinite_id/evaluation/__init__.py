"""``python -m infinite_id evaluate``: CLIP-T, CLIP-I and face similarity per method; tables and grids.
"""

from .._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "ClipScorer": ".run",
    "EvalPrompt": ".run",
    "EvaluationSummary": ".run",
    "FaceNetEmbedder": ".run",
    "ImageRecord": ".run",
    "MethodSummary": ".run",
    "Subject": ".run",
    "build_parser": ".run",
    "clip_image_score": ".run",
    "clip_text_score": ".run",
    "cosine_scores": ".run",
    "evaluate": ".run",
    "face_score": ".run",
    "find_subjects": ".run",
    "largest_face": ".run",
    "load_prompts": ".run",
    "main": ".run",
    "markdown_table": ".run",
    "read_classes": ".run",
    "summarize": ".run",
    "tiny_clip_scorer": ".run",
    "DiffusersReference": ".reference",
    "build_reference": ".reference",
    "Setting": ".verify",
    "verify_weights": ".verify",
})
