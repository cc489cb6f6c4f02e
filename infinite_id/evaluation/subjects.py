"""What an evaluation runs on: the identities (a folder of reference photos, class words) and the prompts.

Pure file reading, no models: a typo in a path fails here, before anything heavy loads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CLASS = "person"
PROMPTS_FILE = Path(__file__).resolve().parents[1] / "prompts" / "evaluation.json"
CLASSES_FILE = "classes.json"  # optional, in the identities folder: {"alice": "woman", ...}
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

@dataclass(frozen=True)
class Subject:
    """One identity: a name, the reference photo (a path or an image) and the class word for {class}."""

    name: str
    photo: Any
    class_word: str = DEFAULT_CLASS


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt template with ``{class}``, and its kind ("photo", "style" or "custom") for the per-kind tables."""

    template: str
    kind: str = "custom"

    def text(self, class_word: str) -> str:
        # str.replace, not format: other braces in a user's prompt are text.
        return self.template.replace("{class}", class_word)


def load_prompts(path: str | Path | None = None, kinds: Sequence[str] | None = None) -> list[EvalPrompt]:
    """The shipped list (``prompts/evaluation.json``) or a file of one's own: JSON ``{"kind": [prompts]}`` (keys
    whose values are not lists are comments), or text with one prompt a line (``#`` starts a comment)."""
    path = Path(path) if path is not None else PROMPTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"The prompt file {path} does not exist.")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"The prompt file {path} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f'The prompt file {path} must hold an object like {{"photo": [...], "style": [...]}}.')
        prompts = [EvalPrompt(str(p).strip(), kind) for kind, items in data.items() if isinstance(items, list)
                   for p in items if str(p).strip()]
    else:
        lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
        prompts = [EvalPrompt(line) for line in lines if line]
    if kinds:
        prompts = [p for p in prompts if p.kind in kinds]
    if not prompts:
        which = f" of kind {', '.join(kinds)}" if kinds else ""
        raise ValueError(f"The prompt file {path} has no prompts{which}.")
    return prompts


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES and not p.name.startswith("."))


def read_classes(path: str | Path) -> dict[str, str]:
    """``{"identity name": "man" | "woman" | "person" | ...}`` from a JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Could not read the class words in {path}: {error}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise ValueError(f'{path} must map identity names to class words, like {{"alice": "woman"}}.')
    return {str(k): v.strip() for k, v in data.items()}


def find_subjects(
    root: str | Path, classes: dict[str, str] | None = None, default_class: str = DEFAULT_CLASS
) -> list[Subject]:
    """The identities under ``root``: each photo directly in it is one person (named by the file's stem), and each
    sub-folder is one person whose first photo by name is the reference. ``root/classes.json`` and ``classes``
    (which wins) give the class word per name; the rest get ``default_class``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"The identities folder {root} does not exist (or is not a folder).")
    found: dict[str, Path] = {p.stem: p for p in _photos(root)}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = _photos(folder)
        if photos:
            found.setdefault(folder.name, photos[0])
    if not found:
        raise ValueError(
            f"No reference photos in {root}: put one photo per person in it ({', '.join(PHOTO_SUFFIXES)}), "
            "or one folder per person."
        )
    words = read_classes(root / CLASSES_FILE) if (root / CLASSES_FILE).is_file() else {}
    words.update(classes or {})
    return [Subject(name, path, words.get(name, default_class)) for name, path in sorted(found.items())]
