"""What an evaluation writes: per-image records, per-method summaries, the markdown table, CSV files and the grid.

Written to the output folder: ``per_image.csv`` (row by row, as images are scored), ``summary.csv``, ``table.md``,
``grid.png`` (rows = prompts, columns = the reference photo then the methods), ``run.json`` and ``images/`` (by the
runner). Each writer takes its data as arguments, so another command can write the same files from its own records.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..service.grid import labelled_grid
from ..service.request import METHOD_LABELS
from .metrics import SCALE
from .subjects import Subject

OUTPUTS = ("per_image.csv", "summary.csv", "table.md", "grid.png", "run.json")
GRID_CELL = 384  # grid cells are shrunk to this many pixels so a 16-prompt grid of 1024 px images stays viewable
SUBSET_TITLES = {"all": "All prompts", "photo": "Raw-photo prompts", "style": "Style prompts"}

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


# --- records and summaries ----------------------------------------------------------------------------------------


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


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


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


# --- the markdown table -------------------------------------------------------------------------------------------


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


# --- CSV and JSON -------------------------------------------------------------------------------------------------


def _csv_value(value):
    if value is None:
        return ""
    return round(value, 4) if isinstance(value, float) else value


def json_value(value):
    """``value`` as JSON can hold it: numbers, strings, booleans and None as they are, anything else as its str."""
    return value if isinstance(value, int | float | str | bool) or value is None else str(value)


def _columns(row_type: type, facenet: bool) -> list[str]:
    # The FaceNet column only when FaceNet ran: an always-empty column would read as "no faces".
    return [f.name for f in dataclasses.fields(row_type) if facenet or f.name != "facenet_sim"]


@contextmanager
def record_writer(path: Path, facenet: bool) -> Iterator:
    """``with record_writer(path, facenet) as write: write(record)``: per_image.csv, one flushed row per record, so a
    run stopped half-way still leaves every score it made."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=_columns(ImageRecord, facenet), extrasaction="ignore")
        writer.writeheader()

        def write(record: ImageRecord) -> None:
            writer.writerow({k: _csv_value(v) for k, v in dataclasses.asdict(record).items()})
            handle.flush()

        yield write


def write_summary_csv(path: Path, summaries: Sequence[MethodSummary], facenet: bool) -> None:
    """summary.csv: one row per (subset, method)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=_columns(MethodSummary, facenet), extrasaction="ignore")
        writer.writeheader()
        for item in summaries:
            writer.writerow({k: _csv_value(v) for k, v in dataclasses.asdict(item).items()})


# --- the grid and the whole report --------------------------------------------------------------------------------


def grid_caption(record: ImageRecord) -> str:
    face = "n/a" if record.face_sim is None else f"{record.face_sim:.1f}"
    return f"T {record.clip_t:.1f} · I {record.clip_i:.1f} · face {face}"


def draw_grid(photo: Image.Image, subject: Subject, prompts: Sequence[str], methods: Sequence[str], cells: dict,
              captions: dict, labels: dict[str, str], seed: int) -> Image.Image:
    """Rows = prompts, columns = the reference photo (first row only) then the methods; ``cells`` and ``captions``
    are keyed by ``(prompt index, method)``."""
    side = min(GRID_CELL, max(max(im.size) for im in cells.values()))
    fit = lambda im: ImageOps.contain(im.convert("RGB"), (side, side))  # noqa: E731
    rows = [[fit(photo) if r == 0 else None] + [fit(cells[r, m]) if (r, m) in cells else None for m in methods]
            for r in range(len(prompts))]
    short = [p if len(p) <= 70 else p[:67] + "..." for p in prompts]
    return labelled_grid(
        rows, row_labels=short, col_labels=["Reference"] + [labels.get(m, m) for m in methods],
        captions=[[""] + [captions.get((r, m), "") for m in methods] for r in range(len(prompts))],
        title=f"{subject.name} ({subject.class_word}) · seed {seed} · captions: CLIP-T, CLIP-I, face similarity",
    )


def write_report(
    out_dir: Path, records: list[ImageRecord], methods: Sequence[str], grid: Image.Image, run_info: dict, *,
    labels: dict[str, str] | None = None, notes: Sequence[str] = (), facenet: bool = False,
) -> EvaluationSummary:
    """Everything but per_image.csv and the images, from the records: summary.csv, table.md, grid.png and run.json
    (``run_info`` plus these conventions)."""
    summaries = summarize(records, methods)
    files = {name.split(".")[0]: out_dir / name for name in OUTPUTS}
    write_summary_csv(files["summary"], summaries, facenet)
    table = markdown_table(summaries, labels, facenet, notes)
    files["table"].write_text(table, encoding="utf-8")
    grid.save(files["grid"])
    files["run"].write_text(json.dumps({**run_info, "conventions": CONVENTIONS}, indent=2), encoding="utf-8")
    files["images"] = out_dir / "images"
    return EvaluationSummary(summaries, records, table, out_dir, files)
