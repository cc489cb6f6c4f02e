"""``python -m infinite_id evaluate``: CLIP-T, CLIP-I and face similarity per method, laid out like the paper's table.

For every identity (one reference photo each), prompt and seed, each method ("text", "adapter", "infinite-id")
makes one image from the same starting noise; every image is scored, and the scores are averaged per method, over
all prompts and over the raw-photo and style prompts apart. ``evaluate(...)`` does the work (tests call it
directly); ``main(argv)`` is the command. Written to ``out_dir``: ``per_image.csv``, ``summary.csv``, ``table.md``,
``grid.png`` (first identity, first seed: rows = prompts, columns = methods), ``run.json`` and ``images/``.

Conventions (docs/evaluation.md has the long form). Every similarity is 100 x a cosine, as the papers print them:

* CLIP-T: scoring-CLIP image embedding of the output vs the text embedding of its prompt ({class} filled in).
* CLIP-I: scoring-CLIP image embedding of the output vs that of the whole reference photo.
* Face Sim.: ArcFace cosine of the largest usable face in the output to the reference's largest face, through the
  pipeline's own face analyzer. An output with no usable face gets no score (it is not a zero) and lowers the
  detection rate instead; ``face_sim_all`` in summary.csv counts those as 0 for papers that do.
* FaceNet: the same with facenet-pytorch's InceptionResnetV1 (VGGFace2), when that package and its weights are here.
* s/img: wall time of one pipeline call for one image, identity features precomputed, VAE decode included; a one-step
  warm-up call per method runs first, untimed.

The scoring CLIP is separate from the pipeline's encoders (default ``openai/clip-vit-large-patch14``), so the metric
does not grade the model with its own features. ``--engine tiny`` uses a tiny random CLIP built offline: its numbers
check the plumbing and mean nothing about images.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..method.pipeline import METHODS
from ..service.grid import labelled_grid
from ..service.outputs import SOFTWARE, save_png
from ..service.request import METHOD_LABELS

logger = logging.getLogger(__name__)

SCALE = 100.0  # similarities are reported as 100 x cosine
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_METHODS = ("text", "adapter", "infinite-id")  # the paper's habit: baselines first, the method last
DEFAULT_SEEDS = (0, 1, 2, 3)
DEFAULT_CLASS = "person"
PROMPTS_FILE = Path(__file__).resolve().parents[1] / "prompts" / "evaluation.json"
CLASSES_FILE = "classes.json"  # optional, in the identities folder: {"alice": "woman", ...}
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
GRID_CELL = 384  # grid cells are shrunk to this many pixels so a 16-prompt grid of 1024 px images stays viewable
OUTPUTS = ("per_image.csv", "summary.csv", "table.md", "grid.png", "run.json")


# --- metrics: small pure functions --------------------------------------------------------------------------------


def _unit_rows(x: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    array = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)
    array = np.atleast_2d(array).astype(np.float32)
    return array / np.maximum(np.linalg.norm(array, axis=-1, keepdims=True), 1e-12)


def cosine_scores(a, b) -> np.ndarray:
    """Row-wise ``SCALE`` x cosine of ``[N, D]`` and ``[N, D]`` (or ``[1, D]``, compared with every row)."""
    a, b = _unit_rows(a), _unit_rows(b)
    if a.shape[-1] != b.shape[-1] or (len(a) != len(b) and 1 not in (len(a), len(b))):
        raise ValueError(f"Cannot compare embeddings of shapes {a.shape} and {b.shape}.")
    return SCALE * np.sum(a * b, axis=-1)


def clip_text_score(image_embeds, text_embeds) -> np.ndarray:
    """CLIP-T per image: its CLIP image embedding against its prompt's CLIP text embedding."""
    return cosine_scores(image_embeds, text_embeds)


def clip_image_score(image_embeds, reference_embeds) -> np.ndarray:
    """CLIP-I per image: its CLIP image embedding against the reference photo's."""
    return cosine_scores(image_embeds, reference_embeds)


def face_score(embedding, reference) -> float | None:
    """Face similarity of one output: None when the output has no face (no embedding) to compare."""
    if embedding is None or reference is None:
        return None
    return float(cosine_scores(embedding, reference)[0])


def largest_face(analyzer, image: Image.Image):
    """The largest usable face in ``image``, or None: for a generated image no face is a result, not an error."""
    from ..faces.analyzer import FaceError
    from ..images import InvalidImageError

    try:
        faces = analyzer.analyze(image)
    except (FaceError, InvalidImageError):
        return None
    return faces[0] if faces else None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


