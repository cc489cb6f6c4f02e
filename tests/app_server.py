"""The app on a free local port, for the tests that drive it over HTTP (test_app, test_reliability, test_security).

``serve`` builds the demo on the tiny engine (or the engine given) as ``app.main`` does (``ui.engine_options``) and
launches it with the production launch and queue settings (``app.launch_options``, ``app.enable_queue``); keyword
arguments override only what a test is about.
"""

from __future__ import annotations

import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from infinite_id.models.engines import load_engine  # noqa: E402
from infinite_id.ui import engine_options  # noqa: E402

ASSETS = ROOT / "assets"
STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(engine=None, *, max_size: int | None = None, session_jobs: int | None = None, **build):
    """``(demo, url)`` of the app served on 127.0.0.1; closed on exit. ``build``: ``app.build_demo`` overrides."""
    engine = engine or load_engine("tiny")
    demo = app.build_demo(lambda: engine.pipe, lambda: engine.face_analyzer, **{**engine_options(engine), **build})
    port = free_port()
    app.enable_queue(demo, max_size=max_size, session_jobs=session_jobs).launch(
        **app.launch_options("127.0.0.1", port, demo=demo), prevent_thread_lock=True, quiet=True
    )
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def generate(client, photo, **overrides):
    """``/generate`` with a photo path and small, fixed settings; ``overrides`` are API parameter names."""
    from gradio_client import handle_file

    kwargs = dict(photo=handle_file(str(photo)), prompt="a person in a garden", style="Watercolor", steps=STEPS,
                  seed=7, randomize_seed=False, api_name="/generate")
    kwargs.update(overrides)
    return client.predict(**kwargs)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)
