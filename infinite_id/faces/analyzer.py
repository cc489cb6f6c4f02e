"""The face stack: detect (multi-scale, with a padding retry), select, align and embed, with insightface.

``FaceAnalyzer.analyze(image)`` returns the usable faces of a photo, largest first, each a ``FaceResult`` with the
ArcFace embedding and the two aligned crops the ID encoder needs; anything else is a ``FaceError`` whose message
a person understands. This is the only module that runs insightface; it is imported inside functions, so
importing this module costs nothing.

Models come from an insightface pack folder (``root/models/<pack>``, buffalo_l by default). Only its detector and
its recognizer are used, built with ``insightface.model_zoo.get_model`` on files checked to be there: nothing is
ever downloaded from here (``python -m infinite_id download`` does that, up front).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..config import SETTINGS, FaceSettings
from ..images import ImageSource, load_image

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 512
ARCFACE_SIZE = 112
DOWNLOAD_COMMAND = "python -m infinite_id download"


# --- errors -----------------------------------------------------------------------------------------------------


class FaceError(ValueError):
    """A photo that cannot give an identity. The message is meant for the person who uploaded it."""


class NoFaceError(FaceError):
    def __init__(self, message: str | None = None):
        super().__init__(
            message
            or "No face was found in this photo. Try a well-lit photo where the face is clearly visible "
            "and faces the camera."
        )


class FaceTooSmallError(FaceError):
    def __init__(self, face_px: float, min_px: int):
        self.face_px, self.min_px = face_px, min_px
        super().__init__(
            f"The face in this photo is too small ({face_px:.0f} pixels across; at least {min_px} are needed). "
            "Try a photo taken closer, or crop the photo around the face."
        )


class LowConfidenceError(FaceError):
    def __init__(self, score: float, min_score: float):
        self.score, self.min_score = score, min_score
        super().__init__(
            "Something like a face was found, but not clearly enough to use "
            f"(confidence {score:.2f}, at least {min_score:.2f} needed). "
            "Try a sharper, well-lit photo where the whole face is visible and faces the camera."
        )


class FaceSelectionError(FaceError):
    """A face index that does not exist (never an IndexError)."""


class FaceModelMissingError(FileNotFoundError):
    """The face model pack is not installed. A set-up problem, not a bad photo, so not a FaceError."""

    def __init__(self, message: str, folder: Path | None = None):
        self.folder = folder
        super().__init__(message)


# --- results ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FaceResult:
    """One face, in the coordinates of the (upright) photo it was found in.

    ``bbox``: x1, y1, x2, y2 (float32; may reach past the photo's edges for a face cut off by the frame).
    ``kps``: 5 x 2 keypoints (eyes, nose tip, mouth corners). ``embedding``: 512 float32, L2-normed ArcFace.
    ``arcface_crop``: the 112 x 112 aligned crop the embedding was computed from. ``clip_crop``: the aligned crop
    for the CLIP image encoder (224 x 224 by default; see docs/faces.md for the framing).
    """

    bbox: np.ndarray
    kps: np.ndarray
    det_score: float
    embedding: np.ndarray
    arcface_crop: Image.Image
    clip_crop: Image.Image
    embedding_norm: float = 1.0  # norm of the raw embedding before normalising (InstantID's adapter wants it)

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        return self.width * self.height


@dataclass(frozen=True, eq=False)
class AveragedFace:
    """Several photos of one person: the main face of each, and their renormalised mean embedding.

    ``similarities`` (each photo's face against the mean) lets a caller warn when one photo looks like someone
    else. ``clip_crops`` are for averaging CLIP features the same way (DESIGN 2.4).
    """

    faces: tuple[FaceResult, ...]
    embedding: np.ndarray
    similarities: tuple[float, ...] = field(default=())

    @property
    def clip_crops(self) -> list[Image.Image]:
        return [face.clip_crop for face in self.faces]


class Detector(Protocol):
    """What ``FaceAnalyzer`` needs from a detector: insightface ``SCRFD.detect``'s own signature and result.

    ``image_bgr``: HxWx3 uint8 BGR. Returns ``(dets, kpss)``: N x 5 (x1, y1, x2, y2, score) and N x 5 x 2.
    This is the seam where another detector can stand in (the tests plug a real MTCNN in here).
    """

    def detect(
        self, image_bgr: np.ndarray, input_size: tuple[int, int] | None = None, det_thresh: float | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass
class _Candidate:
    bbox: np.ndarray
    kps: np.ndarray
    score: float

    @property
    def short_side(self) -> float:
        return float(min(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]))

    @property
    def area(self) -> float:
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))


# --- the analyzer -----------------------------------------------------------------------------------------------


class FaceAnalyzer:
    """Detect, align and embed faces with an insightface pack.

    ``pack``: a pack name under ``root/models`` or a folder; ``root``: the insightface root (both default to
    ``SETTINGS.faces``). ``providers``: ONNX Runtime providers (CUDA first when onnxruntime-gpu can use it, else
    CPU). ``detector``: optional stand-in with SCRFD's ``detect`` (see ``Detector``); the pack then only needs
    its recognizer. ``session_options``: an ``onnxruntime.SessionOptions`` for both models (e.g. thread counts).
    Thread-safe for concurrent ``analyze`` calls: nothing per call is stored on the object.
    """

    def __init__(
        self,
        pack: str | os.PathLike[str] | None = None,
        root: str | os.PathLike[str] | None = None,
        providers: Sequence[Any] | None = None,
        *,
        detector: Detector | None = None,
        settings: FaceSettings | None = None,
        session_options: Any | None = None,
    ):
        from insightface.model_zoo import get_model

        self.settings = settings or SETTINGS.faces
        self.pack = str(pack if pack is not None else self.settings.pack)
        self.folder = resolve_pack_folder(self.pack, root if root is not None else self.settings.root)
        self.providers = list(providers) if providers is not None else default_providers()
        detector_file, recognizer_file = _find_models(self.folder, self.pack, need_detector=detector is None)
        # get_model on an existing .onnx file never downloads; it routes by input/output shapes like FaceAnalysis.
        options = {"providers": self.providers, "sess_options": session_options}
        self.recognizer = get_model(str(recognizer_file), **options)
        if type(self.recognizer).__name__ != "ArcFaceONNX":
            raise FaceModelMissingError(f"{recognizer_file} is not an ArcFace recognizer.", self.folder)
        if detector is None:
            detector = get_model(str(detector_file), **options)
            if type(detector).__name__ != "SCRFD":
                raise FaceModelMissingError(f"{detector_file} is not an SCRFD face detector.", self.folder)
            if not detector.use_kps:
                raise FaceModelMissingError(f"{detector_file} does not predict face keypoints.", self.folder)
        self.detector = detector

    def analyze(self, image: ImageSource | np.ndarray) -> list[FaceResult]:
        """All usable faces of ``image`` (anything ``load_image`` takes, or an RGB uint8 array), largest first.

        Raises ``NoFaceError``, ``FaceTooSmallError`` or ``LowConfidenceError`` when there is none, and
        ``InvalidImageError`` when the file itself is unusable.
        """
        rgb = _as_rgb(image)
        bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
        faces = self._usable_faces(bgr)
        faces.sort(key=lambda c: (c.area, c.score), reverse=True)
        return [self._describe(bgr, c) for c in faces]

    def analyze_many(self, images: Iterable[ImageSource | np.ndarray]) -> AveragedFace:
        """Several photos of the same person -> the largest face of each and the averaged identity."""
        images = list(images)
        faces = []
        for number, image in enumerate(images, start=1):
            try:
                faces.append(self.analyze(image)[0])
            except ValueError as error:  # FaceError or InvalidImageError: say which photo it was
                if len(images) > 1:
                    error.args = (f"Photo {number} of {len(images)}: {error}",)
                raise
        faces = tuple(faces)
        if not faces:
            raise NoFaceError("No photos were given. Upload one or more photos of the person.")
        embedding = average_embeddings(faces)
        return AveragedFace(faces, embedding, tuple(face_similarity(f, embedding) for f in faces))

    # -- detection -------------------------------------------------------------------------------------------

    def _usable_faces(self, bgr: np.ndarray) -> list[_Candidate]:
        """Detect with retries; return usable faces or raise the error that explains why there are none.

        Attempts, stopping at the first that finds a usable face: each detection size in turn (large faces that
        fill the frame are found at smaller sizes), then the same with a border added around the photo (tightly
        cropped selfies, where the face touches or leaves the frame).
        """
        s = self.settings
        seen: list[_Candidate] = []
        for pad in (0.0, s.pad_fraction) if s.pad_fraction > 0 else (0.0,):
            image, scale, offset = self._padded(bgr, pad)
            for det_size in s.det_sizes:
                candidates = self._detect(image, det_size, scale, offset)
                usable = [c for c in candidates if c.score >= s.min_det_score and c.short_side >= s.min_face_px]
                if usable:
                    return usable
                seen.extend(candidates)
        if not seen:
            raise NoFaceError()
        big_enough = [c for c in seen if c.short_side >= s.min_face_px]
        if not big_enough:
            raise FaceTooSmallError(max(c.short_side for c in seen), s.min_face_px)
        raise LowConfidenceError(max(c.score for c in big_enough), s.min_det_score)

    def _padded(self, bgr: np.ndarray, pad: float) -> tuple[np.ndarray, float, int]:
        """The photo with a black border (as SCRFD's own letterbox pads) of ``pad`` x its longer side, shrunk
        first so the copy stays small (the detector works at det_size anyway). Returns it, the shrink factor and
        the border width."""
        if pad <= 0:
            return bgr, 1.0, 0
        import cv2

        height, width = bgr.shape[:2]
        scale = min(1.0, max(self.settings.det_sizes) / max(height, width))
        if scale < 1.0:
            bgr = cv2.resize(bgr, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        offset = round(pad * max(bgr.shape[:2]))
        padded = cv2.copyMakeBorder(bgr, offset, offset, offset, offset, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        return padded, scale, offset

    def _detect(self, bgr: np.ndarray, det_size: int, scale: float, offset: int) -> list[_Candidate]:
        dets, kpss = self.detector.detect(
            bgr, input_size=(det_size, det_size), det_thresh=self.settings.floor_det_score
        )
        if dets is None or len(dets) == 0:
            return []
        if kpss is None:
            raise RuntimeError("The face detector returned no keypoints; faces cannot be aligned without them.")
        candidates = []
        for det, kps in zip(np.asarray(dets, np.float32), np.asarray(kpss, np.float32)):
            # Back to the photo's coordinates: remove the border, undo the shrink.
            candidates.append(_Candidate((det[:4] - offset) / scale, (kps - offset) / scale, float(det[4])))
        return candidates

    # -- alignment and embedding -----------------------------------------------------------------------------

    def _describe(self, bgr: np.ndarray, face: _Candidate) -> FaceResult:
        arcface_bgr = align_face(bgr, face.kps, ARCFACE_SIZE)
        embedding = np.asarray(self.recognizer.get_feat(arcface_bgr), np.float32).reshape(-1)
        if embedding.shape != (EMBEDDING_DIM,):
            raise RuntimeError(f"The face recognizer gave a {embedding.shape} embedding; ArcFace's is 512.")
        raw_norm = float(np.linalg.norm(embedding))
        embedding = _normalized(embedding)
        clip_bgr = align_face(bgr, face.kps, self.settings.clip_crop_size, self.settings.clip_crop_context)
        return FaceResult(
            bbox=_frozen(face.bbox),
            kps=_frozen(face.kps),
            det_score=face.score,
            embedding=_frozen(embedding),
            arcface_crop=_to_pil(arcface_bgr),
            clip_crop=_to_pil(clip_bgr),
            embedding_norm=raw_norm,
        )


# --- functions on results ---------------------------------------------------------------------------------------


def select_face(faces: Sequence[FaceResult], index: int = 0) -> FaceResult:
    """The face the person picked: ``index`` counts from 0, in ``analyze``'s order (largest first)."""
    if not faces:
        raise NoFaceError()
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise FaceSelectionError(f"Faces are picked by number (0 to {len(faces) - 1}), not by {index!r}.")
    if not 0 <= index < len(faces):
        count = "1 face was" if len(faces) == 1 else f"{len(faces)} faces were"
        raise FaceSelectionError(
            f"There is no face number {index} in this photo: {count} found, numbered 0 to {len(faces) - 1} "
            "from the largest. Pick one of those."
        )
    return faces[int(index)]


def average_embeddings(items: Sequence[FaceResult | AveragedFace | np.ndarray]) -> np.ndarray:
    """The identity of several photos of one person: the mean of their unit embeddings, renormalised."""
    vectors = [_embedding_of(item) for item in items]
    if not vectors:
        raise NoFaceError("No faces to average. Upload one or more photos of the person.")
    mean = np.mean(np.stack(vectors), axis=0)
    if float(np.linalg.norm(mean)) < 1e-6:
        raise FaceError("These faces cancel each other out: the photos do not look like one person.")
    return _normalized(mean)


def face_similarity(a: FaceResult | AveragedFace | np.ndarray, b: FaceResult | AveragedFace | np.ndarray) -> float:
    """ArcFace cosine similarity in [-1, 1] (same person: typically above about 0.4 with buffalo_l)."""
    return float(np.dot(_embedding_of(a), _embedding_of(b)))


# --- models -----------------------------------------------------------------------------------------------------


def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu is installed and sees a GPU, else CPU only."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in available and _cuda_visible():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _cuda_visible() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # no torch: trust onnxruntime-gpu, which falls back to CPU by itself
        return True


def resolve_pack_folder(pack: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path:
    """The folder holding the pack's .onnx files: ``pack`` itself if it is a folder, else ``root/models/pack``.

    Handles antelopev2's upstream zip, which unpacks to ``antelopev2/antelopev2/*.onnx``: when the pack folder
    has no .onnx files but one subfolder does, that subfolder is used.
    """
    direct = Path(pack).expanduser()
    folder = direct if direct.is_dir() else Path(root).expanduser() / "models" / str(pack)
    if not _onnx_files(folder) and folder.is_dir():
        nested = [sub for sub in sorted(folder.iterdir()) if sub.is_dir() and _onnx_files(sub)]
        if len(nested) == 1:
            logger.info("Using the face models in the nested folder %s", nested[0])
            return nested[0]
        if nested:
            raise FaceModelMissingError(
                f"The face model folder {folder} has .onnx files only in its subfolders "
                f"({', '.join(sub.name for sub in nested)}). Move the files of the one you want up into {folder}.",
                folder,
            )
    if not _onnx_files(folder):
        raise FaceModelMissingError(
            f"The face model pack '{pack}' is not installed: no .onnx files in {folder}. "
            f"Run `{DOWNLOAD_COMMAND}` to fetch it, or set INFINITE_ID_FACE_ROOT to the folder that holds "
            f"models/{Path(str(pack)).name}/.",
            folder,
        )
    return folder


def _onnx_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.onnx")) if folder.is_dir() else []


def _find_models(folder: Path, pack: str, need_detector: bool) -> tuple[Path | None, Path]:
    """Pick the pack's detector and recognizer by their graphs' inputs and outputs (the rules of insightface's
    model router), looking at likely file names first and stopping as soon as both are known."""
    import onnx

    def likely(path: Path) -> int:
        name = path.name.lower()
        return 0 if any(k in name for k in ("det", "scrfd", "w600k", "glint", "r50", "r100", "arcface")) else 1

    detector = recognizer = None
    for path in sorted(_onnx_files(folder), key=likely):
        if (detector or not need_detector) and recognizer:
            break
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as error:  # a half-downloaded file
            raise FaceModelMissingError(
                f"The face model file {path} is damaged. Delete it and run `{DOWNLOAD_COMMAND}` again.", folder
            ) from error
        dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        if len(graph.output) >= 5:
            detector = detector or path
        elif len(graph.output) == 1 and len(dims) == 4 and dims[2] == dims[3] >= ARCFACE_SIZE and dims[2] % 16 == 0:
            out = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
            if out and out[-1] == EMBEDDING_DIM:
                recognizer = recognizer or path
    missing = [
        kind
        for kind, found in (("face detector", detector or not need_detector), ("recognizer", recognizer))
        if not found
    ]
    if missing:
        raise FaceModelMissingError(
            f"The face model pack '{pack}' in {folder} has no {' and no '.join(missing)} model. "
            f"Run `{DOWNLOAD_COMMAND}` to fetch a complete pack.",
            folder,
        )
    return detector, recognizer


# --- small helpers ----------------------------------------------------------------------------------------------


def align_face(bgr: np.ndarray, kps: np.ndarray, size: int, context: float = 1.0) -> np.ndarray:
    """insightface's ``norm_crop``: the similarity transform putting ``kps`` on the ArcFace template, at ``size``.

    ``context`` > 1 zooms out around the template's centre, showing more hair and background.
    """
    import cv2
    from insightface.utils import face_align

    matrix = face_align.estimate_norm(np.asarray(kps, np.float32), size)
    if context != 1.0:
        centre = size / 2.0
        zoom = np.array([[1 / context, 0, centre * (1 - 1 / context)], [0, 1 / context, centre * (1 - 1 / context)]])
        matrix = zoom @ np.vstack([matrix, [0.0, 0.0, 1.0]])
    return cv2.warpAffine(bgr, matrix, (size, size), borderValue=0.0)


def _as_rgb(image: ImageSource | np.ndarray) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise TypeError("An image array must be RGB uint8 with shape (height, width, 3).")
        image = Image.fromarray(image, "RGB")
    return load_image(image)


def _to_pil(bgr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]), "RGB")


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.array(array, np.float32)
    array.setflags(write=False)
    return array


def _normalized(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, np.float32)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-12:
        raise FaceError("This face gave an empty identity. Try another photo.")
    return vector / norm


def _embedding_of(item: FaceResult | AveragedFace | np.ndarray) -> np.ndarray:
    vector = np.asarray(getattr(item, "embedding", item), np.float32).reshape(-1)
    if vector.shape != (EMBEDDING_DIM,):
        raise ValueError(f"A face embedding has {EMBEDDING_DIM} numbers; this one has {vector.size}.")
    return _normalized(vector)