# --- the scoring models -------------------------------------------------------------------------------------------


def _projected(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x returned the tensor.
    return output if torch.is_tensor(output) else output.pooler_output


class ClipScorer:
    """A CLIP model used only for the metrics. Embeddings come back L2-normalised, float32, on the CPU."""

    def __init__(self, model, processor, name: str = "", batch_size: int = 16):
        self.model = model.eval()
        self.processor = processor
        self.name = name or str(getattr(model.config, "_name_or_path", "") or "clip")
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = DEFAULT_CLIP_MODEL, local_files_only: bool | None = None
    ) -> ClipScorer:
        """Load a transformers CLIP (hub id or local folder) on the CPU; ``to()`` moves it. Offline and missing
        raises ``MissingWeightsError`` saying how to fetch it."""
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

        from ..models.hub import MissingWeightsError, offline_requested

        offline = offline_requested(local_files_only)
        try:
            model = CLIPModel.from_pretrained(name_or_path, dtype=torch.float32, local_files_only=offline)
            # The PIL image processor: the default one wants torchvision, which this project does not install.
            processor = CLIPProcessor(
                image_processor=CLIPImageProcessorPil.from_pretrained(name_or_path, local_files_only=offline),
                tokenizer=CLIPTokenizer.from_pretrained(name_or_path, local_files_only=offline),
            )
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MissingWeightsError(
                f"The scoring CLIP model '{name_or_path}' could not be loaded ({reason}). It is not among the files "
                f"`python -m infinite_id download` fetches: get it once with `hf download {name_or_path}`, or pass "
                "--clip-model a local folder holding a transformers CLIP model."
            ) from None
        return cls(model, processor, name=str(name_or_path))

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> ClipScorer:
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt").pixel_values
            pixels = pixels.to(self._device, self.model.dtype)
            chunks.append(_projected(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    @torch.inference_mode()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        # CLIP reads 77 tokens; a longer prompt is scored on its first 77, as every CLIP-T implementation does.
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True, max_length=77)
        output = self.model.get_text_features(
            input_ids=tokens.input_ids.to(self._device), attention_mask=tokens.attention_mask.to(self._device)
        )
        return torch.nn.functional.normalize(_projected(output).float().cpu(), dim=-1)


def tiny_clip_scorer(seed: int = 0) -> ClipScorer:
    """A tiny random ``CLIPModel`` on the repo's tiny tokenizer, built offline in well under a second.

    Its scores obey the conventions (identical images give 100) but say nothing about the images: engine checks only.
    """
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from ..testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's random stream
        torch.manual_seed(seed)
        model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32), tokenizer=tokenizer
    )
    return ClipScorer(model, processor, name="tiny random CLIP (engine check)")


class FaceNetEmbedder:
    """FaceNet (facenet-pytorch ``InceptionResnetV1``) on the face analyzer's aligned crop, resized to 160 px.

    The analyzer's ArcFace alignment stands in for FaceNet's own MTCNN crop, so both face metrics see the same face.
    """

    def __init__(self, model: torch.nn.Module, size: int = 160):
        self.model = model.eval()
        self.size = size

    @classmethod
    def load(cls) -> FaceNetEmbedder | None:
        """FaceNet with VGGFace2 weights, or None when facenet-pytorch or its weights are not available."""
        try:
            from facenet_pytorch import InceptionResnetV1
        except ImportError:
            return None
        try:
            model = InceptionResnetV1(pretrained="vggface2")
        except Exception as error:  # its weights come from a GitHub release on first use: offline they may be missing
            logger.warning("facenet-pytorch is installed but its weights could not be loaded (%s); no FaceNet.", error)
            return None
        return cls(model)

    @torch.inference_mode()
    def embed(self, face) -> np.ndarray:
        crop = face.arcface_crop.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)[None]
        pixels = (pixels - 127.5) / 128.0  # facenet-pytorch's fixed_image_standardization
        parameter = next(self.model.parameters())
        return self.model(pixels.to(parameter.device, parameter.dtype))[0].float().cpu().numpy()


