"""``python -m infinite_id generate|compare``: the app's Generate and Compare tabs from a terminal.

Same library calls, same PNGs and metadata as the app (``infinite_id.service``), same engine flags
(``infinite_id.models.engines``). Errors meant for people are printed as one sentence and exit with status 1.

    python -m infinite_id generate --photo me.jpg --prompt "a man in Ghibli animation style" --style "Ghibli animation"
    python -m infinite_id generate --reproduce outputs/infinite-id-42-0.png --photo me.jpg
    python -m infinite_id compare --photo me.jpg --prompt "a woman reading" --mode strengths
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import service as gen
from .models.engines import add_engine_arguments, load_engine_from_args
from .models.options import for_this_start
from .service.styles import default_style_name, style_names

DEFAULT_OUT = Path("outputs")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--photo", help="a photo of the person (JPEG, PNG or WebP)")
    parser.add_argument("--face", type=int, default=0, help="which face of --photo, 0 = the largest (default)")
    parser.add_argument("--prompt", default="a photo of a person", help="what to make")
    parser.add_argument("--style", default=default_style_name(), choices=style_names(), metavar="STYLE",
                        help=f"a style preset: {', '.join(style_names())}")
    parser.add_argument("--aspect", default=gen.DEFAULT_ASPECT, choices=list(gen.ASPECT_RATIOS), metavar="RATIO",
                        help="an SDXL size preset by its label, e.g. '16:9 wide · 1344×768' (scaled for --engine tiny)")
    parser.add_argument("--width", type=int, help="overrides --aspect (pixels, a multiple of 8)")
    parser.add_argument("--height", type=int, help="overrides --aspect (pixels, a multiple of 8)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 30, or 8 in fast mode)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the sampling mode's, 5)")
    parser.add_argument("--seed", type=int, default=None, help="fix the seed (default: a random one, printed)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs (default outputs/)")
    parser.add_argument("--lora-scale", type=float, default=1.0,
                        help="strength of the adapter's LoRA on the identity stream, 0 to 2 (default 1, as the adapter "
                             "was trained; 0 turns it off; ignored for adapters without one)")
    parser.add_argument("--clip-channel-order", choices=("rgb", "bgr"), default=None,
                        help="channel order of the face crop given to CLIP (default: the adapter's published order, "
                             "BGR for FaceID-PlusV2, RGB otherwise; see docs/weights.md)")
    parser.add_argument("--adain-cross", action=argparse.BooleanOptionalAction, default=True,
                        help="AdaIN-mean on the cross-attention's identity keys/values too (Infinite-ID only; "
                             "default on, as in the paper)")
    add_engine_arguments(parser)


def _likeness(args) -> dict:
    """The issue-14 knobs of a request, from the shared flags."""
    return dict(lora_scale=args.lora_scale, adain_cross=args.adain_cross, clip_channel_order=args.clip_channel_order)


def _size(args, pipe) -> tuple[int, int]:
    width, height = gen.size_for(args.aspect, gen.native_size(pipe))
    return args.width or width, args.height or height


def _load(args):
    engine = load_engine_from_args(args)
    if engine.banner:
        print(f"note: {gen.SOFTWARE} is running the tiny engine (random weights: engine check).", file=sys.stderr)
    return engine


def _progress(label: str):
    def report(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{label}: step {done}/{total}", end=end, file=sys.stderr, flush=True)

    return report


def _run(main, argv) -> int:
    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as error:  # sentences for people: bad photo, no face, missing weights
        print(f"error: {for_this_start(error, argv)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return 130



def generate_main(argv: list[str] | None = None) -> int:
    return _run(_generate, argv)


def compare_main(argv: list[str] | None = None) -> int:
    return _run(_compare, argv)


def _generate(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m infinite_id generate",
                                     description="New images of the person in a photo, following a prompt.")
    _common(parser)
    parser.add_argument("--extra-photo", action="append", default=[], help="another photo of the same person "
                        "(repeat the flag; the identities are averaged)")
    parser.add_argument("--negative-prompt", default="", help="what to keep out of the picture")
    parser.add_argument("--method", choices=list(gen.METHOD_LABELS), default="infinite-id")
    parser.add_argument("--id-scale", type=float, default=1.0, help="identity strength, 0 to 1.5")
    parser.add_argument("--semantic-scale", type=float, default=1.0, help="semantic strength, 0 to 3")
    parser.add_argument("--style-strength", type=float, default=None,
                        help="AdaIN-mean amount, 0 to 1 (default: the style preset's recommendation)")
    parser.add_argument("--mix-window", type=float, nargs=2, default=(0.0, 1.0), metavar=("START", "END"),
                        help="fraction of the steps with mixed attention (default 0 1)")
    parser.add_argument("--num-images", type=int, default=1, help="1 to 4; image i uses seed + i")
    parser.add_argument("--text-stream", action="store_true", help="also save the text stream (no identity)")
    parser.add_argument("--reproduce", type=Path, help="a PNG made by this app or CLI: rerun its exact settings "
                        "(give the same --photo)")
    args = parser.parse_args(argv)

    engine = _load(args)
    pipe = engine.pipe
    metadata: dict = {}
    if args.reproduce:
        metadata = gen.read_metadata(args.reproduce)
        if not metadata:
            raise ValueError(f"{args.reproduce} carries no Infinite-ID metadata, so it cannot be reproduced.")
        request = gen.GenerationRequest.from_metadata(metadata)
        if args.text_stream:  # asked for now: the call keeps the text stream (same image within rounding)
            request = request.replace(text_stream=True)
        face = (metadata.get("identity") or {}).get("face_index", args.face)
    else:
        width, height = _size(args, pipe)
        request = gen.GenerationRequest(
            prompt=args.prompt, negative_prompt=args.negative_prompt, style=args.style, method=args.method,
            id_scale=args.id_scale, semantic_scale=args.semantic_scale, style_strength=args.style_strength,
            mix_window=tuple(args.mix_window), num_inference_steps=args.steps or engine.steps,
            guidance_scale=engine.guidance if args.guidance is None else args.guidance, width=width, height=height,
            seed=args.seed, num_images=args.num_images, fast=engine.fast, text_stream=args.text_stream,
            **_likeness(args),
        )
        face = args.face
    identity = None
    if request.needs_identity:
        if not args.photo:
            raise ValueError("Give a photo of the person with --photo (or use --method text).")
        identity = gen.IdentityCache().encode(pipe, args.photo, face_index=face, extra_photos=args.extra_photo,
                                              analyzer=engine.face_analyzer,
                                              clip_channel_order=request.clip_channel_order)
        recorded = (metadata.get("identity") or {}).get("key")
        if recorded and recorded != identity.key:
            print("warning: this is not the photo (or face) the image was made from; the person will differ.",
                  file=sys.stderr)
    result = gen.generate(pipe, request, identity, on_step=_progress("generating"))
    for path, item in zip(gen.save_images(result.images, args.out, stem="infinite-id"), result.images):
        print(f"{path}\t{item.caption()}")
    if args.text_stream and result.text_images:
        for path, item in zip(gen.save_images(result.text_images, args.out, stem="text-stream"), result.text_images):
            print(f"{path}\t{item.caption()}")
    print(f"seed {result.seed} · {result.seconds:.1f} s", file=sys.stderr)
    return 0


def _compare(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m infinite_id compare",
                                     description="One labelled grid: the same person, prompt and seed across "
                                                 "methods, strengths or styles.")
    _common(parser)
    parser.add_argument("--mode", choices=gen.COMPARE_MODES, default="methods",
                        help="methods: text only / adapter / Infinite-ID; strengths: identity x semantic grid; "
                             "styles: one image per --styles preset")
    parser.add_argument("--styles", nargs="+", default=[], metavar="STYLE", help="presets for --mode styles")
    parser.add_argument("--id-scales", default="0.5, 1.0, 1.5", help="grid rows for --mode strengths")
    parser.add_argument("--semantic-scales", default="0, 1, 2", help="grid columns for --mode strengths")
    args = parser.parse_args(argv)
    if not args.photo:
        raise ValueError("Give a photo of the person with --photo.")

    engine = _load(args)
    pipe = engine.pipe
    width, height = _size(args, pipe)
    request = gen.GenerationRequest(
        prompt=args.prompt, style=args.style, num_inference_steps=args.steps or engine.steps,
        guidance_scale=engine.guidance if args.guidance is None else args.guidance, width=width, height=height,
        seed=args.seed, fast=engine.fast, **_likeness(args),
    )
    identity = gen.IdentityCache().encode(pipe, args.photo, face_index=args.face, analyzer=engine.face_analyzer,
                                          clip_channel_order=request.clip_channel_order)
    result = gen.compare(pipe, request, identity, args.mode, styles=args.styles, id_scales=args.id_scales,
                         semantic_scales=args.semantic_scales, on_step=_progress("comparing"))
    grid, paths = gen.save_comparison(result, args.out, stem=f"compare-{args.mode}")
    print(grid)
    for path, cell in zip(paths, result.cells):
        print(f"{path}\t{cell.caption()}")
    print(f"seed {result.seed} · {result.seconds:.1f} s", file=sys.stderr)
    return 0
