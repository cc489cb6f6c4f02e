"""Safe ingestion: a corpus of bad and awkward uploads, generated here. Each gives an upright RGB image or an
InvalidImageError with a readable message; nothing else ever escapes."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infinite_id.config import ImageLimits
from infinite_id.images import InvalidImageError, load_image

REPO = Path(__file__).resolve().parents[1]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bilevel_png(width: int, height: int) -> bytes:
    """An all-black 1-bit PNG, compressed row by row: a few KB on disk, ``width * height`` pixels once decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def upright_photo(size=(120, 80)) -> Image.Image:
    """A photo whose top-left corner is red and bottom-right corner is blue: orientation is visible."""
    image = Image.new("RGB", size, (128, 128, 128))
    w, h = size
    image.paste((255, 0, 0), (0, 0, w // 3, h // 3))
    image.paste((0, 0, 255), (w - w // 3, h - h // 3, w, h))
    return image


def assert_rgb(image: Image.Image, size: tuple[int, int] | None = None) -> None:
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    if size is not None:
        assert image.size == size


def assert_close(pixel, expected, tolerance=12):
    assert all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected)), (pixel, expected)


def jpeg_bytes() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise), "JPEG", quality=90)


# --- not images, or not allowed --------------------------------------------------------------------------------

