"""Training data: photos of people -> cached (reference features, target image) pairs.

Preprocessing runs once per dataset: each photo is read safely, its largest face detected and aligned, the ArcFace
embedding and CLIP hidden states of the aligned crop computed, and the photo resized and centre-cropped to the
training resolution with SDXL's size and crop conditioning recorded. Results go to safetensors shards plus a
``manifest.json`` that also lists every skipped photo and why.

Inputs: a folder ``root/<person>/*.jpg`` (at least two photos per person: every ordered pair of different photos of
one person is a training pair) or a JSONL manifest of ``{"reference": path, "target": path}`` lines.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
SHARD_SIZE = 256
CACHE_VERSION = 1


def _photos_and_pairs(data: Path) -> tuple[list[tuple[str, Path]], list[tuple[Path, Path]] | None]:
    """(person, path) for every photo, and explicit pairs when the input is a manifest."""
    if data.is_file() and data.suffix == ".jsonl":
        pairs = []
        for n, line in enumerate(data.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ref, tgt = data.parent / row["reference"], data.parent / row["target"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{data.name} line {n} is not a {{'reference', 'target'}} object: {exc}") from exc
            pairs.append((ref, tgt))
        photos = list(dict.fromkeys(p for pair in pairs for p in pair))
        return [(str(p.parent.name), p) for p in photos], pairs
    if not data.is_dir():
        raise ValueError(f"Training data must be a folder of people or a .jsonl manifest; {data} is neither.")
    photos = [
        (person.name, p)
        for person in sorted(d for d in data.iterdir() if d.is_dir())
        for p in sorted(person.iterdir())
        if p.suffix.lower() in PHOTO_SUFFIXES
    ]
    if not photos:
        raise ValueError(f"No photos found under {data} (expected {data}/<person>/*.jpg).")
    return photos, None


def center_crop(image: Image.Image, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to ``resolution`` and centre-crop; returns uint8 CHW, original (h, w), crop (top, left)."""
    w, h = image.size
    scale = resolution / min(w, h)
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    resized = image.resize((rw, rh), Image.Resampling.LANCZOS)
    top, left = (rh - resolution) // 2, (rw - resolution) // 2
    crop = resized.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1), (h, w), (top, left)


