"""Style presets: a prompt template, a negative prompt and a recommended style strength, one JSON file each.

Presets live in ``styles/*.json`` at the repository root (override the folder with ``INFINITE_ID_STYLES_DIR``), so
adding a style is adding a file, with no code change. A file looks like::

    {"name": "Oil painting", "prompt": "oil painting of {prompt}, ...", "negative_prompt": "photograph, ...",
     "style_strength": 1.0, "order": 3}

``prompt`` must contain ``{prompt}`` exactly once: that is where the person's own words go. ``style_strength``
is the recommended AdaIN-mean amount (DESIGN 2.5, 0 to 1). Every shipped preset uses the paper's full strength,
1.0; a preset that deviates must say why in the file, from a measurement (``verify-weights``/``evaluate`` on real
weights). ``order`` only sorts the menu.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

STYLES_DIR = Path(os.environ.get("INFINITE_ID_STYLES_DIR", Path(__file__).resolve().parents[2] / "styles"))
DEFAULT_STYLE = "Photographic"
NO_STYLE = "No style"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str = ""
    style_strength: float = 1.0
    order: int = 0

    def apply(self, prompt: str, negative_prompt: str = "") -> tuple[str, str]:
        """The person's prompt inside this style's template, and both negative prompts joined."""
        # str.replace, not str.format: a prompt with braces ("a {red} hat") must not be read as a template.
        styled = self.prompt.replace("{prompt}", prompt.strip())
        negatives = [n.strip() for n in (negative_prompt, self.negative_prompt) if n and n.strip()]
        return styled, ", ".join(negatives)


def _parse(path: Path) -> Style:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Style preset {path.name} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("prompt"), str):
        raise ValueError(f"Style preset {path.name} needs a 'name' and a 'prompt' (strings).")
    if data["prompt"].count("{prompt}") != 1:
        raise ValueError(f"Style preset {path.name}: its prompt must contain {{prompt}} exactly once.")
    strength = float(data.get("style_strength", 1.0))
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"Style preset {path.name}: style_strength must be between 0 and 1, got {strength}.")
    return Style(
        name=data["name"].strip(),
        prompt=data["prompt"],
        negative_prompt=str(data.get("negative_prompt", "")),
        style_strength=strength,
        order=int(data.get("order", 0)),
    )


@lru_cache(maxsize=4)
def load_styles(folder: str | Path = STYLES_DIR) -> dict[str, Style]:
    """Every preset in ``folder`` by name, in menu order. Duplicate names are an error (which one would win?)."""
    folder = Path(folder)
    styles: dict[str, Style] = {}
    for path in sorted(folder.glob("*.json")):
        style = _parse(path)
        if style.name in styles:
            raise ValueError(f"Two style presets are named {style.name!r}; names must be unique.")
        styles[style.name] = style
    if not styles:
        # The library still works without the folder (an installed wheel has none): no template at all.
        styles[NO_STYLE] = Style(name=NO_STYLE, prompt="{prompt}")
    return dict(sorted(styles.items(), key=lambda item: (item[1].order, item[0])))


def style_names(folder: str | Path = STYLES_DIR) -> list[str]:
    return list(load_styles(folder))


def default_style_name(folder: str | Path = STYLES_DIR) -> str:
    names = style_names(folder)
    return DEFAULT_STYLE if DEFAULT_STYLE in names else names[0]


def get_style(name: str | None, folder: str | Path = STYLES_DIR) -> Style:
    """The preset called ``name`` (None or empty: the default). Unknown names are a ValueError with the choices."""
    styles = load_styles(folder)
    if not name:
        return styles[default_style_name(folder)]
    try:
        return styles[name]
    except KeyError:
        raise ValueError(f"There is no style called {name!r}. Choose one of: {', '.join(styles)}.") from None
