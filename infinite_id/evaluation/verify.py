"""``python -m infinite_id verify-weights``: settle the open likeness choices on the first machine with real weights.

The parity tests prove, on tiny random weights, that our identity stream computes what diffusers computes for each
public adapter. What they cannot say is which of our own settings gives the best likeness on *real* weights. This
command runs a fixed small set (the example photos in ``assets/`` the engine can read, plus ``--photos``; three
prompts; fixed seeds) through:

* the adapter alone through diffusers' own ``load_ip_adapter`` (the reference, ``evaluation.reference``);
* the adapter alone through ours (``method="adapter"``: it should reproduce the reference);
* Infinite-ID with our defaults (the adapter's LoRA on the identity stream, its published CLIP channel order,
  AdaIN-cross on), and with each of those switched: LoRA off, the other channel order, AdaIN-cross off.

It scores every image with the evaluation metrics (face similarity: ArcFace cosine through the pipeline's face
analyzer; CLIP-T: a separate scoring CLIP), writes ``table.md``, ``results.csv``, ``grid.png`` and ``verify.json``
into ``--out``, and states which setting wins and whether ours reaches the reference. ``--engine tiny`` runs the
whole thing in seconds on a tiny FaceID-PlusV2 file (with its LoRA) and a tiny diffusers reference built the same
way as the parity tests': its numbers check the plumbing and mean nothing about likeness.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..models.device import empty_cache
from ..models.options import for_this_start
from ..service.grid import labelled_grid
from ..service.outputs import SOFTWARE
from .metrics import ClipScorer, clip_text_score, face_score, largest_face, tiny_clip_scorer
from .reference import build_reference

ASSETS = Path(__file__).resolve().parents[2] / "assets"
PROMPTS = (
    "a photo of a {class} smiling in a sunlit park",
    "a {class} wearing a yellow sweater in Times Square",
    "a {class} in Studio Ghibli animation style, hand-drawn anime",
)
DEFAULT_SEEDS = (0, 1)
TINY_STEPS = 2
REACH_FACE = 2.0  # ours reaches the reference when its face similarity is at most this far below (100 x cosine)
REACH_PIXELS = 3.0  # ...or its images are the reference's within this mean |difference| (0-255): rounding only
GRID_CELL = 256
OUTPUTS = ("table.md", "results.csv", "grid.png", "verify.json")


@dataclass(frozen=True)
class Setting:
    """One row of the table: who makes the image and with which knobs."""

    name: str
    label: str
    knobs: dict = field(default_factory=dict)  # pipeline call arguments (ours); empty for the reference
    reference: bool = False


def settings_for(pipe, has_lora: bool) -> list[Setting]:
    """The reference, ours alone, and Infinite-ID with each open choice at its default and switched."""
    encoder = pipe.id_encoder
    order = getattr(encoder, "clip_channel_order", "rgb")
    other = "rgb" if order == "bgr" else "bgr"
    rows = [
        Setting("reference", f"{encoder.title} alone, diffusers (reference)", reference=True),
        Setting("ours-adapter", f"{encoder.title} alone, ours", {"method": "adapter"}),
        Setting("infinite-id", "Infinite-ID, our defaults", {"method": "infinite-id"}),
    ]
    if has_lora:
        rows.append(Setting("lora-off", "Infinite-ID, LoRA off", {"method": "infinite-id", "lora_scale": 0.0}))
    if getattr(encoder, "needs_clip", False):
        rows.append(Setting(f"clip-{other}", f"Infinite-ID, CLIP crop in {other.upper()}",
                            {"method": "infinite-id", "clip_channel_order": other}))
    rows.append(Setting("adain-cross-off", "Infinite-ID, AdaIN-cross off",
                        {"method": "infinite-id", "adain_cross": False}))
    return rows


@dataclass
class Record:
    setting: str
    photo: str
    prompt: str
    seed: int
    face_sim: float | None
    clip_t: float
    pixels_vs_reference: float | None  # mean |difference| to the reference image of the same cell, 0-255
    seconds: float


def example_photos(engine_name: str) -> list[Path]:
    """The photos of ``assets/examples.json`` the engine's face detector can read (real faces for the real engine,
    synthetic ones for the tiny engine), each once."""
    manifest = json.loads((ASSETS / "examples.json").read_text(encoding="utf-8"))
    names = [e["photo"] for e in manifest.get("generate", []) if e.get("engine") == engine_name]
    return [ASSETS / n for n in dict.fromkeys(names)]


def _faces(analyzer, photos: list[Path]) -> list[tuple[str, Any]]:
    """(name, largest face) of every photo; one message naming every photo without a usable face."""
    from ..faces.analyzer import FaceError
    from ..images import InvalidImageError, load_image

    found, problems = [], []
    for path in photos:
        try:
            found.append((Path(path).stem, analyzer.analyze(load_image(path))[0]))
        except (FaceError, InvalidImageError, OSError) as error:
            problems.append(f"  - {Path(path).name}: {error}")
    if problems:
        raise ValueError(f"{len(problems)} of {len(photos)} photos cannot be used:\n" + "\n".join(problems))
    if not found:
        raise ValueError("There are no photos to verify with: pass --photos.")
    return found


def _pixels(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def verify_weights(engine, scorer: ClipScorer, photos: list[Path], out_dir: str | Path, *, seeds=DEFAULT_SEEDS,
                   prompts=PROMPTS, class_word: str = "person", steps: int | None = None, guidance: float | None = None,
                   size: int | None = None, on_image=None) -> dict:
    """Generate and score every (photo, prompt, seed, setting); write the table, CSV, grid and JSON. Returns the
    summary that ``verify.json`` holds. The reference's images come first, in a pass of their own (see
    ``_reference_images``), so the check needs the memory of one UNet."""
    pipe, analyzer = engine.pipe, engine.face_analyzer
    faces = _faces(analyzer, photos)
    side = size or int(pipe.default_sample_size * pipe.vae_scale_factor)
    call = dict(num_inference_steps=steps or engine.steps, guidance_scale=engine.guidance if guidance is None
                else guidance, height=side, width=side)
    texts = [template.replace("{class}", class_word) for template in prompts]
    references, has_lora = _reference_images(pipe, faces, texts, seeds, call)
    settings = settings_for(pipe, has_lora)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, cells = [], {}
    total = len(faces) * len(texts) * len(seeds) * len(settings)
    text_embeds = [scorer.text_embeds([prompt]) for prompt in texts]  # once per prompt, for every photo
    for photo_name, face in faces:
        features = {}  # identity features per CLIP channel order, encoded once per photo
        for p_index, prompt in enumerate(texts):
            text_embed = text_embeds[p_index]
            for seed in seeds:
                reference_image, reference_seconds = references[photo_name, p_index, seed]
                for setting in settings:
                    started = time.perf_counter()
                    if setting.reference:
                        image, seconds = reference_image, reference_seconds
                    else:
                        order = setting.knobs.get("clip_channel_order")
                        if order not in features:
                            features[order] = pipe.encode_identity(face, clip_channel_order=order)
                        knobs = {k: v for k, v in setting.knobs.items() if k != "clip_channel_order"}
                        generator = torch.Generator("cpu").manual_seed(int(seed))
                        image = pipe(prompt, id_embeds=features[order], generator=generator, return_text_images=False,
                                     **call, **knobs).images[0]
                        seconds = time.perf_counter() - started  # generating only, as the reference's
                    found = largest_face(analyzer, image)
                    record = Record(
                        setting.name, photo_name, prompt, int(seed),
                        face_score(None if found is None else found.embedding, face.embedding),
                        float(clip_text_score(scorer.image_embeds([image]), text_embed)[0]),
                        None if setting.reference else _pixels(image, reference_image), seconds)
                    records.append(record)
                    if photo_name == faces[0][0] and seed == seeds[0]:
                        cells[setting.name, p_index] = (image, record)
                    if on_image is not None:
                        on_image(len(records), total, record)
    summary = summarize(records, settings)
    _write(out_dir, records, settings, summary, cells, prompts, class_word, faces[0], call, engine)
    return summary


def _reference_images(pipe, faces, prompts, seeds, call) -> tuple[dict, bool]:
    """diffusers' images for every (photo, prompt index, seed), with the seconds each took, and whether diffusers
    loaded the adapter's LoRA. Meanwhile our UNet waits on the CPU and only the reference's copy is on the device,
    so this needs the memory of one UNet, not two (a pipeline under offload hooks places its modules itself: it
    is left alone and needs both)."""
    adapter_file = getattr(pipe, "adapter_file", None)
    if adapter_file is None:
        raise ValueError("The loaded pipeline records no adapter file, so the diffusers reference cannot load it.")
    device = pipe._execution_device
    park = device.type != "cpu" and getattr(pipe, "weights_info", {}).get("memory_mode", "none") == "none"
    if park:
        pipe.unet.to("cpu")
    try:
        return _run_reference(pipe, adapter_file, device, faces, prompts, seeds, call)
    finally:
        if park:  # the reference (its UNet copy) is gone with _run_reference's frame: ours comes back
            gc.collect()
            empty_cache(device)
            pipe.unet.to(device)


def _run_reference(pipe, adapter_file, device, faces, prompts, seeds, call) -> tuple[dict, bool]:
    reference = build_reference(pipe, adapter_file, device=device)
    s_scale = float(getattr(pipe.id_encoder, "s_scale", 1.0))
    images = {}
    for photo_name, face in faces:
        for p_index, prompt in enumerate(prompts):
            for seed in seeds:
                started = time.perf_counter()
                generator = torch.Generator("cpu").manual_seed(int(seed))
                image = reference(prompt, face, s_scale=s_scale, generator=generator, **call).images[0]
                images[photo_name, p_index, seed] = (image, time.perf_counter() - started)
    return images, reference.has_lora


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def summarize(records: list[Record], settings: list[Setting]) -> dict:
    """Means per setting and the verdicts: which setting wins, and whether ours reaches the reference."""
    rows = {}
    for s in settings:
        mine = [r for r in records if r.setting == s.name]
        rows[s.name] = {"label": s.label, "knobs": s.knobs, "images": len(mine),
                        "face_sim": _mean([r.face_sim for r in mine]), "clip_t": _mean([r.clip_t for r in mine]),
                        "face_found": 100.0 * sum(r.face_sim is not None for r in mine) / max(1, len(mine)),
                        "pixels_vs_reference": _mean([r.pixels_vs_reference for r in mine])}
    return {"settings": rows, "verdicts": verdicts(rows)}


def _face(row: dict) -> float:
    return -1e9 if row["face_sim"] is None else row["face_sim"]


def verdicts(rows: dict) -> list[str]:
    """Plain sentences. A setting wins on face similarity; within 0.5 of each other, CLIP-T decides."""
    ours = {k: v for k, v in rows.items() if k not in ("reference", "ours-adapter")}
    best = max(ours, key=lambda k: (round(_face(ours[k]) * 2) / 2, ours[k]["clip_t"] or 0.0))
    lines = [f"Best likeness of the Infinite-ID settings: **{ours[best]['label']}** (face similarity "
             f"{_num(ours[best]['face_sim'])}, CLIP-T {_num(ours[best]['clip_t'])})."]
    if all(row["face_sim"] is None for row in rows.values()):
        lines = ["No output shows a face the analyzer finds, so likeness cannot be ranked (expected with random "
                 f"weights); by CLIP-T alone: **{ours[best]['label']}**."]
    base = rows.get("infinite-id")
    for name, row in rows.items():
        if name in ("reference", "ours-adapter", "infinite-id") or base is None:
            continue
        better = (_face(base), base["clip_t"] or 0) >= (_face(row), row["clip_t"] or 0)
        lines.append(f"{row['label'].split(', ', 1)[-1]}: face {_num(row['face_sim'])} vs default "
                     f"{_num(base['face_sim'])}, CLIP-T {_num(row['clip_t'])} vs {_num(base['clip_t'])}: the "
                     f"{'default' if better else 'switched setting'} wins.")
    ref, mine = rows["reference"], rows["ours-adapter"]
    pixels = mine["pixels_vs_reference"]
    reaches = (pixels is not None and pixels <= REACH_PIXELS) or (
        ref["face_sim"] is not None and mine["face_sim"] is not None and mine["face_sim"] >= ref["face_sim"] - REACH_FACE)
    lines.append(f"Ours (adapter alone) {'reaches' if reaches else 'does NOT reach'} the diffusers reference: face "
                 f"{_num(mine['face_sim'])} vs {_num(ref['face_sim'])}, mean |pixel difference| {_num(pixels)} / 255 "
                 f"(reached: within {REACH_PIXELS:g} / 255 or {REACH_FACE:g} face points).")
    if base is not None:
        lines.append(f"Infinite-ID (defaults) against the reference's likeness: face {_num(base['face_sim'])} vs "
                     f"{_num(ref['face_sim'])}, CLIP-T {_num(base['clip_t'])} vs {_num(ref['clip_t'])}.")
    return lines


def _num(value: float | None, missing: str = "–") -> str:
    return missing if value is None else f"{value:.1f}"


def markdown(summary: dict, notes: list[str]) -> str:
    head = ["Setting", "Face Sim. ↑", "CLIP-T ↑", "Face found", "vs reference |Δpx|", "knobs"]
    lines = ["# verify-weights", "", *notes, "", "| " + " | ".join(head) + " |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in summary["settings"].values():
        knobs = ", ".join(f"{k}={v}" for k, v in row["knobs"].items()) or "diffusers load_ip_adapter"
        lines.append(f"| {row['label']} | {_num(row['face_sim'])} | {_num(row['clip_t'])} | "
                     f"{row['face_found']:.0f}% | {_num(row['pixels_vs_reference'])} | {knobs} |")
    return "\n".join([*lines, "", *[f"- {v}" for v in summary["verdicts"]], ""])


def _write(out_dir: Path, records, settings, summary, cells, prompts, class_word, first, call, engine) -> None:
    with open(out_dir / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(records[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in records)
    info = getattr(engine.pipe, "weights_info", None) or {}
    notes = [f"Engine: {engine.name}" + (" (random weights: these numbers check the plumbing only)"
                                         if engine.name == "tiny" else "")
             + f" · adapter: {info.get('title', engine.pipe.id_encoder.title)} · LoRA: {info.get('lora', '?')}",
             f"{call['num_inference_steps']} steps · guidance {call['guidance_scale']:g} · {call['width']} px · "
             "similarities are 100 × cosine"]
    (out_dir / "table.md").write_text(markdown(summary, notes), encoding="utf-8")
    side = min(GRID_CELL, call["width"])
    fit = lambda im: ImageOps.contain(im.convert("RGB"), (side, side))  # noqa: E731
    rows = [[fit(cells[s.name, p][0]) if (s.name, p) in cells else None for p in range(len(prompts))]
            for s in settings]
    captions = [[f"face {_num(cells[s.name, p][1].face_sim, 'n/a')} · T {cells[s.name, p][1].clip_t:.1f}"
                 if (s.name, p) in cells else "" for p in range(len(prompts))] for s in settings]
    labelled_grid(rows, [s.label for s in settings], [t.replace("{class}", class_word) for t in prompts], captions,
                  title=f"verify-weights · {first[0]} · seed {records[0].seed}").save(out_dir / "grid.png")
    (out_dir / "verify.json").write_text(json.dumps({"software": SOFTWARE, "engine": engine.name, "call": call,
                                                      "weights": {k: str(v) for k, v in info.items()},
                                                      **summary}, indent=2), encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    from ..models.engines import add_engine_arguments

    parser = argparse.ArgumentParser(
        prog="python -m infinite_id verify-weights",
        description="On real weights: the adapter alone through diffusers (the reference) against ours, and "
                    "Infinite-ID with the LoRA on/off, each CLIP channel order and AdaIN-cross on/off. Writes a "
                    "table and a grid and says which setting wins (docs/weights.md). The reference runs first, on its "
                    "own UNet copy, while ours waits on the CPU: the memory of one UNet, as generating needs.")
    parser.add_argument("--photos", nargs="+", type=Path, default=[],
                        help="more photos of people (one face each) besides the examples in assets/")
    parser.add_argument("--no-examples", dest="examples", action="store_false",
                        help="only --photos, not the example photos of assets/")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 (0 with --engine tiny)")
    parser.add_argument("--steps", type=int, help=f"denoising steps (default: the engine's, 30; {TINY_STEPS} for tiny)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the engine's, 5)")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the model's native size)")
    parser.add_argument("--class-word", default="person", help="the word for {class} in the three prompts")
    parser.add_argument("--clip-model", default=None,
                        help="the scoring CLIP (default: openai/clip-vit-large-patch14; a tiny random one with "
                             "--engine tiny)")
    parser.add_argument("--out", type=Path, default=Path("outputs/verify-weights"), help="the output folder")
    add_engine_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as error:  # missing weights (the start-up check's list), bad photos
        print(f"error: {for_this_start(error, argv)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from ..models.engines import load_engine, load_engine_from_args

    tiny = args.engine == "tiny"
    if tiny:
        torch.set_num_threads(1)  # the tiny models are overhead-bound: one thread is the fastest (tests/conftest.py)
        engine = load_engine("tiny", adapter=args.adapter or "faceid-plusv2")
        scorer = tiny_clip_scorer() if args.clip_model is None else ClipScorer.from_pretrained(args.clip_model)
    else:
        from ..models.fetching import startup_check
        from ..models.options import settings_from_args

        startup_check(settings_from_args(args))  # offline and missing: one message listing every missing file
        scorer = ClipScorer.from_pretrained(args.clip_model or "openai/clip-vit-large-patch14")
        engine = load_engine_from_args(args)
    device = engine.pipe._execution_device
    scorer.to(device, torch.float16 if device.type != "cpu" else torch.float32)
    examples = example_photos(engine.name) if args.examples else []
    # The tiny engine checks the plumbing: one example photo, one seed and a few steps keep it to seconds.
    photos = (examples[:1] if tiny else examples) + list(args.photos)
    seeds = args.seeds or ([0] if tiny else list(DEFAULT_SEEDS))
    steps = args.steps or (TINY_STEPS if tiny else None)

    def progress(done: int, total: int, r: Record) -> None:
        face = "no face" if r.face_sim is None else f"face {r.face_sim:.1f}"
        print(f"[{done}/{total}] {r.setting} · {r.photo} · seed {r.seed}: {face} · CLIP-T {r.clip_t:.1f}",
              file=sys.stderr, flush=True)

    summary = verify_weights(engine, scorer, photos, args.out, seeds=seeds, class_word=args.class_word,
                     steps=steps, guidance=args.guidance, size=args.size, on_image=progress)
    print((args.out / "table.md").read_text(encoding="utf-8"))
    for name in OUTPUTS:
        print(f"{name}: {args.out / name}")
    return 0 if summary["settings"] else 1
