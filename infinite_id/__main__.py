"""CLI: ``python -m infinite_id generate|compare|train|evaluate|verify-weights|download ...``.

Each subcommand lives in the module that owns its work and parses its own arguments; this file only dispatches,
importing lazily so ``--help`` and ``download`` do not pay for torch/diffusers imports they do not need.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": ("infinite_id.cli", "generate_main", "make images of a person from one photo"),
    "compare": ("infinite_id.cli", "compare_main", "a labelled grid across methods, strengths or styles"),
    "download": ("infinite_id.models.options", "download_main", "fetch every weight file the app needs (or --dry-run)"),
    "train": ("infinite_id.training.trainer", "main", "identity-enhanced training of a native checkpoint"),
    "evaluate": ("infinite_id.evaluation.cli", "main", "CLIP-T, CLIP-I and face similarity per method"),
    "verify-weights": ("infinite_id.evaluation.verify", "main",
                       "on real weights: ours vs diffusers' adapter, LoRA / CLIP order / AdaIN-cross settled"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("usage: python -m infinite_id COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    module, func, _ = COMMANDS[argv[0]]
    try:
        entry = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError):
        print(f"'{argv[0]}' is not available in this version.", file=sys.stderr)
        return 2
    return int(entry(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