# --- inputs: identities and prompts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """One identity: a name, the reference photo (a path or an image) and the class word for {class}."""

    name: str
    photo: Any
    class_word: str = DEFAULT_CLASS


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt template with ``{class}``, and its kind ("photo", "style" or "custom") for the per-kind tables."""

    template: str
    kind: str = "custom"

    def text(self, class_word: str) -> str:
        # str.replace, not format: other braces in a user's prompt are text.
        return self.template.replace("{class}", class_word)


def load_prompts(path: str | Path | None = None, kinds: Sequence[str] | None = None) -> list[EvalPrompt]:
    """The shipped list (``prompts/evaluation.json``) or a file of one's own: JSON ``{"kind": [prompts]}`` (keys
    whose values are not lists are comments), or text with one prompt a line (``#`` starts a comment)."""
    path = Path(path) if path is not None else PROMPTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"The prompt file {path} does not exist.")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"The prompt file {path} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f'The prompt file {path} must hold an object like {{"photo": [...], "style": [...]}}.')
        prompts = [EvalPrompt(str(p).strip(), kind) for kind, items in data.items() if isinstance(items, list)
                   for p in items if str(p).strip()]
    else:
        lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
        prompts = [EvalPrompt(line) for line in lines if line]
    if kinds:
        prompts = [p for p in prompts if p.kind in kinds]
    if not prompts:
        which = f" of kind {', '.join(kinds)}" if kinds else ""
        raise ValueError(f"The prompt file {path} has no prompts{which}.")
    return prompts


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES and not p.name.startswith("."))


def read_classes(path: str | Path) -> dict[str, str]:
    """``{"identity name": "man" | "woman" | "person" | ...}`` from a JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Could not read the class words in {path}: {error}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise ValueError(f'{path} must map identity names to class words, like {{"alice": "woman"}}.')
    return {str(k): v.strip() for k, v in data.items()}


def find_subjects(
    root: str | Path, classes: dict[str, str] | None = None, default_class: str = DEFAULT_CLASS
) -> list[Subject]:
    """The identities under ``root``: each photo directly in it is one person (named by the file's stem), and each
    sub-folder is one person whose first photo by name is the reference. ``root/classes.json`` and ``classes``
    (which wins) give the class word per name; the rest get ``default_class``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"The identities folder {root} does not exist (or is not a folder).")
    found: dict[str, Path] = {p.stem: p for p in _photos(root)}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = _photos(folder)
        if photos:
            found.setdefault(folder.name, photos[0])
    if not found:
        raise ValueError(
            f"No reference photos in {root}: put one photo per person in it ({', '.join(PHOTO_SUFFIXES)}), "
            "or one folder per person."
        )
    words = read_classes(root / CLASSES_FILE) if (root / CLASSES_FILE).is_file() else {}
    words.update(classes or {})
    return [Subject(name, path, words.get(name, default_class)) for name, path in sorted(found.items())]


# --- results ------------------------------------------------------------------------------------------------------


@dataclass
class ImageRecord:
    """One generated image and its scores (None: not measurable, e.g. no face in the output)."""

    identity: str
    class_word: str
    prompt_index: int
    prompt_kind: str
    prompt: str
    method: str
    seed: int
    clip_t: float
    clip_i: float
    face_detected: bool
    face_sim: float | None
    facenet_sim: float | None
    seconds: float
    image: str  # relative to the output folder


@dataclass
class MethodSummary:
    """A method's means over one subset of prompts ("all", "photo", "style", ...)."""

    subset: str
    method: str
    images: int
    clip_t: float | None
    clip_i: float | None
    face_sim: float | None  # mean over the images with a face
    face_sim_all: float | None  # images without a face counted as 0
    facenet_sim: float | None
    face_detected_rate: float  # percent
    seconds_per_image: float | None


@dataclass
class EvaluationSummary:
    summaries: list[MethodSummary]
    records: list[ImageRecord]
    table: str  # the markdown of table.md
    out_dir: Path
    files: dict[str, Path]

    def get(self, method: str, subset: str = "all") -> MethodSummary:
        for item in self.summaries:
            if item.method == method and item.subset == subset:
                return item
        raise KeyError(f"No summary for method {method!r} on {subset!r} prompts.")