BAD_FILES = {
    "empty.jpg": b"",
    "random.jpg": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "notes.txt": b"just some text, not a photo\n",
    "page.html": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
    "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><circle r="40"/></svg>',
    "document.pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
    "scan.jpg": encode(Image.new("RGB", (300, 200), (10, 20, 30)), "TIFF"),  # a TIFF renamed .jpg
    "bitmap.png": encode(Image.new("RGB", (300, 200)), "BMP"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_non_photos_are_rejected_by_content_not_name(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    for source in (path, str(path), BAD_FILES[name], io.BytesIO(BAD_FILES[name])):
        with pytest.raises(InvalidImageError) as info:
            load_image(source)
        message = str(info.value)
        assert message.endswith(".") and ("JPEG" in message or "empty" in message)


def test_empty_file_says_it_is_empty():
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(b"")


def test_missing_path_is_a_readable_error(tmp_path):
    with pytest.raises(InvalidImageError, match="could not be found"):
        load_image(tmp_path / "nope.jpg")


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(b"\xff\xd8\xff" + b"\0" * 2048)
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(path, limits=ImageLimits(max_file_bytes=1024))


def test_not_a_source_is_a_type_error():
    with pytest.raises(TypeError):
        load_image(12345)


# --- bombs and shapes ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("megapixels", [50, 100, 200])
def test_decompression_bombs_are_refused_from_the_header(megapixels):
    side = int((megapixels * 1e6) ** 0.5)
    data = bilevel_png(side, side)
    assert len(data) < 100_000  # a few KB that would decode to `megapixels` million pixels
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(data)


def test_bomb_rejection_spends_no_memory_on_pixels(tmp_path):
    """100 MP of 1-bit PNG decodes to >= 100 MB in Pillow (a byte per pixel) and 300 MB as RGB. Measured in a fresh
    process, the peak resident memory must barely move while the bomb is refused."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bilevel_png(10_000, 10_000))
    # The child imports the images module without running the package's __init__ (which loads torch and
    # diffusers): a bare package object pointing at the source folder is enough for its relative imports.
    script = f"""
import json, resource, sys, types, warnings
warnings.simplefilter("ignore")
package = types.ModuleType("infinite_id")
package.__path__ = [{str(REPO / "infinite_id")!r}]
sys.modules["infinite_id"] = package
from infinite_id.images import load_image, InvalidImageError
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
load_image({str(tmp_path / "warm.png")!r})  # import every lazily loaded plugin first
before = peak()
try:
    load_image({str(path)!r})
    outcome = "loaded"
except InvalidImageError:
    outcome = "refused"
print(json.dumps({{"outcome": outcome, "delta": peak() - before}}))
"""
    upright_photo((100, 100)).save(tmp_path / "warm.png")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["outcome"] == "refused"
    assert report["delta"] < 20 * 2**20, report


@pytest.mark.parametrize("size", [(1, 4000), (4000, 1), (100, 1000), (8, 8), (63, 300), (300, 63)])
def test_tiny_and_elongated_images_are_refused(size):
    data = encode(Image.new("RGB", size, (200, 100, 50)), "PNG")
    with pytest.raises(InvalidImageError, match="too small|long and thin"):
        load_image(data)


def test_limits_come_from_settings_and_can_be_overridden():
    data = encode(Image.new("RGB", (800, 100)), "PNG")
    load_image(data)  # 8:1 is the default limit, allowed
    with pytest.raises(InvalidImageError, match="4 times longer"):
        load_image(data, limits=ImageLimits(max_aspect_ratio=4.0))


# --- orientation and colour modes ------------------------------------------------------------------------------

# The transpose that turns an upright picture into what a camera stores for each EXIF orientation.
STORED_AS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied(orientation):
    upright = upright_photo((120, 80))
    stored = upright.transpose(STORED_AS[orientation]) if orientation in STORED_AS else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = load_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert_rgb(image, (120, 80))
    assert_close(image.getpixel((5, 5)), (255, 0, 0), tolerance=40)
    assert_close(image.getpixel((114, 74)), (0, 0, 255), tolerance=40)
    # No EXIF survives that could rotate it a second time downstream.
    assert image.getexif().get(0x0112) is None and "exif" not in image.info


def test_pil_input_is_also_made_upright_and_not_mutated():
    exif = Image.Exif()
    exif[0x0112] = 6
    opened = Image.open(io.BytesIO(encode(upright_photo().transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)))
    image = load_image(opened)
    assert image.size == (120, 80) and opened.size == (80, 120)
    assert_close(image.getpixel((5, 5)), (255, 0, 0), tolerance=40)


def test_cmyk_jpeg_becomes_the_right_rgb():
    cmyk = Image.new("CMYK", (100, 100), (0, 255, 255, 0))  # pure red in print colours
    image = load_image(encode(cmyk, "JPEG", quality=95))
    assert_rgb(image, (100, 100))
    assert_close(image.getpixel((50, 50)), (255, 0, 0), tolerance=10)


def test_sixteen_bit_grey_png_keeps_its_tones():
    values = np.zeros((80, 90), dtype=np.uint16)
    values[:, 30:60] = 32768
    values[:, 60:] = 65535
    source = Image.fromarray(values)
    assert source.mode.startswith("I;16")
    image = load_image(encode(source, "PNG"))
    assert_rgb(image, (90, 80))
    assert image.getpixel((10, 10)) == (0, 0, 0)
    assert_close(image.getpixel((45, 10)), (128, 128, 128), tolerance=1)  # Pillow's convert() would say 255
    assert image.getpixel((80, 10)) == (255, 255, 255)


def test_palette_png_with_transparency_is_composited_on_white():
    palette_image = Image.new("P", (100, 100), 0)
    palette_image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette_image.paste(1, (50, 0, 100, 100))
    data = encode(palette_image, "PNG", transparency=0)  # index 0 (black) is transparent
    image = load_image(data)
    assert_rgb(image, (100, 100))
    assert image.getpixel((10, 10)) == (255, 255, 255)
    assert image.getpixel((90, 10)) == (200, 30, 30)


def test_fully_transparent_rgba_is_white():
    image = load_image(encode(Image.new("RGBA", (100, 100), (10, 200, 10, 0)), "PNG"))
    assert_rgb(image, (100, 100))
    assert np.all(np.asarray(image) == 255)


def test_half_transparent_rgba_blends_with_white():
    image = load_image(encode(Image.new("RGBA", (100, 100), (0, 0, 0, 128)), "PNG"))
    assert_close(image.getpixel((0, 0)), (127, 127, 127), tolerance=2)


@pytest.mark.parametrize(
    "mode, fill, expected", [("L", 77, (77, 77, 77)), ("LA", (77, 0), (255, 255, 255)), ("1", 1, (255, 255, 255))]
)
def test_grey_modes(mode, fill, expected):
    image = load_image(encode(Image.new(mode, (100, 100), fill), "PNG"))
    assert_rgb(image, (100, 100))
    assert image.getpixel((3, 3)) == expected


def test_webp_is_allowed():
    image = load_image(encode(upright_photo(), "WEBP", lossless=True))
    assert_rgb(image, (120, 80))
    assert image.getpixel((5, 5)) == (255, 0, 0)


def test_mpo_multi_picture_jpeg_gives_its_first_picture():
    buffer = io.BytesIO()
    first, second = upright_photo(), Image.new("RGB", (120, 80), (0, 255, 0))
    first.save(buffer, "MPO", save_all=True, append_images=[second], quality=95)
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    for source in (buffer.getvalue(), Image.open(io.BytesIO(buffer.getvalue()))):
        image = load_image(source)
        assert_rgb(image, (120, 80))
        assert_close(image.getpixel((5, 5)), (255, 0, 0), tolerance=40)


def test_pil_images_of_formats_off_the_allowlist_are_refused():
    tiff = Image.open(io.BytesIO(encode(upright_photo(), "TIFF")))
    with pytest.raises(InvalidImageError, match="not a photo we can read"):
        load_image(tiff)
    assert_rgb(load_image(upright_photo()), (120, 80))  # made in memory: no format, accepted


def test_heic_is_read_when_pillow_heif_is_installed():
    pytest.importorskip("pillow_heif")
    import pillow_heif

    pillow_heif.register_heif_opener()
    data = encode(upright_photo(), "HEIF", quality=95)
    image = load_image(data)
    assert_rgb(image, (120, 80))
    assert_close(image.getpixel((5, 5)), (255, 0, 0), tolerance=40)
    assert_close(image.getpixel((114, 74)), (0, 0, 255), tolerance=40)
    # Taken off the allowlist (as where pillow-heif is missing), the same file is refused.
    with pytest.raises(InvalidImageError, match="JPEG, PNG or WebP"):
        load_image(data, limits=ImageLimits(formats=("JPEG", "PNG", "WEBP", "GIF")))


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (100, 100), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = load_image(buffer.getvalue())
    assert_rgb(image, (100, 100))
    assert_close(image.getpixel((50, 50)), (255, 0, 0), tolerance=3)


def test_animated_png_gives_its_first_frame():
    frames = [Image.new("RGB", (100, 100), colour) for colour in [(0, 255, 0), (255, 0, 0)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    assert load_image(buffer.getvalue()).getpixel((50, 50)) == (0, 255, 0)


# --- truncated files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_jpeg_is_refused(fraction):
    data = jpeg_bytes()
    with pytest.raises(InvalidImageError, match="damaged or incomplete"):
        load_image(data[: int(len(data) * fraction)])
    assert_rgb(load_image(data), (300, 200))  # the whole file is fine
    assert not __import__("PIL.ImageFile").ImageFile.LOAD_TRUNCATED_IMAGES


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_png_is_refused(fraction):
    noise = np.random.default_rng(2).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    with pytest.raises(InvalidImageError, match="damaged or incomplete"):
        load_image(data[: int(len(data) * fraction)])


# --- the whole corpus: only two possible outcomes ---------------------------------------------------------------


def corpus() -> dict[str, bytes]:
    items = dict(BAD_FILES)
    data = jpeg_bytes()
    items.update({f"cut{p}.jpg": data[: len(data) * p // 100] for p in (1, 10, 50, 90, 99)})
    items["photo.jpg"] = data
    items["flipped-bits.jpg"] = bytes(b ^ 0x55 if i % 97 == 50 else b for i, b in enumerate(data))
    items["bomb.png"] = bilevel_png(12_000, 12_000)
    items["wide.png"] = encode(Image.new("RGB", (4000, 1)), "PNG")
    items["tiny.png"] = encode(Image.new("RGB", (8, 8)), "PNG")
    return items


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", sorted(corpus()))
def test_every_upload_is_either_a_good_image_or_an_invalid_image_error(name):
    try:
        image = load_image(corpus()[name])
    except InvalidImageError as error:
        assert str(error)[0].isupper() and str(error).endswith(".")
    else:
        assert_rgb(image)
