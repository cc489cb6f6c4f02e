"""The weight flags every command shares (``--base-model``, ``--adapter``, ``--memory-mode`` ...) and
``python -m infinite_id download [--all|--adapter NAME] [--dry-run]``, over the plan of ``hub``."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Sequence

from ..adapters.encoders import ADAPTERS, DEFAULT_ADAPTER
from ..config import COMPILE_MODES, SETTINGS, ModelSettings
from ..method.backends import CHOICES as BACKEND_CHOICES
from .fetching import fetch_all, find_local, hub_cache_dir
from .hub import DOWNLOAD_COMMAND, FP16_FIX_VAE, MissingWeightsError, plan_files, resolve
from .tiers import CHOICES


def add_model_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags that choose weights, shared by ``download``, ``generate``, ``compare`` and the app (returned)."""
    group = parser.add_argument_group("weights (each also an INFINITE_ID_* environment variable; see docs/weights.md)")
    actions: list[argparse.Action] = []

    def add(*flags, **options) -> None:
        actions.append(group.add_argument(*flags, **options))

    add("--base-model", help="hub id, local diffusers folder, or one .safetensors file")
    add("--vae", help=f"VAE folder or hub id (default: {FP16_FIX_VAE} in fp16, else the base model's)")
    add("--image-encoder", help="CLIP ViT-H/14 image encoder (default: h94/IP-Adapter/models/image_encoder)")
    add("--adapter", choices=sorted(ADAPTERS), help=f"identity adapter (default: {DEFAULT_ADAPTER})")
    add("--adapter-path", help="a file for the identity adapter (local or hub owner/repo/file)")
    add("--s-scale", type=float, help="FaceID-PlusV2 structure weight (default 1.0)")
    add("--fast-mode", help="hyper-sd or lightning: step-distilled LoRA and its scheduler (default off)")
    add("--fast-lora", dest="fast_lora_path", help="a local file for the fast-mode LoRA")
    add("--device", help="cpu, mps, cuda, cuda:1 ... (default: the best available)")
    add("--dtype", help="fp16, bf16 or fp32 (default: the device policy)")
    add("--memory-mode", choices=("none", "model", "sequential"),
        help="CPU offload mode (default: the VRAM tier's)")
    add("--vram-tier", choices=CHOICES, help="memory options for a GPU of this many GB: auto (default, "
        "from free memory), 24, 16, 12 (no offload), 8 (model offload), 6 (+ int8 UNet with torchao)")
    add("--attention", choices=BACKEND_CHOICES, help="attention kernel: auto (default: xformers if it runs "
        "here and matches SDPA, else SDPA), sdpa, or xformers (stops at start-up if it cannot run)")
    add("--compile", nargs="?", const="default", choices=COMPILE_MODES,
        help="torch.compile the UNet (mode default when given alone; compiles each batch layout on its "
        "first call)")
    add("--variant", help="weight-file variant of the base model to fetch (default fp16; '' for none)")
    add("--license-clean", action="store_true", default=None,
        help="load only models whose licence permits commercial use (SDXL base, IP-Adapter-Plus-Face, "
        "MTCNN, AuraFace; see docs/weights.md); refuse any other, naming it")
    return actions


def settings_from_args(args: argparse.Namespace, base: ModelSettings | None = None) -> ModelSettings:
    """``base`` (default ``SETTINGS.models``, i.e. defaults + environment) with the flags that were given."""
    base = base or SETTINGS.models
    names = {f.name for f in dataclasses.fields(ModelSettings)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if given.get("variant") == "":
        given["variant"] = None
    return dataclasses.replace(base, **given)


def download_command(argv: Sequence[str]) -> str:
    """The download command that fetches what a start with ``argv`` needs: the weight flags among ``argv`` as
    typed (``download`` takes the same ones; every other flag is left out), and ``--fast`` as ``--fast-mode on``."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    actions = add_model_arguments(parser)
    parser.add_argument("--fast", action="store_true")
    args, _ = parser.parse_known_args(list(argv))
    words = []
    for action in actions:
        value = getattr(args, action.dest)
        if value is not None:
            words += [action.option_strings[0]] + ([] if action.nargs == 0 else [str(value)])
    if args.fast and args.fast_mode is None:
        words += ["--fast-mode", "on"]
    return " ".join([DOWNLOAD_COMMAND, *map(shlex.quote, words)])


def for_this_start(error: Exception, argv: Sequence[str] | None) -> str:
    """``error``'s message for a person. A missing-weights message names the download command for the weights
    ``argv`` (default: this process's arguments) asks for instead of its generic one, which fetches the default
    setup: with ``--license-clean`` that would be other, non-commercial files."""
    if not isinstance(error, MissingWeightsError):
        return str(error)
    command = download_command(sys.argv[1:] if argv is None else argv)
    return str(error).replace(f"`{DOWNLOAD_COMMAND}`", f"`{command}`")


def download_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=DOWNLOAD_COMMAND, description="Fetch the weights the app needs into the standard caches.")
    parser.add_argument("--all", action="store_true", help="every adapter, both VAEs, both face packs, fast LoRAs")
    parser.add_argument("--dry-run", action="store_true", help="list every file, its source and whether it is "
                        "cached; no network access")
    parser.add_argument("--face-root", help="insightface root (default: INFINITE_ID_FACE_ROOT or ~/.insightface)")
    parser.add_argument("--face-pack", help="insightface pack (default: the one the adapter needs)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    try:
        models = settings_from_args(args)
        resolved = resolve(models, face_pack=args.face_pack, face_root=args.face_root)
        files = plan_files(resolved, everything=args.all)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cache = hub_cache_dir()
    if args.dry_run:
        print(f"Hugging Face cache: {cache}\ninsightface root: {resolved.face_root}")
        for item in files:
            where = find_local(item, cache)
            state = f"cached at {where}" if where else "MISSING"
            print(f"[{item.role}] {item.filename}\n    source: {item.source}\n    {state}")
        missing = sum(find_local(i, cache) is None for i in files)
        command = DOWNLOAD_COMMAND + (" --all" if args.all else "") + (" --license-clean" if models.license_clean else "")
        print(f"{len(files)} files, {missing} missing." + (f" Run `{command}` to fetch them." if missing else ""))
        return 0
    try:
        fetch_all(files, heading="The download is incomplete")
    except MissingWeightsError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"All {len(files)} files are in place (Hugging Face cache: {cache}; faces: {resolved.face_root}).")
    return 0
