"""Before anyone sees an image: the optional safety check and SDXL's invisible watermark."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from .runner import GeneratedImage

# SDXL's invisible watermark: the same 48-bit message diffusers' StableDiffusionXLWatermarker embeds (dwtDct).
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = [int(bit) for bit in bin(WATERMARK_MESSAGE)[2:]]
WATERMARK_MIN_SIDE = 256  # dwtDct needs at least this; like diffusers, smaller images are left unmarked
WITHHELD_MESSAGE = ("The safety check withheld this image, so it is not shown or kept. Please try a different "
                    "prompt.")

SafetyChecker = Callable[[list[Image.Image]], Sequence[bool]]


def load_callable(reference: str) -> Callable:
    """``"package.module:function"`` -> the function (how a safety checker is named in the settings)."""
    import importlib

    module, _, name = reference.partition(":")
    if not module or not name:
        raise ValueError(f"A safety checker is named 'package.module:function', not {reference!r}.")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:  # a start-up message, not a traceback
        raise ValueError(f"The safety checker {reference!r} cannot be loaded: {error}") from error


class OutputGuard:
    """What every output goes through before it is saved or shown, both off unless configured
    (``config.ServerSettings.watermark`` / ``.safety_checker``):

    * ``safety_checker(images) -> list[bool]``: True means the image must not be shown; it is dropped, never saved.
    * ``watermark``: SDXL's invisible watermark (the ``invisible-watermark`` package), on images of 256 px and up.

    Built once at start-up, so a checker that cannot be imported or a missing watermark package stops the app
    there, not on a request. Holds no per-call state: ``screen`` returns what it keeps.
    """

    def __init__(self, watermark: bool = False, safety_checker: SafetyChecker | str | None = None):
        self.safety_checker = load_callable(safety_checker) if isinstance(safety_checker, str) else safety_checker
        self.encoder = None
        if watermark:
            try:
                from imwatermark import WatermarkEncoder
            except ImportError as error:
                raise ValueError("The invisible watermark is switched on (INFINITE_ID_WATERMARK) but the "
                                 "invisible-watermark package is not installed: pip install invisible-watermark"
                                 ) from error
            self.encoder = WatermarkEncoder()
            self.encoder.set_watermark("bits", WATERMARK_BITS)

    @classmethod
    def from_settings(cls, settings) -> OutputGuard:
        return cls(watermark=settings.watermark, safety_checker=settings.safety_checker)

    def screen(self, items: Sequence[GeneratedImage]) -> tuple[list[GeneratedImage], int]:
        """The items that may be shown (watermarked when configured) and how many were withheld."""
        items = list(items)
        kept = items
        if self.safety_checker is not None and items:
            flags = [bool(flag) for flag in self.safety_checker([item.image for item in items])]
            if len(flags) != len(items):
                raise RuntimeError(f"The safety checker answered {len(flags)} flags for {len(items)} images.")
            kept = [item for item, flagged in zip(items, flags) if not flagged]
        for item in kept:
            item.image = self.mark(item.image)
        return kept, len(items) - len(kept)

    def mark(self, image: Image.Image) -> Image.Image:
        if self.encoder is None or min(image.size) < WATERMARK_MIN_SIDE:
            return image
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        return Image.fromarray(np.ascontiguousarray(self.encoder.encode(bgr, "dwtDct")[:, :, ::-1]))


