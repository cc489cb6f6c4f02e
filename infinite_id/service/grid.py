"""Labelled image grids: row labels on the left, column labels on top, an optional caption under each cell.

Used by ``compare`` (methods, strength grids, styles) and meant for evaluation tables too. Small cells (the tiny
engine's 64 px images) are enlarged with nearest-neighbour so the labels stay readable next to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)
MIN_CELL = 256  # cells are shown at least this large (pixels, shorter side)
PAD = 8


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font
    except (TypeError, OSError):  # a Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (labels like "identity 1.0 / semantic 2.0" must fit a cell)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and _text_size(draw, candidate, font)[0] > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def labelled_grid(
    cells: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    captions: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
) -> Image.Image:
    """One RGB image of ``cells`` (rows of images; None leaves a blank cell), labelled.

    Every cell is drawn at the size of the largest one, enlarged to at least ``MIN_CELL`` pixels.
    """
    rows = [list(r) for r in cells]
    if not rows or not any(rows):
        raise ValueError("A grid needs at least one image.")
    n_cols = max(len(r) for r in rows)
    images = [im for r in rows for im in r if im is not None]
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    zoom = max(1, -(-MIN_CELL // min(cell_w, cell_h)))  # ceil division: integer zoom keeps pixels crisp
    cell_w, cell_h = cell_w * zoom, cell_h * zoom

    font = _font(max(14, min(28, cell_w // 14)))
    small = _font(max(12, min(22, cell_w // 18)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag", font)[1] + 4
    small_h = _text_size(probe, "Ag", small)[1] + 4

    label_w = 0
    if row_labels:
        label_w = min(cell_w, max(_text_size(probe, line, font)[0] for label in row_labels
                                  for line in _wrap(probe, label, font, cell_w))) + 2 * PAD
    col_lines = [_wrap(probe, label, font, cell_w) for label in col_labels] if col_labels else []
    header_h = (max(len(lines) for lines in col_lines) * line_h + PAD) if col_lines else 0
    title_lines = _wrap(probe, title, font, label_w + n_cols * (cell_w + PAD)) if title else []
    title_h = len(title_lines) * line_h + (PAD if title_lines else 0)
    caption_h = small_h if captions else 0
    row_h = cell_h + caption_h + PAD

    width = label_w + n_cols * (cell_w + PAD) + PAD
    height = title_h + header_h + len(rows) * row_h + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    y = PAD
    for line in title_lines:
        draw.text((PAD, y), line, fill=INK, font=font)
        y += line_h
    for c, lines in enumerate(col_lines):
        x = label_w + PAD + c * (cell_w + PAD)
        for k, line in enumerate(lines):
            w = _text_size(draw, line, font)[0]
            draw.text((x + (cell_w - w) // 2, title_h + PAD // 2 + k * line_h), line, fill=INK, font=font)
    for r, row in enumerate(rows):
        top = title_h + header_h + r * row_h + PAD
        if row_labels and r < len(row_labels):
            lines = _wrap(draw, row_labels[r], font, label_w - 2 * PAD)
            y0 = top + (cell_h - len(lines) * line_h) // 2
            for k, line in enumerate(lines):
                draw.text((PAD, y0 + k * line_h), line, fill=INK, font=font)
        for c, image in enumerate(row):
            x = label_w + PAD + c * (cell_w + PAD)
            if image is not None:
                shown = image.convert("RGB")
                shown = shown.resize((shown.width * zoom, shown.height * zoom), Image.Resampling.NEAREST)
                canvas.paste(shown, (x + (cell_w - shown.width) // 2, top + (cell_h - shown.height) // 2))
            if captions and r < len(captions) and c < len(captions[r]) and captions[r][c]:
                text = captions[r][c]
                w = _text_size(draw, text, small)[0]
                draw.text((x + max(0, (cell_w - w) // 2), top + cell_h + 2), text, fill=MUTED, font=small)
    return canvas
