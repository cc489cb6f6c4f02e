"""One person, ready to generate: photo(s) -> ``Identity`` (features for ``id_embeds`` and the reference ArcFace
embedding), encoded once per photo (keyed by a hash of the pixels) and reused, e.g. across a Compare grid."""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..images import load_image
from ..method.id_encoder import IdentityFeatures
from ..method.identity_inputs import clip_channel_order_for


def image_hash(image: Image.Image) -> str:
    """A hash of the decoded pixels: the same photo hits the cache whatever its file name or upload copy."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Identity:
    """One person, ready to generate: ``features`` go to the pipeline as ``id_embeds``; ``reference`` (512,
    unit norm) is the ArcFace embedding outputs are compared with. ``key`` names the photos (a hash, never the
    pixels) and is recorded in the metadata."""

    features: IdentityFeatures
    reference: np.ndarray
    key: str
    face_index: int = 0
    photos: int = 1
    clip_channel_order: str | None = None  # the order the CLIP crop was read in (None: the encoder reads no CLIP)


class IdentityCache:
    """Encodes a person's photo(s) once and reuses the result. Safe to share between requests and threads.

    The key is the pixels' hash, the picked face, the extra photos' hashes and the pipeline object, so a
    different photo, face or engine is a different entry. Entries are small (features, not images); the least
    recently used go first.
    """

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        # Per pipeline, held weakly: a pipeline that is gone takes its entries with it.
        self._entries: weakref.WeakKeyDictionary[Any, OrderedDict[str, Identity]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    def encode(self, pipe, photo, face_index: int = 0, extra_photos: Sequence = (), analyzer=None,
               name: str | None = None, clip_channel_order: str | None = None) -> Identity:
        """``photo``: anything ``load_image`` takes. ``face_index``: which face of ``photo`` (0 = largest).
        ``extra_photos``: more photos of the same person (their largest face each), averaged in.
        A photo's error (unreadable, no usable face) names it: ``name`` for ``photo`` when given ("Person A"),
        "extra photo 2" for the second extra photo (see ``named``).
        ``clip_channel_order``: "rgb"/"bgr" for the CLIP crop, None for the adapter's published order."""
        from ..faces.analyzer import average_embeddings, select_face

        analyzer = analyzer if analyzer is not None else pipe.face_analyzer
        if analyzer is None:
            raise ValueError("This engine has no face analyzer, so it cannot read a photo of a person.")
        encoder = getattr(pipe, "id_encoder", None)
        order = clip_channel_order_for(encoder, clip_channel_order) if getattr(encoder, "needs_clip", False) else None
        names = [name] + [f"extra photo {i}" for i in range(1, len(extra_photos) + 1)]
        images = []
        for source, photo_name in zip([photo, *extra_photos], names):
            with named(photo_name):
                images.append(load_image(source))
        parts = [image_hash(images[0]), f"face{int(face_index)}", *(image_hash(e) for e in images[1:])]
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]  # names the photos, in the metadata too
        slot = f"{key}|{order}"  # the same photos read in the other channel order are other features
        with self._lock:
            entries = self._entries.setdefault(pipe, OrderedDict())  # features depend on the engine as well
            if slot in entries:
                entries.move_to_end(slot)
                self.hits += 1
                return entries[slot]
            self.misses += 1
        faces = []
        for i, (image, photo_name) in enumerate(zip(images, names)):
            with named(photo_name):
                found = analyzer.analyze(image)
                faces.append(select_face(found, int(face_index)) if i == 0 else found[0])
        features = pipe.encode_identity(faces, clip_channel_order=order) if order else pipe.encode_identity(faces)
        identity = Identity(features, average_embeddings(faces), key, int(face_index), len(faces), order)
        with self._lock:
            entries = self._entries.setdefault(pipe, OrderedDict())
            entries[slot] = identity
            while len(entries) > self.capacity:
                entries.popitem(last=False)
        return identity


@contextmanager
def named(photo: str | None):
    """A photo's error (a ``ValueError``: unreadable file, no usable face) names the photo it is about, so a person
    with several photos knows which to change: "Person A: No face was found in this photo...". The error keeps
    its type; ``error.photo`` holds the name."""
    try:
        yield
    except ValueError as error:
        if photo and getattr(error, "photo", None) is None and len(error.args) == 1:
            error.photo = photo
            error.args = (f"{photo[:1].upper()}{photo[1:]}: {error.args[0]}",)
        raise


def face_thumbnail(image: Image.Image, face, size: int = 128) -> Image.Image:
    """A square crop around ``face`` (a FaceResult) with some hair and chin, ``size`` pixels, for picking faces."""
    x1, y1, x2, y2 = (float(v) for v in face.bbox[:4])
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * 0.75
    box = tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))
    return image.crop(box).resize((size, size), Image.Resampling.LANCZOS)


def output_similarity(analyzer, image: Image.Image, reference: np.ndarray | None) -> float | None:
    """ArcFace cosine of the largest face in ``image`` to ``reference``; None when there is no face to compare."""
    if analyzer is None or reference is None:
        return None
    from ..faces.analyzer import FaceError, face_similarity
    from ..images import InvalidImageError

    try:
        faces = analyzer.analyze(image)
    except (FaceError, InvalidImageError):  # an output without a usable face has no similarity, not an error
        return None
    return round(face_similarity(faces[0], reference), 4) if faces else None


