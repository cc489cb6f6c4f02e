"""Why a photo gives no usable face, as typed errors whose messages a person understands.

Every photo problem is a ``FaceError`` (a ``ValueError``); a missing model pack is a ``FaceModelMissingError`` (a
``FileNotFoundError``: a set-up problem, not a bad photo). ``faces.analyzer`` re-exports them all.
"""

from __future__ import annotations

from pathlib import Path


class FaceError(ValueError):
    """A photo that cannot give an identity. The message is meant for the person who uploaded it."""


class NoFaceError(FaceError):
    def __init__(self, message: str | None = None):
        super().__init__(
            message
            or "No face was found in this photo. Try a well-lit photo where the face is clearly visible "
            "and faces the camera."
        )


class TooDarkError(NoFaceError):
    """No face found in a photo too dark to show one (a ``NoFaceError``, so callers that catch that still do)."""

    def __init__(self, brightness: float):
        self.brightness = brightness
        super().__init__(
            f"This photo is too dark to find a face in (average brightness {brightness:.0f} of 255). "
            "Try a photo taken in better light, or brighten this one first."
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
