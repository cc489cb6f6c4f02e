"""What every tab's handler shares: the engine getters, the identity cache, the output guard, the cancel flags,
the per-session job counter and the output folder. Shared services only, never per-call state."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from .. import service as gen
from ..config import SERVER
from .queue import Jobs, SessionJobs


class OutputFolder:
    """Where this server writes PNGs before Gradio serves them: one subfolder per request, removed after an hour
    and at exit (Gradio deletes its own copies on the same schedule through ``delete_cache``)."""

    def __init__(self, root: Path | None = None, max_age_s: float = SERVER.delete_cache_age_s):
        self.root = Path(root or tempfile.mkdtemp(prefix="infinite_id_outputs_"))
        self.max_age_s = max_age_s
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)

    def new(self) -> Path:
        now = time.time()
        for old in self.root.iterdir():
            if old.is_dir() and now - old.stat().st_mtime > self.max_age_s:
                shutil.rmtree(old, ignore_errors=True)
        folder = self.root / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        return folder


class Services:
    """The shared services of one demo (``demo.handlers``), and the steps every handler takes."""

    def __init__(self, get_pipeline: Callable, get_face_analyzer: Callable, outputs: OutputFolder | None = None,
                 timeout_s: float | None = None, guard: gen.OutputGuard | None = None):
        self.get_pipeline = get_pipeline
        # Built here, at start-up: a safety checker that cannot be imported stops the app before any request.
        self.guard = guard or gen.OutputGuard.from_settings(SERVER)
        self.get_face_analyzer = get_face_analyzer
        self.timeout_s = SERVER.request_timeout_s if timeout_s is None else timeout_s
        self.identities = gen.IdentityCache()
        self.jobs = Jobs()
        self.sessions = SessionJobs(
            SERVER.session_jobs,
            # A last resort only (the event stream and Stop release jobs): a full queue's worth of time limits.
            stale_after_s=self.timeout_s * (SERVER.queue_max_size + 1),
        )
        self.outputs = outputs or OutputFolder()

    def identity(self, pipe, photo, face_index=0, extra_photos=None) -> gen.Identity:
        if photo is None:
            raise gr.Error("Upload a photo of the person first (or take one with the webcam).")
        extras = [p for p in (extra_photos or []) if p]
        return self.identities.encode(
            pipe, photo, face_index=int(face_index or 0), extra_photos=extras, analyzer=self.get_face_analyzer()
        )

    @staticmethod
    def request(pipe, aspect_ratio, seed, randomize_seed, **values) -> gen.GenerationRequest:
        width, height = gen.size_for(aspect_ratio, gen.native_size(pipe))
        return gen.GenerationRequest(
            width=width, height=height, seed=None if randomize_seed else seed, **values
        ).with_seed()

    def save(self, images: list[gen.GeneratedImage], stem: str) -> list[str]:
        folder = self.outputs.new()
        return [str(p) for p in gen.save_images(images, folder, stem=stem)]

    def screen(self, result: gen.GenerationResult, text_stream: bool = False):
        """The images that may be shown, the text-stream images likewise (only when they are to be shown), and the
        info line (with a notice when the safety check withheld any). Nothing withheld is saved."""
        images, withheld = self.guard.screen(result.images)
        if not images:
            raise gr.Error(gen.WITHHELD_MESSAGE, print_exception=False)
        text_images, text_withheld = self.guard.screen(result.text_images) if text_stream else ([], 0)
        info = result.info()
        if withheld or text_withheld:
            info += f"  \n{withheld + text_withheld} image(s) withheld by the safety check."
        return images, text_images, info

    def running(self, request: gr.Request | None):
        """The cancel flag of this session's job, for the job's duration."""
        return self.jobs.running(request.session_hash if request else None)

    def deadline(self) -> float | None:
        return gen.deadline_in(self.timeout_s)

    def cancel(self, request: gr.Request):
        """Stop: the running job ends at its next step. (The session's count drops when the job's end passes its
        event stream, as for any other end: see ``queue.SessionCap``.)"""
        self.jobs.cancel(request.session_hash if request else None)
