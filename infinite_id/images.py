"""Safe image ingestion: whatever a person uploads becomes an upright RGB PIL image, or a plain-language error.

The order matters for safety: size of the file, then the header (format allowlist, pixel ceiling, shape), and
only then are pixels decoded. A decompression bomb is rejected from its header, before any memory is spent.
"""

from __future__ import annotations

import functools
import io
import os
from typing import IO, Union

import numpy as np
from PIL import Image

from .config import SETTINGS, ImageLimits

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], Image.Image]

# EXIF orientation -> the operation that makes the stored pixels upright (the same table as ImageOps.exif_transpose).
_ORIENTATION = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}
_EXIF_ORIENTATION_TAG = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class InvalidImageError(ValueError):
    """The upload is not a photo we can use. The message is meant for the person who uploaded it."""


def load_image(source: ImageSource, limits: ImageLimits | None = None) -> Image.Image:
    """Decode ``source`` (a path, raw bytes, a binary file object or a PIL image) into an upright RGB image.

    Raises ``InvalidImageError`` (a ``ValueError``) with a sentence a person understands for anything unusable:
    not an image, a format outside the allowlist, damaged or truncated data, a decompression bomb, an image too
    small or too elongated to hold a face.
    """
    limits = limits or SETTINGS.images
    if _already_loaded(source):
        # This function's own output (or an in-memory RGB image): decoding or copying it again would only cost
        # time, e.g. when the identity cache hands its photo to the face analyzer.
        _check_geometry(source.size, limits)
        return source
    if isinstance(source, Image.Image):
        image = source
        # An image opened elsewhere may still be lazy; hold it to the same allowlist as an upload.
        if image.format is not None and image.format.upper() not in {f.upper() for f in limits.formats}:
            raise InvalidImageError(_unsupported_message(limits))
    else:
        image = _open(_read_bytes(source, limits), limits)
    _check_geometry(image.size, limits)
    try:
        image.load()  # the first (and only) pixel decode; for animations this is the first frame
        orientation = _orientation(image)
        rgb = _to_rgb(image)
    except InvalidImageError:
        raise
    except Exception as error:  # a decoder fed hostile bytes can fail in many ways; each means "damaged file"
        raise InvalidImageError(_damaged_message()) from error
    for op in _ORIENTATION.get(orientation, ()):
        rgb = rgb.transpose(op)
    # A fresh image: no EXIF left to rotate it a second time downstream, no GPS or other metadata carried along.
    rgb.info = {}
    return rgb


def _already_loaded(source: ImageSource) -> bool:
    """An upright RGB image in memory with nothing left to apply: no file format behind it, no EXIF."""
    return isinstance(source, Image.Image) and source.mode == "RGB" and source.format is None and not source.info


def _allowed_formats(limits: ImageLimits) -> tuple[str, ...]:
    """The configured formats that have an opener here. MPO has none of its own: the JPEG opener returns MPO
    files (multi-picture JPEGs from some cameras) by itself, so allowing JPEG allows them."""
    wanted = {f.upper() for f in limits.formats}
    if "HEIF" in wanted:
        _register_heif()
    Image.init()
    return tuple(name for name in Image.OPEN if name in wanted)


@functools.cache
def _register_heif() -> bool:
    """HEIC (iPhone photos) is read only where pillow-heif is installed; it registers a Pillow plugin once."""
    if "HEIF" in Image.OPEN:
        return True
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return "HEIF" in Image.OPEN


def _unsupported_message(limits: ImageLimits) -> str:
    return f"This file is not a photo we can read. Please upload a {_friendly_formats(limits)} image."


def _friendly_formats(limits: ImageLimits) -> str:
    """The allowed formats a person knows by name (GIF and MPO are accepted but not worth advertising)."""
    allowed = _allowed_formats(limits)
    names = [
        name for fmt, name in (("JPEG", "JPEG"), ("PNG", "PNG"), ("WEBP", "WebP"), ("HEIF", "HEIC")) if fmt in allowed
    ]
    if len(names) <= 1:
        return names[0] if names else "JPEG"
    return ", ".join(names[:-1]) + " or " + names[-1]