def summarize(records: Sequence[ImageRecord], methods: Sequence[str]) -> list[MethodSummary]:
    """Means per method, over all prompts and, when the prompts are of several kinds, per kind."""
    kinds = list(dict.fromkeys(r.prompt_kind for r in records))
    out = []
    for subset in ["all", *(kinds if len(kinds) > 1 else [])]:
        for method in methods:
            rows = [r for r in records if r.method == method and subset in ("all", r.prompt_kind)]
            if not rows:
                continue
            out.append(MethodSummary(
                subset=subset, method=method, images=len(rows),
                clip_t=_mean([r.clip_t for r in rows]),
                clip_i=_mean([r.clip_i for r in rows]),
                face_sim=_mean([r.face_sim for r in rows]),
                face_sim_all=_mean([r.face_sim if r.face_sim is not None else 0.0 for r in rows]),
                facenet_sim=_mean([r.facenet_sim for r in rows]),
                face_detected_rate=SCALE * sum(r.face_detected for r in rows) / len(rows),
                seconds_per_image=_mean([r.seconds for r in rows]),
            ))
    return out


SUBSET_TITLES = {"all": "All prompts", "photo": "Raw-photo prompts", "style": "Style prompts"}


def _number(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def markdown_table(
    summaries: Sequence[MethodSummary], labels: dict[str, str] | None = None, facenet: bool = False,
    notes: Sequence[str] = (),
) -> str:
    """The paper's layout: one row per method, one table per prompt subset."""
    labels = {**METHOD_LABELS, **(labels or {})}
    head = ["Method", "CLIP-T ↑", "CLIP-I ↑", "Face Sim. ↑", *(["FaceNet ↑"] if facenet else []), "Face det. ↑",
            "s/img ↓"]
    lines = ["# Evaluation", "", *notes, ""] if notes else ["# Evaluation", ""]
    for subset in dict.fromkeys(s.subset for s in summaries):
        rows = [s for s in summaries if s.subset == subset]
        lines += [f"## {SUBSET_TITLES.get(subset, subset.capitalize() + ' prompts')} ({rows[0].images} images per "
                  "method)", "", "| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1))
                  + " |"]
        for s in rows:
            cells = [labels.get(s.method, s.method), _number(s.clip_t), _number(s.clip_i), _number(s.face_sim),
                     *([_number(s.facenet_sim)] if facenet else []), _number(s.face_detected_rate, 0, "%"),
                     _number(s.seconds_per_image, 2)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# --- the runner ---------------------------------------------------------------------------------------------------


@dataclass
class _Reference:
    subject: Subject
    photo: Image.Image
    features: Any  # IdentityFeatures for id_embeds (None when only "text" runs)
    arcface: np.ndarray
    facenet: np.ndarray | None
    clip: torch.Tensor  # [1, D]


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
    output = pipe(prompt, id_embeds=None if method == "text" else features, method=method, generator=generator,
                  output_type="pil", **knobs)
    return output.images[0], time.perf_counter() - started  # PIL output: the GPU work has finished


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "identity"


def _grid(reference: _Reference, prompts: Sequence[str], methods: Sequence[str], cells: dict, captions: dict,
          labels: dict[str, str], seed: int) -> Image.Image:
    """Rows = prompts, columns = the reference photo (first row only) then the methods."""
    side = min(GRID_CELL, max(max(im.size) for im in cells.values()))
    fit = lambda im: ImageOps.contain(im.convert("RGB"), (side, side))  # noqa: E731
    rows = [[fit(reference.photo) if r == 0 else None] + [fit(cells[r, m]) if (r, m) in cells else None
                                                          for m in methods] for r in range(len(prompts))]
    short = [p if len(p) <= 70 else p[:67] + "..." for p in prompts]
    return labelled_grid(
        rows, row_labels=short, col_labels=["Reference"] + [labels.get(m, m) for m in methods],
        captions=[[""] + [captions.get((r, m), "") for m in methods] for r in range(len(prompts))],
        title=f"{reference.subject.name} ({reference.subject.class_word}) · seed {seed} · captions: CLIP-T, CLIP-I, "
              "face similarity",
    )


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
    methods, seeds = list(methods), [int(s) for s in seeds]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"Methods must be some of {', '.join(METHODS)}; got {', '.join(unknown) or 'none'}.")
    if not seeds or not identities or not prompts:
        raise ValueError("An evaluation needs at least one seed, one identity and one prompt.")
    analyzer = face_analyzer if face_analyzer is not None else getattr(pipe, "face_analyzer", None)
    if analyzer is None:
        raise ValueError("The evaluation needs a face analyzer (the pipeline has none): pass face_analyzer=.")
    labels = {**METHOD_LABELS, **(labels or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    references = _references(pipe, scorer, analyzer, facenet, identities, any(m != "text" for m in methods))

    if warmup:  # first calls pay for kernel selection and allocation; keep that out of s/img
        first = references[0]
        for method in methods:
            _generate(pipe, method, prompts[0].text(first.subject.class_word), first.features, seeds[0],
                      {**knobs, "num_inference_steps": 1})

    columns = [f.name for f in dataclasses.fields(ImageRecord) if facenet is not None or f.name != "facenet_sim"]
    records: list[ImageRecord] = []
    grid_cells: dict[tuple[int, str], Image.Image] = {}
    grid_captions: dict[tuple[int, str], str] = {}
    total = len(references) * len(prompts) * len(methods) * len(seeds)
    with open(out_dir / "per_image.csv", "w", newline="", encoding="utf-8") as handle:
        # Written row by row: a run stopped half-way still leaves every score it made.
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for ref_index, ref in enumerate(references):
            for p_index, prompt in enumerate(prompts):
                text = prompt.text(ref.subject.class_word)
                text_embed = scorer.text_embeds([text])
                for method in methods:
                    for seed in seeds:
                        image, seconds = _generate(pipe, method, text, ref.features, seed, knobs)
                        embed = scorer.image_embeds([image])
                        face = largest_face(analyzer, image)
                        relative = Path("images") / _slug(ref.subject.name) / method / f"p{p_index:02d}-seed{seed}.png"
                        save_png(image, out_dir / relative, {"software": SOFTWARE, "prompt": text, "seed": seed,
                                                             "method": method, "identity": ref.subject.name,
                                                             "evaluation": {k: v for k, v in knobs.items()
                                                                            if isinstance(v, int | float | str)}})
                        record = ImageRecord(
                            identity=ref.subject.name, class_word=ref.subject.class_word, prompt_index=p_index,
                            prompt_kind=prompt.kind, prompt=text, method=method, seed=seed,
                            clip_t=float(clip_text_score(embed, text_embed)[0]),
                            clip_i=float(clip_image_score(embed, ref.clip)[0]),
                            face_detected=face is not None,
                            face_sim=face_score(None if face is None else face.embedding, ref.arcface),
                            facenet_sim=face_score(facenet.embed(face), ref.facenet)
                            if face is not None and facenet is not None else None,
                            seconds=seconds, image=relative.as_posix(),
                        )
                        records.append(record)
                        writer.writerow({k: _csv_value(v) for k, v in dataclasses.asdict(record).items()})
                        handle.flush()
                        if ref_index == 0 and seed == seeds[0]:
                            grid_cells[p_index, method] = image
                            grid_captions[p_index, method] = (
                                f"T {record.clip_t:.1f} · I {record.clip_i:.1f} · face "
                                + ("n/a" if record.face_sim is None else f"{record.face_sim:.1f}"))
                        if on_image is not None:
                            on_image(len(records), total, record)

    summaries = summarize(records, methods)
    files = {name.split(".")[0]: out_dir / name for name in OUTPUTS}
    _write_summary(files["summary"], summaries, facenet is not None)
    table = markdown_table(summaries, labels, facenet is not None, notes)
    files["table"].write_text(table, encoding="utf-8")
    first = references[0]
    _grid(first, [p.text(first.subject.class_word) for p in prompts], methods, grid_cells, grid_captions,
          labels, seeds[0]).save(files["grid"])
    files["run"].write_text(json.dumps({
        "software": SOFTWARE,
        "methods": methods, "seeds": seeds, "knobs": {k: _json_value(v) for k, v in knobs.items()},
        "prompts": [dataclasses.asdict(p) for p in prompts],
        "identities": [{"name": r.subject.name, "class": r.subject.class_word,
                        "photo": str(r.subject.photo) if isinstance(r.subject.photo, str | Path) else "(image)"}
                       for r in references],
        "clip_model": scorer.name,
        "face_pack": str(getattr(analyzer, "pack", "unknown")),
        "facenet": facenet is not None,
        "weights": {k: _json_value(v) for k, v in (getattr(pipe, "weights_info", None) or {}).items()},
        "conventions": CONVENTIONS,
    }, indent=2), encoding="utf-8")
    files["images"] = out_dir / "images"
    return EvaluationSummary(summaries, records, table, out_dir, files)


CONVENTIONS = {
    "scale": "every similarity is 100 x cosine",
    "clip_t": "scoring-CLIP image embedding of the output vs text embedding of its prompt ({class} filled in)",
    "clip_i": "scoring-CLIP image embedding of the output vs that of the whole reference photo",
    "face_sim": "ArcFace cosine, largest usable face of the output vs the reference's largest face; mean over "
                "outputs with a face (face_sim_all counts outputs without one as 0)",
    "facenet_sim": "FaceNet (VGGFace2) cosine on the same aligned faces, when facenet-pytorch is installed",
    "face_detected_rate": "percent of outputs in which the face analyzer finds a usable face",
    "seconds_per_image": "one pipeline call for one image, identity precomputed, decode included, after warm-up",
}


def _csv_value(value):
    if value is None:
        return ""
    return round(value, 4) if isinstance(value, float) else value


def _json_value(value):
    return value if isinstance(value, int | float | str | bool) or value is None else str(value)


def _write_summary(path: Path, summaries: Sequence[MethodSummary], facenet: bool) -> None:
    columns = [f.name for f in dataclasses.fields(MethodSummary) if facenet or f.name != "facenet_sim"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for item in summaries:
            writer.writerow({k: _csv_value(v) for k, v in dataclasses.asdict(item).items()})


# --- the command --------------------------------------------------------------------------------------------------


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
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncancelled (per_image.csv holds every image scored so far)", file=sys.stderr)
        return 130


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _run(args: argparse.Namespace, subjects: list[Subject], prompts: list[EvalPrompt]) -> int:
    from ..models.engines import load_engine_from_args
    from ..service.request import native_size

    # The scorer before the pipeline: it is the file most likely to be missing, and it loads in seconds.
    if args.clip_model is None and args.engine == "tiny":
        scorer = tiny_clip_scorer()
    else:
        scorer = ClipScorer.from_pretrained(args.clip_model or DEFAULT_CLIP_MODEL)
    facenet = FaceNetEmbedder.load() if args.facenet == "auto" else None
    engine = load_engine_from_args(args)
    pipe = engine.pipe
    device = pipe._execution_device
    scorer.to(device, torch.float16 if device.type != "cpu" else torch.float32)  # scores are cosines: fp16 is plenty
    if facenet is not None:
        facenet.model.to(device)
    side = native_size(pipe)
    knobs = dict(
        num_inference_steps=args.steps or engine.steps,
        guidance_scale=engine.guidance if args.guidance is None else args.guidance,
        width=args.width or side, height=args.height or side, id_scale=args.id_scale,
        semantic_scale=args.semantic_scale, style_strength=args.style_strength,
        negative_prompt=args.negative_prompt,
    )
    info = getattr(pipe, "weights_info", None) or {}
    labels = {"adapter": f"Adapter baseline ({info['title']})"} if info.get("title") else {}
    notes = [
        f"Engine: {engine.name}" + (" (random weights: these numbers check the plumbing only)" if engine.banner else "")
        + f" · scoring CLIP: {scorer.name} · face analyzer: {getattr(engine.face_analyzer, 'pack', 'unknown')}",
        f"{_count(len(subjects), 'identity', 'identities')} × {_count(len(prompts), 'prompt')} × "
        f"{_count(len(args.seeds), 'seed')} · "
        f"{knobs['num_inference_steps']} steps · guidance {knobs['guidance_scale']:g} · "
        f"{knobs['width']}×{knobs['height']} px",
        "Similarities are 100 × cosine. Face Sim. averages the images with a face; Face det. is the share that "
        "has one. s/img: one image per pipeline call, after an untimed warm-up.",
    ]

    def progress(done: int, total: int, record: ImageRecord) -> None:
        face = "no face" if record.face_sim is None else f"face {record.face_sim:.1f}"
        print(f"[{done}/{total}] {record.identity} · {record.method} · p{record.prompt_index:02d} seed "
              f"{record.seed}: CLIP-T {record.clip_t:.1f} · CLIP-I {record.clip_i:.1f} · {face} · "
              f"{record.seconds:.1f} s", file=sys.stderr, flush=True)

    summary = evaluate(
        pipe, scorer, subjects, prompts, args.methods, args.seeds, args.out, face_analyzer=engine.face_analyzer,
        facenet=facenet, warmup=args.warmup, labels=labels, notes=notes, on_image=progress, **knobs,
    )
    print(summary.table)
    for name in ("table", "summary", "per_image", "grid", "run"):
        print(f"{name}: {summary.files[name]}")
    return 0