def preprocess(data: str | Path, cache: str | Path, pipe, resolution: int, show_progress: bool = True) -> Path:
    """Build (or reuse) the feature cache of ``data`` in ``cache``; returns the cache folder."""
    from tqdm.auto import tqdm

    from ..faces.analyzer import FaceError
    from ..images import InvalidImageError, load_image

    data, cache = Path(data), Path(cache)
    settings = {"version": CACHE_VERSION, "data": str(data.resolve()), "resolution": resolution,
                "clip_layer": -1, "clip_tokens": None}
    manifest_path = cache / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("settings", {}).get("data") == settings["data"] and old["settings"]["resolution"] == resolution:
            return cache
    photos, explicit_pairs = _photos_and_pairs(data)
    cache.mkdir(parents=True, exist_ok=True)
    if pipe.face_analyzer is None:
        raise ValueError("Preprocessing needs a face analyzer on the pipeline.")

    kept, skipped, rows = [], [], {k: [] for k in ("face", "clip", "pixels", "original_size", "crop")}
    shards = 0

    def flush():
        nonlocal shards
        if rows["face"]:
            tensors = {k: torch.stack(v) for k, v in rows.items()}
            save_file(tensors, str(cache / f"shard-{shards:05d}.safetensors"))
            shards += 1
            for v in rows.values():
                v.clear()

    for person, path in tqdm(photos, desc="preprocess", disable=not show_progress):
        try:
            image = load_image(path)
            face = pipe.face_analyzer.analyze(image)[0]
        except (InvalidImageError, FaceError, OSError) as exc:
            skipped.append({"path": str(path), "reason": str(exc).split("\n")[0]})
            continue
        with torch.no_grad():
            pixels = pipe.feature_extractor(images=[face.clip_crop], return_tensors="pt").pixel_values
            pixels = pixels.to(pipe.image_encoder.device, pipe.image_encoder.dtype)
            clip = pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-1][0]
        target, original, crop = center_crop(image, resolution)
        rows["face"].append(torch.tensor(np.asarray(face.embedding), dtype=torch.float32))
        rows["clip"].append(clip.float().cpu().to(torch.float16))
        rows["pixels"].append(target)
        rows["original_size"].append(torch.tensor(original))
        rows["crop"].append(torch.tensor(crop))
        kept.append({"path": str(path), "person": person, "shard": shards, "row": len(rows["face"]) - 1})
        if len(rows["face"]) == SHARD_SIZE:
            flush()
    flush()

    index = {entry["path"]: i for i, entry in enumerate(kept)}
    if explicit_pairs is not None:
        pairs = [(index[str(r)], index[str(t)]) for r, t in explicit_pairs if str(r) in index and str(t) in index]
    else:
        by_person: dict[str, list[int]] = {}
        for i, entry in enumerate(kept):
            by_person.setdefault(entry["person"], []).append(i)
        for person, members in by_person.items():
            if len(members) < 2:
                skipped.append({"path": person, "reason": "fewer than two usable photos of this person"})
        pairs = [(r, t) for members in by_person.values() for r in members for t in members if r != t]
    if not pairs:
        raise ValueError(f"No training pairs: every photo was skipped or no person has two usable photos ({len(skipped)} skipped).")
    manifest = {"settings": settings, "photos": kept, "pairs": pairs, "skipped": skipped}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    if show_progress:
        print(f"Preprocessed {len(kept)} photos into {len(pairs)} pairs; skipped {len(skipped)} (see {manifest_path}).")
    return cache


class CachedPairs:
    """Training pairs read from a preprocessed cache; batches are a pure function of (step, process, seed)."""

    def __init__(self, cache: str | Path, seed: int = 0):
        self.cache = Path(cache)
        manifest = json.loads((self.cache / "manifest.json").read_text())
        self.photos, self.pairs, self.skipped = manifest["photos"], manifest["pairs"], manifest["skipped"]
        self.seed = seed
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def _row(self, photo: int, key: str) -> torch.Tensor:
        entry = self.photos[photo]
        shard = entry["shard"]
        if shard not in self._shards:
            with safe_open(str(self.cache / f"shard-{shard:05d}.safetensors"), framework="pt") as f:
                self._shards[shard] = {k: f.get_tensor(k) for k in f.keys()}
        return self._shards[shard][key][entry["row"]]

    def pair_indices(self, micro_step: int, batch_size: int, rank: int, world: int) -> list[int]:
        """Pairs of one batch: consecutive slices of a per-epoch permutation, disjoint across processes."""
        first = (micro_step * world + rank) * batch_size
        out = []
        for k in range(first, first + batch_size):
            epoch, pos = divmod(k, len(self.pairs))
            perm = torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            out.append(int(perm[pos]))
        return out

    def batch(self, micro_step: int, batch_size: int, rank: int, world: int, gen: torch.Generator, flip: bool):
        face, clip, pixels, time_ids = [], [], [], []
        for i in self.pair_indices(micro_step, batch_size, rank, world):
            ref, tgt = self.pairs[i]
            face.append(self._row(ref, "face"))
            clip.append(self._row(ref, "clip").float())
            image = self._row(tgt, "pixels")
            if flip and torch.rand(1, generator=gen).item() < 0.5:
                image = image.flip(-1)
            pixels.append(image)
            size = image.shape[-1]
            original, crop = self._row(tgt, "original_size"), self._row(tgt, "crop")
            time_ids.append(torch.tensor([*original.tolist(), *crop.tolist(), size, size], dtype=torch.float32))
        return {"face": torch.stack(face), "clip": torch.stack(clip), "pixels": torch.stack(pixels), "time_ids": torch.stack(time_ids)}
