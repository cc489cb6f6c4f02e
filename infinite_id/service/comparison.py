"""Compare: the same person, prompt and seed across methods, an identity x semantic strength grid, or styles,
as one labelled grid."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from .grid import labelled_grid
from .identity import Identity
from .request import ID_SCALE_RANGE, METHOD_LABELS, SEMANTIC_SCALE_RANGE, GenerationRequest, clamped
from .runner import GeneratedImage, StepCallback, generate
from .styles import get_style

MAX_COMPARE_CELLS = 16
COMPARE_MODES = ("methods", "strengths", "styles")


MAX_AXIS_VALUES = 4  # a strength grid is at most 4 x 4 = MAX_COMPARE_CELLS images


@dataclass
class CompareResult:
    grid: Image.Image
    cells: list[GeneratedImage]
    seed: int
    seconds: float
    title: str
    notes: list[str] = field(default_factory=list)  # what was left out of the grid, and why, for the person


def parse_values(text: str | Sequence[float] | None, low: float, high: float, default: Sequence[float]) -> list[float]:
    """"0.5, 1, 1.5" -> [0.5, 1.0, 1.5], each clamped to ``[low, high]``, duplicates dropped, at most 4."""
    return _all_values(text, low, high, default)[:MAX_AXIS_VALUES]


def _all_values(text, low: float, high: float, default: Sequence[float]) -> list[float]:
    if text is None or text == "":
        items: Sequence = default
    elif isinstance(text, str):
        items = [t for t in text.replace(";", ",").replace(" ", ",").split(",") if t.strip()]
    else:
        items = text
    values: list[float] = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"{item!r} is not a number. Write strengths like: 0.5, 1, 1.5") from None
        value = round(clamped(value, default[0], low, high), 3)
        if value not in values:
            values.append(value)
    if not values:
        values = list(default)
    return values


def compare(
    pipe,
    request: GenerationRequest,
    identity: Identity | None,
    mode: str = "methods",
    *,
    styles: Sequence[str] = (),
    id_scales: Sequence[float] = (0.5, 1.0, 1.5),
    semantic_scales: Sequence[float] = (0.0, 1.0, 2.0),
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    deadline: float | None = None,
) -> CompareResult:
    """The same person, prompt and seed across methods, an identity x semantic strength grid, or styles.

    The identity is encoded once (the caller's ``Identity``) and reused in every cell; one image per cell.
    In "methods" mode the text-only image is the text stream of the Infinite-ID call: the same seed and prompt
    without the person, i.e. plain SDXL (DESIGN 2.5), so it costs no extra call.
    """
    if mode not in COMPARE_MODES:
        raise ValueError(f"The comparison must be one of {', '.join(COMPARE_MODES)}; got {mode!r}.")
    # One image per cell; only the "methods" grid shows a text stream (its first cell), so no other cell decodes one.
    request = request.replace(num_images=1, text_stream=mode == "methods").with_seed()
    if identity is None:
        raise ValueError("Upload a photo of the person to compare.")
    plan: list[tuple[int, int, GenerationRequest]] = []  # (row, col, request)
    notes: list[str] = []
    if mode == "methods":
        rows, cols = [""], [METHOD_LABELS[m] for m in ("text", "adapter", "infinite-id")]
        plan = [(0, 1, request.replace(method="adapter")), (0, 2, request.replace(method="infinite-id"))]
    elif mode == "strengths":
        ids = _axis(id_scales, ID_SCALE_RANGE, (0.5, 1.0, 1.5), "identity strengths", notes)
        sems = _axis(semantic_scales, SEMANTIC_SCALE_RANGE, (0.0, 1.0, 2.0), "semantic strengths", notes)
        rows, cols = [f"identity {v:g}" for v in ids], [f"semantic {v:g}" for v in sems]
        plan = [(r, c, request.replace(method="infinite-id", id_scale=i, semantic_scale=s))
                for r, i in enumerate(ids) for c, s in enumerate(sems)]
    else:
        if not styles:
            notes.append(f"No style was ticked, so the grid shows one style only ({request.style}).")
        names = [get_style(n).name for n in dict.fromkeys(styles or [request.style])]
        if len(names) > MAX_COMPARE_CELLS:
            raise ValueError(f"Pick at most {MAX_COMPARE_CELLS} styles to compare.")
        rows, cols = [""], names
        plan = [(0, c, request.replace(style=name)) for c, name in enumerate(names)]
    if len(plan) > MAX_COMPARE_CELLS:
        raise ValueError(f"That comparison has {len(plan)} images; the most is {MAX_COMPARE_CELLS}.")

    total = sum(r.steps for _, _, r in plan)
    grid: list[list[GeneratedImage | None]] = [[None] * len(cols) for _ in rows]
    started = time.perf_counter()
    done = 0
    for r, c, cell_request in plan:
        result = generate(pipe, cell_request, identity, on_step=None if on_step is None else
                          (lambda d, _t, base=done: on_step(base + d, total)), cancel=cancel,
                          deadline=deadline)
        done += cell_request.steps
        grid[r][c] = result.images[0]
        if mode == "methods" and result.text_images:
            grid[0][0] = result.text_images[0]
    cells: list[GeneratedImage] = []
    for r, row in enumerate(grid):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            cell.label = " / ".join(x for x in (rows[r], cols[c]) if x)
            cells.append(cell)
    prompt = request.prompt if len(request.prompt) <= 80 else request.prompt[:77] + "..."
    title = f'"{prompt}" · seed {request.seed}' + (f" · style {request.style}" if mode != "styles" else "")
    image = labelled_grid(
        [[cell.image if cell else None for cell in row] for row in grid],
        row_labels=rows if any(rows) else None,
        col_labels=cols,
        captions=[["" if cell is None else _short_similarity(cell) for cell in row] for row in grid],
        title=title,
    )
    return CompareResult(image, cells, int(request.seed), time.perf_counter() - started, title, notes)


def _axis(text, limits: tuple[float, float], default: Sequence[float], name: str, notes: list[str]) -> list[float]:
    """One axis of the strength grid; a note when values are left out (a grid holds at most 4 x 4 images)."""
    values = _all_values(text, *limits, default=default)
    if len(values) > MAX_AXIS_VALUES:
        kept = ", ".join(f"{v:g}" for v in values[:MAX_AXIS_VALUES])
        notes.append(f"{len(values)} {name} were given; the grid keeps the first {MAX_AXIS_VALUES} ({kept}), "
                     f"as it holds at most {MAX_AXIS_VALUES} x {MAX_AXIS_VALUES} = {MAX_COMPARE_CELLS} images.")
    return values[:MAX_AXIS_VALUES]


def _short_similarity(cell: GeneratedImage) -> str:
    value = cell.similarity
    return "identity n/a" if value is None else f"identity {value:.2f}"


