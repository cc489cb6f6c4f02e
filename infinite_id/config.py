"""Frozen settings: limits, defaults and model locations, read once from the environment.

Every limit a user can hit lives here so the library, the app and the tests agree on one number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass(frozen=True)
class ImageLimits:
    """What an uploaded photo may be. Checked before pixels are decoded where possible."""

    max_pixels: int = 40_000_000  # a 40 MP photo is larger than any phone camera; beyond that it is a bomb
    max_file_bytes: int = 30 * 1024 * 1024
    min_side: int = 64  # smaller than this holds no usable face
    max_aspect_ratio: float = 8.0
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "HEIF", "GIF", "MPO")


@dataclass(frozen=True)
class FaceSettings:
    """Face detection: model pack, where it lives, and what counts as a usable face."""

    pack: str = "buffalo_l"
    root: str = field(default_factory=lambda: os.environ.get("INFINITE_ID_FACE_ROOT", os.path.expanduser("~/.insightface")))
    det_sizes: tuple[int, ...] = (640, 480, 320)  # multi-scale retry: 640 first, then smaller
    min_det_score: float = 0.5
    min_face_px: int = 48  # shorter side of the face box, in pixels of the uploaded photo


@dataclass(frozen=True)
class Settings:
    images: ImageLimits = field(default_factory=ImageLimits)
    faces: FaceSettings = field(default_factory=FaceSettings)
    max_prompt_chars: int = 1000


def load_settings() -> Settings:
    """Settings with environment overrides (INFINITE_ID_*)."""
    images = ImageLimits(
        max_pixels=_env_int("INFINITE_ID_MAX_PIXELS", ImageLimits.max_pixels),
        max_file_bytes=_env_int("INFINITE_ID_MAX_FILE_BYTES", ImageLimits.max_file_bytes),
        min_side=_env_int("INFINITE_ID_MIN_SIDE", ImageLimits.min_side),
        max_aspect_ratio=_env_float("INFINITE_ID_MAX_ASPECT", ImageLimits.max_aspect_ratio),
    )
    faces = FaceSettings(
        pack=os.environ.get("INFINITE_ID_FACE_PACK", FaceSettings.pack),
        min_det_score=_env_float("INFINITE_ID_MIN_DET_SCORE", FaceSettings.min_det_score),
        min_face_px=_env_int("INFINITE_ID_MIN_FACE_PX", FaceSettings.min_face_px),
    )
    return Settings(images=images, faces=faces)


SETTINGS = load_settings()
