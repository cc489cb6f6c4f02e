"""Pieces every tab uses: the photo widget, library errors as sentences, step progress, ZeroGPU."""

from __future__ import annotations

import base64
import html
import inspect
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

import gradio as gr

from .queue import GPU

logger = logging.getLogger("infinite_id.app")
# Steps that only update the page: no API endpoint, no spinner.
PRIVATE = {"api_visibility": "private", "show_progress": "hidden"}

# Gradio finds a handler's progress tracker by its default value. A default is built once either way, and the
# tracker keeps no per-call state for (done, total) updates (the event comes from a context variable).
PROGRESS = gr.Progress()


def photo_input(**kwargs) -> gr.Image:
    """A ``gr.Image`` (upload, webcam, clipboard) whose handler gets the uploaded file untouched.

    ``gr.Image`` opens every upload with PIL before the handler runs, so a damaged or non-image file fails inside
    Gradio with a bare "Error". This widget's preprocess is replaced (on the instance: a subclass would make
    Gradio write a .pyi stub next to this file) by one that passes the file's path, or the bytes of a data URL,
    so ``infinite_id.images.load_image`` decides, with a sentence a person understands.
    """
    kwargs.setdefault("sources", ["upload", "webcam", "clipboard"])
    image = gr.Image(type="filepath", image_mode=None, **kwargs)

    def preprocess(payload):
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):  # inline uploads (API clients may send these)
            header, _, data = payload.url.partition(",")
            return base64.b64decode(data) if header.endswith(";base64") else unquote_to_bytes(data)
        return str(payload.path) if payload.path else None

    image.preprocess = preprocess
    return image


TOAST_S = 6  # how long an error's pop-up stays; the tab's status line keeps the sentence after it fades


@contextmanager
def user_errors(on_error: Callable[[str, Exception], None] | None = None):
    """Library errors -> ``gr.Error`` sentences; anything else is logged with its traceback and answered with a
    generic sentence. The server keeps serving either way. ``on_error(sentence, error)`` sees the sentence first
    (the tab's status line keeps it). Messages are HTML-escaped: Gradio renders them as HTML.

    An expected error (a ``ValueError``: a bad photo, no usable face, a blank or out-of-memory generation, a
    cancelled job, missing weights) is the person's to fix, so the log gets one INFO line, no traceback."""
    try:
        yield
    except gr.Error as error:
        _refuse(str(error.message), error, on_error)
    except (ValueError, FileNotFoundError) as error:
        _refuse(str(error), error, on_error)
    except Exception as error:
        logger.exception("A request failed")
        sentence = ("Something went wrong on our side. Please try again; if it keeps happening, the server log has "
                    "the details.")
        if on_error is not None:
            on_error(sentence, error)
        raise gr.Error(sentence, duration=TOAST_S, print_exception=False) from None


def _refuse(sentence: str, error: Exception, on_error) -> None:
    logger.info("Request not done (%s): %s", type(error).__name__, sentence)
    if on_error is not None:
        on_error(sentence, error)
    raise gr.Error(html.escape(sentence, quote=False), duration=TOAST_S, print_exception=False) from None


def on_gpu(function: Callable, duration: int = 120) -> Callable:
    """On a ZeroGPU Space, ``spaces.GPU`` attaches a GPU for the duration of each call; elsewhere a no-op.
    ``app.py`` imports ``spaces`` first (before torch sets up CUDA); here it is only looked up."""
    try:
        import spaces
    except ImportError:
        return function
    return spaces.GPU(duration=duration)(function)


def progress_reporter(progress: gr.Progress, desc: str):
    """The library's step callback ``(done, total)`` as Gradio progress in steps."""

    def report(done: int, total: int) -> None:
        progress((done, total), desc=desc, unit="steps")

    return report


@dataclass(frozen=True)
class TabSettings:
    """What every tab builder needs to know about the app: the style presets, the sliders' starting values (the
    loaded sampling mode's), the examples, how many GPU jobs may run at once, whether the loaded adapter carries a
    LoRA (its slider shows only then) and the engine's note on identity scores (shown under every result)."""

    styles: dict
    default_style: str
    steps: int
    guidance: float
    fast: bool
    gpu_limit: int
    examples: dict[str, list[list[str]]] = field(default_factory=dict)
    lora: bool = False
    identity_note: str | None = None

    @property
    def style_choices(self) -> list[str]:
        return list(self.styles)

    def recommended_strength(self, name: str) -> float:
        return self.styles[name].style_strength if name in self.styles else 1.0


def identity_note(settings: TabSettings, elem_id: str) -> None:
    """Under a tab's results, where the captions give identity scores: the engine's word on what they are worth
    (the tiny engine's recognizer has random weights, so its scores mean nothing). Nothing when there is none."""
    if settings.identity_note:
        gr.Markdown(f"**About the identity scores:** {settings.identity_note}", elem_id=elem_id,
                    elem_classes=["small-note", "identity-note"])


@dataclass(frozen=True)
class TabEvents:
    """What a tab hands back to the app: its GPU event (the Stop buttons of every tab cancel all of them) and its
    Stop button (wired by the app, which knows every tab's event)."""

    run: Any
    stop: gr.Button
    units: Callable[[list], float]  # a queue join's data -> the job's work in image-steps (time estimates)


def by_position(handler: Callable, estimate: Callable[..., float]) -> Callable[[list], float]:
    """``estimate`` (keyword arguments named as ``handler``'s) for a queue join's data, a list in the handler's
    parameter order."""
    names = [n for n in inspect.signature(handler).parameters if n not in ("request", "progress")]
    return lambda data: estimate(**dict(zip(names, data)))


def status_events(services, tab: str) -> tuple[Callable, Callable]:
    """``(begin, view)`` for ``tab``'s status line: ``begin`` says at once that a job was sent, ``view`` shows the
    line now (queue place, progress, or how the job ended) and whether the page should keep asking."""

    def begin(request: gr.Request):
        return services.begin(request, tab)

    def view(request: gr.Request):
        return services.view(request, tab)

    return begin, view


def gpu_run(services, tab: str, settings: TabSettings, ui, timer: gr.Timer, handler: Callable, inputs: list,
            outputs: list, *, api_name: str, units: Callable[..., float], duration: int = 120) -> TabEvents:
    """A tab's Run button, wired the same way in every tab: the status line says the job was sent (at once, off
    the queue), ``handler`` takes the GPU slot, and the line shows how the job ended after a success and after an
    error alike (Gradio runs ``.then()`` steps after a success only); ``timer`` refreshes it meanwhile. ``ui``
    has ``run``, ``stop`` and ``status``."""
    begin, view = status_events(services, tab)
    status = [ui.status, timer]
    timer.tick(view, None, status, queue=False, **PRIVATE)
    run = ui.run.click(begin, None, status, queue=False, **PRIVATE).then(
        on_gpu(handler, duration), inputs, outputs, api_name=api_name, concurrency_id=GPU,
        concurrency_limit=settings.gpu_limit, show_progress="hidden",
    )
    for after in (run.then, run.failure):
        after(view, None, status, queue=False, **PRIVATE)
    return TabEvents(run=run, stop=ui.stop, units=by_position(handler, units))
