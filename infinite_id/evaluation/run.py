"""The evaluation loop: for every identity (one reference photo each), prompt and seed, each method ("text",
"adapter", "infinite-id") makes one image from the same starting noise; every image is scored and saved, then the
scores are averaged per method, over all prompts and over the raw-photo and style prompts apart.

``evaluate(...)`` does the work (tests call it directly; ``cli.main`` is the command). s/img is the wall time of one
pipeline call for one image, identity features precomputed, VAE decode included; a one-step warm-up call per method
runs first, untimed. The scores are in ``metrics``, the files in ``report``, the inputs in ``subjects``.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..method.pipeline import METHODS
from ..service.outputs import SOFTWARE, save_png
from ..service.request import METHOD_LABELS
from .metrics import ClipScorer, FaceNetEmbedder, clip_image_score, clip_text_score, face_score, largest_face
from .report import EvaluationSummary, ImageRecord, draw_grid, grid_caption, json_value, record_writer, write_report
from .subjects import EvalPrompt, Subject

DEFAULT_METHODS = ("text", "adapter", "infinite-id")  # the paper's habit: baselines first, the method last
DEFAULT_SEEDS = (0, 1, 2, 3)


@dataclass
class _Reference:
    subject: Subject
    photo: Image.Image
    features: Any  # IdentityFeatures for id_embeds (None when only "text" runs)
    arcface: np.ndarray
    facenet: np.ndarray | None
    clip: torch.Tensor  # [1, D]


@dataclass(frozen=True)
class _Tools:
    """What every image of one ``evaluate`` call is made, scored and saved with."""

    pipe: Any
    scorer: ClipScorer
    analyzer: Any
    facenet: FaceNetEmbedder | None
    knobs: dict[str, Any]
    out_dir: Path


def _check_inputs(pipe, methods: list[str], seeds: list[int], identities, prompts, face_analyzer):
    """Every argument rule in one place; returns the face analyzer to use."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"Methods must be some of {', '.join(METHODS)}; got {', '.join(unknown) or 'none'}.")
    if not seeds or not identities or not prompts:
        raise ValueError("An evaluation needs at least one seed, one identity and one prompt.")
    analyzer = face_analyzer if face_analyzer is not None else getattr(pipe, "face_analyzer", None)
    if analyzer is None:
        raise ValueError("The evaluation needs a face analyzer (the pipeline has none): pass face_analyzer=.")
    return analyzer


def _references(pipe, scorer, analyzer, facenet, subjects, need_identity: bool) -> list[_Reference]:
    """Every reference photo read, its face found and encoded, before any generation: one message for all bad ones."""
    from ..faces.analyzer import FaceError
    from ..images import InvalidImageError, load_image

    references, problems = [], []
    for subject in subjects:
        try:
            photo = load_image(subject.photo)
            face = analyzer.analyze(photo)[0]
        except (FaceError, InvalidImageError, OSError) as error:
            problems.append(f"  - {subject.name}: {error}")
            continue
        references.append(_Reference(
            subject=subject, photo=photo,
            features=pipe.encode_identity(face) if need_identity else None,
            arcface=np.asarray(face.embedding, dtype=np.float32),
            facenet=facenet.embed(face) if facenet is not None else None,
            clip=scorer.image_embeds([photo]),
        ))
    if problems:
        raise ValueError(f"{len(problems)} of {len(subjects)} reference photos cannot be used (fix or remove them):\n"
                         + "\n".join(problems))
    return references


def _generate(pipe, method: str, prompt: str, features, seed: int, knobs: dict) -> tuple[Image.Image, float]:
    # A CPU generator per image: the same seed gives the same starting noise on every device and for every method.
    generator = torch.Generator("cpu").manual_seed(int(seed))
    started = time.perf_counter()
    # Only .images is scored, so the text stream's decode (and its rows after the window) is skipped and not timed.
    output = pipe(prompt, id_embeds=None if method == "text" else features, method=method, generator=generator,
                  output_type="pil", return_text_images=False, **knobs)
    return output.images[0], time.perf_counter() - started  # PIL output: the GPU work has finished


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "identity"


def _scores(tools: _Tools, ref: _Reference, image: Image.Image, text_embed: torch.Tensor) -> dict[str, Any]:
    """The score fields of an ImageRecord for one output."""
    embed = tools.scorer.image_embeds([image])
    face = largest_face(tools.analyzer, image)
    return dict(
        clip_t=float(clip_text_score(embed, text_embed)[0]),
        clip_i=float(clip_image_score(embed, ref.clip)[0]),
        face_detected=face is not None,
        face_sim=face_score(None if face is None else face.embedding, ref.arcface),
        facenet_sim=face_score(tools.facenet.embed(face), ref.facenet)
        if face is not None and tools.facenet is not None else None,
    )


