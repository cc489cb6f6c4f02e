"""Where a face model pack lives and which of its files are the detector and the recognizer.

Packs follow insightface's layout (``root/models/<pack>/*.onnx``). Files are told apart by their graphs' inputs and
outputs (the rules of insightface's model router), never by downloading anything.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import FaceModelMissingError

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 512
ARCFACE_SIZE = 112
DOWNLOAD_COMMAND = "python -m infinite_id download"

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


def find_models(folder: Path, pack: str, need_detector: bool) -> tuple[Path | None, Path]:
    """The pack's detector (None when it has none and ``need_detector`` is False) and recognizer, picked by their
    graphs' inputs and outputs (the rules of insightface's model router), likely file names first, stopping as
    soon as both are known."""
    import onnx

    def likely(path: Path) -> int:
        name = path.name.lower()
        return 0 if any(k in name for k in ("det", "scrfd", "w600k", "glint", "r50", "r100", "arcface")) else 1

    detector = recognizer = None
    for path in sorted(_onnx_files(folder), key=likely):
        if detector and recognizer:
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
