"""``python -m infinite_id evaluate``: CLIP-T, CLIP-I and face similarity per method; tables and grids.

``metrics`` (the scores and the scoring models) and ``subjects`` (identities, class words, prompts) know nothing of
runs; ``report`` (records, summaries, the table, CSV, JSON, the grid) builds on both; ``run`` (``evaluate``,
the loop) uses all three; ``cli`` (the parser and ``main``) sits on top.
"""

from .._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "main": ".cli",
    "build_parser": ".cli",
    "DEFAULT_CLIP_MODEL": ".metrics",
    "SCALE": ".metrics",
    "ClipScorer": ".metrics",
    "FaceNetEmbedder": ".metrics",
    "clip_image_score": ".metrics",
    "clip_text_score": ".metrics",
    "cosine_scores": ".metrics",
    "face_score": ".metrics",
    "largest_face": ".metrics",
    "tiny_clip_scorer": ".metrics",
    "CONVENTIONS": ".report",
    "OUTPUTS": ".report",
    "EvaluationSummary": ".report",
    "ImageRecord": ".report",
    "MethodSummary": ".report",
    "draw_grid": ".report",
    "markdown_table": ".report",
    "record_writer": ".report",
    "summarize": ".report",
    "write_report": ".report",
    "write_summary_csv": ".report",
    "DEFAULT_METHODS": ".run",
    "DEFAULT_SEEDS": ".run",
    "evaluate": ".run",
    "CLASSES_FILE": ".subjects",
    "DEFAULT_CLASS": ".subjects",
    "EvalPrompt": ".subjects",
    "Subject": ".subjects",
    "find_subjects": ".subjects",
    "load_prompts": ".subjects",
    "read_classes": ".subjects",
    "DiffusersReference": ".reference",
    "build_reference": ".reference",
    "Setting": ".verify",
    "verify_weights": ".verify",
})
