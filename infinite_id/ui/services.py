"""What every tab's handler shares: the engine getters, the identity cache, the output guard, the cancel flags,
the per-session job counter and the output folder. Shared services only, never per-call state."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr

from .. import service as gen
from ..config import SERVER
from . import widgets
from .queue import Jobs, SessionJobs
from .status import JobReport, Pace, QueueView, Status, StatusBoard, render

QUEUE_FULL = "The queue is full right now, so this request was not taken. Please try again in a minute."


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
                 timeout_s: float | None = None, guard: gen.OutputGuard | None = None, gpu_limit: int = 1):
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
        self.board, self.pace, self.gpu_limit = StatusBoard(), Pace(), max(1, int(gpu_limit))

    def identity(self, pipe, photo, face_index=0, extra_photos=None, name: str = "the photo") -> gen.Identity:
        """The person in ``photo``; an error names the photo (``name``, "extra photo 2")."""
        if photo is None:
            raise ValueError(f"Upload {name} first: a photo of the person (or take one with the webcam)."
                             if name == "the photo" else f"Upload a photo of {name} first.")
        extras = [p for p in (extra_photos or []) if p]
        return self.identities.encode(pipe, photo, face_index=int(face_index or 0), extra_photos=extras,
                                      analyzer=self.get_face_analyzer(), name=name)

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
            raise ValueError(gen.WITHHELD_MESSAGE)
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

    @contextmanager
    def job(self, request: gr.Request | None, tab: str, units: float, progress: gr.Progress, desc: str,
            starting: str = "Starting...") -> Iterator[JobReport]:
        """One handler call: its steps reach Gradio's progress and the tab's status line, its errors become
        sentences there too (and a ``gr.Error``). The handler calls ``report.finished(...)`` when done."""
        report = JobReport(self.board, self.pace, request.session_hash if request else None, tab, units,
                           widgets.progress_reporter(progress, desc), starting)

        def record(sentence: str, error: Exception) -> None:
            report.failed(sentence, stopped=isinstance(error, gen.GenerationCancelled))

        with widgets.user_errors(record):
            yield report

    def begin(self, request: gr.Request | None, tab: str):
        """A run button was pressed: the status line says so at once (replacing the last outcome) and the
        page starts asking for news once a second."""
        session = request.session_hash if request else None
        status = self.board.set(session, tab, Status("sent", since=time.monotonic()))
        return render(status, None), gr.Timer(active=True)

    def view(self, request: gr.Request | None, tab: str):
        """The tab's status line now, and whether the page should keep asking (a job waiting or running)."""
        session = request.session_hash if request else None
        status = self.board.get(session, tab)
        queue = None
        if status.phase == "sent" and session:
            refusal = self.sessions.refusal_since(session, status.since)
            if refusal:
                message = QUEUE_FULL if "queue is full" in refusal.lower() else refusal
                status = self.board.update(session, tab, phase="error", message=message)
            else:
                queue = self._line_view(session)
        return render(status, queue), gr.Timer(active=not status.final)

    def _line_view(self, session: str) -> QueueView | None:
        line = self.sessions.line(session)
        if line is None:
            return None
        ahead, own = line
        remaining = 0.0
        for other, units in ahead:
            running = self.board.running(other)
            share = running.done / running.total if running is not None and running.total else 0.0
            remaining += units * (1 - share)
        starts_in, takes = self.pace.seconds(remaining), self.pace.seconds(own)
        if starts_in is not None:
            starts_in /= self.gpu_limit
        return QueueView(len(ahead), starts_in, takes)

    def cancel(self, request: gr.Request):
        """Stop: the running job ends at its next step (its status line then says after which step); a waiting
        one leaves the queue. (The session's count drops when the job's end passes its event stream, as for any
        other end: see ``queue.SessionCap``.)"""
        session = request.session_hash if request else None
        self.jobs.cancel(session)
        self.board.stop_waiting(session)
