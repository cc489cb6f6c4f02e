"""Which engine serves requests: the real model (weights checked before anything loads) or the tiny engine check.

The app and the CLI share this: the same flags, the same start-up check, the same objects. ``load_engine`` runs
once at start-up; nothing here loads a model at import time.

Start-up with missing weights: offline (``HF_HUB_OFFLINE=1``, or the hub unreachable) the start-up check's
``MissingWeightsError`` stops the program with its message, in seconds. Online (a fresh Space, a first local run)
the missing files are downloaded by ``load_pipeline`` before the server starts, so the first request never waits
for a download.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

ENGINES = ("real", "tiny")
TINY_BANNER = "random weights: engine check"
TINY_STEPS = 4  # the tiny engine on a CPU: a few steps keep a request to seconds


@dataclass
class Engine:
    """The loaded engine: the pipeline (with its face analyzer attached) and what the UI should know about it."""

    name: str  # "real" or "tiny"
    pipe: Any  # InfiniteIDPipeline
    face_analyzer: Any  # FaceAnalyzer
    models: Any = None  # the config.ModelSettings the real engine was loaded with (None: defaults and environment)

    @property
    def banner(self) -> str | None:
        """A line the app must show: the tiny engine's outputs are noise by design."""
        if self.name != "tiny":
            return None
        return (
            f"**{TINY_BANNER}**: this server runs the tiny engine with random weights, so every image is noise. "
            "It checks that the whole app works end to end; the real engine makes real images."
        )

    @property
    def identity_note(self) -> str | None:
        """A sentence the page must show when identity scores mean nothing (the tiny engine's random
        recognizer; its detector is real), else None."""
        return getattr(self.face_analyzer, "identity_note", None)

    @property
    def license_clean(self) -> bool:
        return bool(getattr(self.models, "license_clean", False))

    @property
    def licences(self) -> list[tuple[str, str, str, str]]:
        """``(part, model id, licence, source)`` of every model this engine runs, for the page."""
        from .licences import licence_rows

        return licence_rows(self.models, engine=self.name)

    @property
    def steps(self) -> int:
        """Default number of steps: the loaded sampling mode's (30, or 8 in fast mode), a few for the tiny engine."""
        defaults = getattr(self.pipe, "sampling_defaults", None)
        return TINY_STEPS if self.name == "tiny" else int(getattr(defaults, "num_inference_steps", 30))

    @property
    def guidance(self) -> float:
        defaults = getattr(self.pipe, "sampling_defaults", None)
        return float(getattr(defaults, "guidance_scale", 5.0))

    @property
    def fast(self) -> bool:
        info = getattr(self.pipe, "weights_info", None) or {}
        return info.get("fast_mode", "off") != "off"


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--engine`` and ``--fast``, plus every weight flag of ``infinite_id.models.hub`` (``--adapter``, ``--memory-mode``,
    ``--fast-mode``, ``--base-model``, ``--license-clean`` ...), so the app and every CLI command take the same ones."""
    parser.add_argument(
        "--engine", choices=ENGINES, default=os.environ.get("INFINITE_ID_ENGINE", "real"),
        help="real: the SDXL model (default); tiny: random weights, a fast end-to-end check that needs no download",
    )
    parser.add_argument(
        "--fast", action="store_true",
        help="fast mode: load the default step-distilled LoRA (same as --fast-mode hyper-sd) and run 8 steps",
    )
    try:
        from .options import add_model_arguments
    except ImportError:  # a build without the real-weights loader: only the tiny engine
        return
    add_model_arguments(parser)


def load_engine_from_args(args: argparse.Namespace) -> Engine:
    if args.engine == "tiny":
        # --adapter with the tiny engine: a tiny file in that public format, through the real converter.
        return load_engine("tiny", adapter=getattr(args, "adapter", None))
    from .options import settings_from_args

    models = settings_from_args(args)
    if getattr(args, "fast", False) and not models.fast_mode:
        models = dataclasses.replace(models, fast_mode="on")
    return load_engine("real", models=models)


def load_engine(engine: str = "real", *, models=None, seed: int = 0, adapter: str | None = None) -> Engine:
    """Build the engine once. ``models``: ``config.ModelSettings`` for the real engine (None: defaults and
    environment). Raises ``MissingWeightsError`` (a ValueError with the whole story) before loading any model
    when weights are missing and cannot be downloaded now. ``adapter`` (tiny engine only): a tiny random file in
    that public adapter's format (``faceid-plusv2`` carries a LoRA) instead of the native tiny encoder."""
    if engine == "tiny":
        from ..faces.tiny_pack import tiny_face_analyzer
        from ..testing import tiny_pipeline

        analyzer = tiny_face_analyzer(seed=seed)
        pipe = tiny_pipeline(seed=seed, face_analyzer=analyzer)
        # A plain attribute, as the real loader's weights_info: recorded in every PNG's metadata.
        pipe.weights_info = {"engine": "tiny", "base_model": "tiny random weights (engine check)", "fast_mode": "off"}
        if adapter and adapter != "infinite-id":
            _tiny_adapter(pipe, adapter, seed)
        return Engine("tiny", pipe, analyzer)
    if engine != "real":
        raise ValueError(f"The engine must be one of {', '.join(ENGINES)}; got {engine!r}.")
    from .fetching import offline_requested, startup_check
    from .hub import MissingWeightsError
    from .loading import load_pipeline

    try:
        startup_check(models)
    except MissingWeightsError:
        if offline_requested() or not hub_reachable():
            raise
        logger.warning("Some weights are not downloaded yet; fetching them now (first start only).")
    pipe = load_pipeline(models=models)
    return Engine("real", pipe, pipe.face_analyzer, models)


def _tiny_adapter(pipe, adapter: str, seed: int) -> None:
    import shutil
    import tempfile
    import weakref

    from .tiny_adapters import load_tiny_adapter

    folder = tempfile.mkdtemp(prefix="infinite-id-tiny-adapter-")
    weakref.finalize(pipe, shutil.rmtree, folder, ignore_errors=True)  # the file lives as long as the pipeline
    info = load_tiny_adapter(pipe, adapter, folder, seed=seed)
    pipe.weights_info.update({k: info[k] for k in ("kind", "title", "num_tokens", "lora")})


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection now (a quick check, no request is made)."""
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except Exception:  # an old huggingface_hub without constants.ENDPOINT
        endpoint = urlparse("https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