def _read_bytes(source: ImageSource, limits: ImageLimits) -> bytes:
    """The upload's bytes, refusing oversized files before reading them."""
    max_bytes = limits.max_file_bytes
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            size = os.path.getsize(source)
            if size > max_bytes:
                raise InvalidImageError(_too_big_file_message(size, max_bytes))
            with open(source, "rb") as handle:
                data = handle.read(max_bytes + 1)
        except InvalidImageError:
            raise
        except FileNotFoundError as error:
            raise InvalidImageError("The photo could not be found. Please upload it again.") from error
        except OSError as error:
            raise InvalidImageError("The photo could not be read. Please upload it again.") from error
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
        if not isinstance(data, bytes):
            raise TypeError("load_image needs a file opened in binary mode ('rb').")
    else:
        raise TypeError(f"load_image takes a path, bytes, a binary file or a PIL image, not {type(source).__name__}.")
    if len(data) > max_bytes:
        raise InvalidImageError(_too_big_file_message(len(data), max_bytes))
    if not data:
        raise InvalidImageError(f"The file is empty. Please upload a photo ({_friendly_formats(limits)}).")
    return data


def _too_big_file_message(size: int, max_bytes: int) -> str:
    return (
        f"The file is too large ({size / 2**20:.0f} MB). Please upload a photo smaller than {max_bytes / 2**20:.0f} MB."
    )


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Parse the header only, with nothing but the allowlisted decoders."""
    try:
        return Image.open(io.BytesIO(data), formats=list(_allowed_formats(limits)))
    except Image.DecompressionBombError as error:
        # Pillow's own hard limit (twice MAX_IMAGE_PIXELS) fires inside open(); same answer as ours.
        raise InvalidImageError(
            f"This image is too large. Please upload a photo of at most {limits.max_pixels / 1e6:.0f} megapixels."
        ) from error
    except Exception as error:  # UnidentifiedImageError, or a header parser tripping on garbage
        if _has_allowed_signature(data, limits):
            raise InvalidImageError(_damaged_message()) from error
        raise InvalidImageError(_unsupported_message(limits)) from error


def _has_allowed_signature(data: bytes, limits: ImageLimits) -> bool:
    """Starts like an allowed format (so it is a damaged photo rather than some other kind of file)."""
    for name in _allowed_formats(limits):
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(data[:16]) is True:
                return True
        except Exception:
            continue
    return False


def _damaged_message() -> str:
    return (
        "This photo looks damaged or incomplete (perhaps the upload was cut off). "
        "Please upload it again or choose another photo."
    )


def _check_geometry(size: tuple[int, int], limits: ImageLimits) -> None:
    """Pixel ceiling and shape, from the header: nothing has been decoded yet."""
    width, height = size
    if width * height > limits.max_pixels:
        raise InvalidImageError(
            f"This image is too large ({width} x {height} pixels, {width * height / 1e6:.0f} megapixels). "
            f"Please upload a photo of at most {limits.max_pixels / 1e6:.0f} megapixels."
        )
    if min(width, height) < limits.min_side:
        raise InvalidImageError(
            f"This image is too small ({width} x {height} pixels) to show a face. "
            f"Please upload a photo at least {limits.min_side} pixels on each side."
        )
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise InvalidImageError(
            f"This image is too long and thin ({width} x {height} pixels). Please upload a photo that is at most "
            f"{limits.max_aspect_ratio:g} times longer than it is wide."
        )


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # broken EXIF is common in the wild and never worth refusing a photo over
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """Every colour mode the allowlisted formats produce, converted the way a person would expect to see it."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert() clips 16-bit values at 255 (a white picture); scale the full range down instead.
        values = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette is not None and image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in _ALPHA_MODES:
        # Transparent areas become white (how a browser shows them on a page), not black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV, F: Pillow's conversions are the right ones.
    return image.convert("RGB")
