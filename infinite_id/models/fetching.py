"""Whether each planned file is on this machine, and getting it (DESIGN 5): the other half of ``hub``.

``hub`` says which files the settings need and where each comes from (the *plan*); this module reads the hub cache
and the face-pack folders (``find_local``, ``missing_files``; never the network), turns a plan with missing files
into one readable ``MissingWeightsError`` (``describe_missing``, ``startup_check``), and fetches through
huggingface_hub or insightface's downloader (``fetch``, ``fetch_all``, and ``local_folder``/``local_file``, which
give ``loading.load_pipeline`` the paths ``from_pretrained`` reads), with ``local_files_only`` when offline.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..config import ModelSettings
from .hub import DOWNLOAD_COMMAND, Location, MissingWeightsError, Needed, file_needed, folder_files, plan_files, resolve

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
        missing = missing_files(folder_files(location, role, names))
        if missing:
            raise MissingWeightsError(describe_missing(missing, cache_dir or hub_cache_dir(), False))
        return location.local
    paths = fetch_all(folder_files(location, role, names), local_files_only=local_files_only, cache_dir=cache_dir)
    # The folder is the first file's path minus that file's own relative path (hub files sit in one snapshot).
    first = Path(next(iter(paths.values())))
    return first.parents[len(Path(names[0]).parts) - 1]


def local_file(location: Location, *, local_files_only: bool | None = None, cache_dir: Path | None = None,
               role: str = "file") -> Path:
    return fetch(file_needed(location, role), local_files_only=local_files_only, cache_dir=cache_dir)
