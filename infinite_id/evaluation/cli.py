"""``python -m infinite_id evaluate``: the argument parser and the command around ``evaluate``: load the engine and
the scorers, print progress, the table and where the files went. docs/evaluation.md describes every flag's effect.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..method.pipeline import METHODS
from ..models.options import for_this_start
from .metrics import DEFAULT_CLIP_MODEL, ClipScorer, FaceNetEmbedder, tiny_clip_scorer
from .report import ImageRecord
from .run import DEFAULT_METHODS, DEFAULT_SEEDS, evaluate
from .subjects import CLASSES_FILE, DEFAULT_CLASS, EvalPrompt, Subject, find_subjects, load_prompts, read_classes


def build_parser() -> argparse.ArgumentParser:
    from ..models.engines import add_engine_arguments

    parser = argparse.ArgumentParser(
        prog="python -m infinite_id evaluate",
        description="Generate every identity x prompt x method x seed and report CLIP-T, CLIP-I, face similarity, "
                    "the face-detected rate and seconds per image per method (see docs/evaluation.md).",
    )
    parser.add_argument("--identities", type=Path, required=True,
                        help="a folder with one reference photo per person, or one sub-folder per person (the first "
                             f"photo by name is the reference); an optional {CLASSES_FILE} maps names to class words")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="a JSON {kind: [prompts]} or a text file, one prompt a line, {class} for the class word "
                             "(default: the shipped list, 8 raw-photo and 8 style prompts)")
    parser.add_argument("--kinds", nargs="+", metavar="KIND", help="only the prompts of these kinds (photo, style)")
    parser.add_argument("--classes", type=Path, help=f"a JSON file of class words per identity (beside {CLASSES_FILE})")
    parser.add_argument("--default-class", default=DEFAULT_CLASS,
                        help="the class word of identities with none given (default: person)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS),
                        help="one image per seed for every identity, prompt and method (default: 0 1 2 3)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the engine's: 30, 8 in fast mode)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the engine's, 5)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's native size, 1024 for SDXL)")
    parser.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--id-scale", type=float, default=1.0)
    parser.add_argument("--semantic-scale", type=float, default=1.0)
    parser.add_argument("--style-strength", type=float, default=1.0)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--clip-model", default=None,
                        help=f"the scoring CLIP, a hub id or a local folder (default: {DEFAULT_CLIP_MODEL}; with "
                             "--engine tiny a tiny random CLIP)")
    parser.add_argument("--facenet", choices=("auto", "off"), default="auto",
                        help="auto: also score FaceNet similarity when facenet-pytorch is installed")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up calls")
    parser.add_argument("--out", type=Path, default=Path("outputs/evaluation"), help="the output folder")
    add_engine_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Inputs first (exit 2), so a typo costs nothing; models next (exit 1 on missing weights or bad photos).
    try:
        subjects = find_subjects(args.identities, read_classes(args.classes) if args.classes else None,
                                 args.default_class)
        prompts = load_prompts(args.prompts, args.kinds)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return _run(args, subjects, prompts)
    except (ValueError, FileNotFoundError) as error:  # missing weights, a reference photo without a face
        print(f"error: {for_this_start(error, argv)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncancelled (per_image.csv holds every image scored so far)", file=sys.stderr)
        return 130


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _scorers(args: argparse.Namespace) -> tuple[ClipScorer, FaceNetEmbedder | None]:
    """The scoring CLIP (a tiny random one for the tiny engine unless --clip-model says otherwise) and FaceNet."""
    if args.clip_model is None and args.engine == "tiny":
        scorer = tiny_clip_scorer()
    else:
        scorer = ClipScorer.from_pretrained(args.clip_model or DEFAULT_CLIP_MODEL)
    return scorer, FaceNetEmbedder.load() if args.facenet == "auto" else None


def _knobs(args: argparse.Namespace, engine) -> dict:
    """The pipeline arguments of every call: the flags, else the engine's defaults and the model's native size."""
    from ..service.request import native_size

    side = native_size(engine.pipe)
    return dict(
        num_inference_steps=args.steps or engine.steps,
        guidance_scale=engine.guidance if args.guidance is None else args.guidance,
        width=args.width or side, height=args.height or side, id_scale=args.id_scale,
        semantic_scale=args.semantic_scale, style_strength=args.style_strength,
        negative_prompt=args.negative_prompt,
    )


def _notes(args: argparse.Namespace, engine, scorer: ClipScorer, knobs: dict, subjects: list, prompts: list) -> list:
    """The lines under the table's title: what ran, on how much, and how to read it."""
    return [
        f"Engine: {engine.name}" + (" (random weights: these numbers check the plumbing only)" if engine.banner else "")
        + f" · scoring CLIP: {scorer.name} · face analyzer: {getattr(engine.face_analyzer, 'pack', 'unknown')}",
        f"{_count(len(subjects), 'identity', 'identities')} × {_count(len(prompts), 'prompt')} × "
        f"{_count(len(args.seeds), 'seed')} · "
        f"{knobs['num_inference_steps']} steps · guidance {knobs['guidance_scale']:g} · "
        f"{knobs['width']}×{knobs['height']} px",
        "Similarities are 100 × cosine. Face Sim. averages the images with a face; Face det. is the share that "
        "has one. s/img: one image per pipeline call, after an untimed warm-up.",
    ]


def _progress(done: int, total: int, record: ImageRecord) -> None:
    face = "no face" if record.face_sim is None else f"face {record.face_sim:.1f}"
    print(f"[{done}/{total}] {record.identity} · {record.method} · p{record.prompt_index:02d} seed "
          f"{record.seed}: CLIP-T {record.clip_t:.1f} · CLIP-I {record.clip_i:.1f} · {face} · "
          f"{record.seconds:.1f} s", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace, subjects: list[Subject], prompts: list[EvalPrompt]) -> int:
    from ..models.engines import load_engine_from_args

    # The scorer before the pipeline: it is the file most likely to be missing, and it loads in seconds.
    scorer, facenet = _scorers(args)
    engine = load_engine_from_args(args)
    device = engine.pipe._execution_device
    scorer.to(device, torch.float16 if device.type != "cpu" else torch.float32)  # scores are cosines: fp16 is plenty
    if facenet is not None:
        facenet.model.to(device)
    knobs = _knobs(args, engine)
    info = getattr(engine.pipe, "weights_info", None) or {}
    labels = {"adapter": f"Adapter baseline ({info['title']})"} if info.get("title") else {}
    summary = evaluate(
        engine.pipe, scorer, subjects, prompts, args.methods, args.seeds, args.out,
        face_analyzer=engine.face_analyzer, facenet=facenet, warmup=args.warmup, labels=labels,
        notes=_notes(args, engine, scorer, knobs, subjects, prompts), on_image=_progress, **knobs,
    )
    print(summary.table)
    for name in ("table", "summary", "per_image", "grid", "run"):
        print(f"{name}: {summary.files[name]}")
    return 0
