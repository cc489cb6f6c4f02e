"""Saving: our metadata (prompt, negative, seed, every setting, method, model ids) in each PNG, and nothing of the
input photo's EXIF/GPS; reading it back to reproduce an image."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

if TYPE_CHECKING:  # only for annotations: the runner imports this module
    from .comparison import CompareResult
    from .runner import GeneratedImage

SOFTWARE = "infinite-id"
METADATA_KEY = "infinite_id"  # PNG text chunk holding our JSON metadata
METADATA_VERSION = 2  # 2: lora_scale, adain_cross and clip_channel_order are recorded (issue 14)

def save_png(image: Image.Image, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``image`` as PNG with our metadata as text chunks, and nothing else of any source file's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if metadata:
        info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
        info.add_text("parameters", _parameters_text(metadata))  # the line other SD tools display
    info.add_text("Software", SOFTWARE)
    clean = Image.frombytes("RGB", image.size, image.convert("RGB").tobytes())  # no EXIF/GPS/ICC carried over
    clean.save(path, format="PNG", pnginfo=info)
    return path


def _parameters_text(meta: dict[str, Any]) -> str:
    settings = [
        ("Steps", meta.get("num_inference_steps")), ("CFG scale", meta.get("guidance_scale")),
        ("Seed", meta.get("seed")), ("Size", f"{meta.get('width')}x{meta.get('height')}"),
        ("Method", meta.get("method")), ("ID scale", meta.get("id_scale")),
        ("Semantic scale", meta.get("semantic_scale")), ("Style strength", meta.get("style_strength")),
        ("Style", meta.get("style")), ("Model", (meta.get("models") or {}).get("base_model")),
    ]
    text = f"{meta.get('prompt', '')}\nNegative prompt: {meta.get('negative_prompt', '')}\n"
    return text + ", ".join(f"{k}: {v}" for k, v in settings if v is not None)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Our metadata from a PNG written by ``save_png`` (an empty dict for any other image)."""
    with Image.open(path) as image:
        raw = getattr(image, "text", {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def file_stem(stem: str, method: str) -> str:
    """``{stem}-{method}``, or ``stem`` alone when it already names the method ("infinite-id" with the method
    "infinite-id", "text-stream" with "text"): a file name says each thing once."""
    return stem if f"-{method}-" in f"-{stem}-" else f"{stem}-{method}"


def save_images(images: Sequence[GeneratedImage], folder: str | Path, stem: str = "infinite-id") -> list[Path]:
    """Save each image as ``{stem}-{method}-{seed}-{n}.png`` in ``folder`` (the method once: ``file_stem``); sets
    and returns their paths."""
    folder = Path(folder)
    paths = []
    for n, item in enumerate(images):
        method = item.metadata.get("method", "image")
        path = folder / f"{file_stem(stem, method)}-{item.seed}-{n}.png"
        item.path = save_png(item.image, path, item.metadata)
        paths.append(item.path)
    return paths


def save_comparison(result: CompareResult, folder: str | Path, stem: str = "compare") -> tuple[Path, list[Path]]:
    """The grid (its metadata lists every cell's) and each cell, as PNGs in ``folder``."""
    paths = save_images(result.cells, folder, stem=stem)
    metadata = {"software": SOFTWARE, "version": METADATA_VERSION, "grid": result.title,
                "cells": [cell.metadata for cell in result.cells]}
    grid = save_png(result.grid, Path(folder) / f"{stem}-grid-{result.seed}.png", metadata)
    return grid, paths