def _save(tools: _Tools, image: Image.Image, ref: _Reference, text: str, p_index: int, method: str, seed: int) -> str:
    """Write the image with its prompt, seed and method in the PNG metadata; its path relative to the output folder."""
    relative = Path("images") / _slug(ref.subject.name) / method / f"p{p_index:02d}-seed{seed}.png"
    save_png(image, tools.out_dir / relative, {
        "software": SOFTWARE, "prompt": text, "seed": seed, "method": method, "identity": ref.subject.name,
        "evaluation": {k: v for k, v in tools.knobs.items() if isinstance(v, int | float | str)},
    })
    return relative.as_posix()


def _one_image(tools: _Tools, ref: _Reference, p_index: int, prompt: EvalPrompt, text_embed: torch.Tensor,
               method: str, seed: int) -> tuple[Image.Image, ImageRecord]:
    """Generate, score and save one image."""
    text = prompt.text(ref.subject.class_word)
    image, seconds = _generate(tools.pipe, method, text, ref.features, seed, tools.knobs)
    record = ImageRecord(
        identity=ref.subject.name, class_word=ref.subject.class_word, prompt_index=p_index, prompt_kind=prompt.kind,
        prompt=text, method=method, seed=seed, **_scores(tools, ref, image, text_embed), seconds=seconds,
        image=_save(tools, image, ref, text, p_index, method, seed),
    )
    return image, record


def _run_info(tools: _Tools, references: list[_Reference], prompts, methods: list[str], seeds: list[int]) -> dict:
    """run.json: everything needed to read the numbers later."""
    return {
        "software": SOFTWARE,
        "methods": methods, "seeds": seeds, "knobs": {k: json_value(v) for k, v in tools.knobs.items()},
        "prompts": [dataclasses.asdict(p) for p in prompts],
        "identities": [{"name": r.subject.name, "class": r.subject.class_word,
                        "photo": str(r.subject.photo) if isinstance(r.subject.photo, str | Path) else "(image)"}
                       for r in references],
        "clip_model": tools.scorer.name,
        "face_pack": str(getattr(tools.analyzer, "pack", "unknown")),
        "facenet": tools.facenet is not None,
        "weights": {k: json_value(v) for k, v in (getattr(tools.pipe, "weights_info", None) or {}).items()},
    }


def evaluate(
    pipe,
    scorer: ClipScorer,
    identities: Sequence[Subject],
    prompts: Sequence[EvalPrompt],
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    out_dir: str | Path = "outputs/evaluation",
    *,
    face_analyzer=None,
    facenet: FaceNetEmbedder | None = None,
    warmup: bool = True,
    labels: dict[str, str] | None = None,
    notes: Sequence[str] = (),
    on_image: Callable[[int, int, ImageRecord], None] | None = None,
    **knobs,
) -> EvaluationSummary:
    """Generate every (identity, prompt, method, seed) image, score it, and write the CSVs, table and grid.

    ``knobs`` go to every pipeline call (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``,
    ``id_scale``, ``semantic_scale``, ``style_strength``, ``negative_prompt`` ...). ``face_analyzer`` defaults to
    the pipeline's. ``on_image(done, total, record)`` reports progress.
    """
    # 1. Arguments, then every reference photo, before any image is made.
    methods, seeds = list(methods), [int(s) for s in seeds]
    analyzer = _check_inputs(pipe, methods, seeds, identities, prompts, face_analyzer)
    labels = {**METHOD_LABELS, **(labels or {})}
    tools = _Tools(pipe, scorer, analyzer, facenet, knobs, Path(out_dir))
    tools.out_dir.mkdir(parents=True, exist_ok=True)
    references = _references(pipe, scorer, analyzer, facenet, identities, any(m != "text" for m in methods))
    first = references[0]

    # 2. Warm-up: first calls pay for kernel selection and allocation; keep that out of s/img.
    if warmup:
        for method in methods:
            _generate(pipe, method, prompts[0].text(first.subject.class_word), first.features, seeds[0],
                      {**knobs, "num_inference_steps": 1})

    # 3. Every image; the first identity at the first seed also fills the grid.
    records: list[ImageRecord] = []
    cells: dict[tuple[int, str], Image.Image] = {}
    captions: dict[tuple[int, str], str] = {}
    total = len(references) * len(prompts) * len(methods) * len(seeds)
    with record_writer(tools.out_dir / "per_image.csv", facenet is not None) as write:
        for ref, (p_index, prompt) in itertools.product(references, enumerate(prompts)):
            text_embed = scorer.text_embeds([prompt.text(ref.subject.class_word)])
            for method, seed in itertools.product(methods, seeds):
                image, record = _one_image(tools, ref, p_index, prompt, text_embed, method, seed)
                records.append(record)
                write(record)
                if ref is first and seed == seeds[0]:
                    cells[p_index, method], captions[p_index, method] = image, grid_caption(record)
                if on_image is not None:
                    on_image(len(records), total, record)

    # 4. Summaries, table, grid and run.json.
    grid = draw_grid(first.photo, first.subject, [p.text(first.subject.class_word) for p in prompts], methods, cells,
                     captions, labels, seeds[0])
    return write_report(tools.out_dir, records, methods, grid, _run_info(tools, references, prompts, methods, seeds),
                        labels=labels, notes=notes, facenet=facenet is not None)
