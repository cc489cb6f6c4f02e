"""The Infinite-ID app: a Gradio Blocks UI over ``infinite_id.service``.

This file is the composition root. ``build_demo(get_pipeline, get_face_analyzer)`` lays out the widgets; each
handler turns widget values into one library call and the library's errors into sentences (``gr.Error``). Models
are loaded once, in ``main()``, after the start-up check, never at import; the server only starts under
``__main__``. Launch settings (DESIGN 7) live in ``QUEUE_OPTIONS`` and ``launch_options`` so the tests use the same.

    python app.py                      # the real model on http://127.0.0.1:7860
    python app.py --engine tiny        # random weights: a fast end-to-end check, no download
"""

import argparse
import atexit
import base64
import html
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote_to_bytes

import gradio as gr

try:  # Hugging Face ZeroGPU: `spaces` must be imported before torch sets up CUDA (the engine imports torch)
    import spaces
except ImportError:
    spaces = None

from infinite_id import service as gen
from infinite_id.config import SERVER, SETTINGS
from infinite_id.images import load_image
from infinite_id.models.engines import TINY_BANNER, TINY_STEPS, Engine, add_engine_arguments, load_engine_from_args
from infinite_id.service.styles import default_style_name, load_styles

logger = logging.getLogger("infinite_id.app")

ROOT = Path(__file__).resolve().parent
ASSETS_DIR = ROOT / "assets"
TITLE = "Infinite-ID: your face, any prompt, any style"

# DESIGN 7: bounded queue, one GPU job at a time, uploads capped, uploaded and generated files deleted after an
# hour (checked every 30 minutes), no flagging (Blocks has none unless added), no share link unless asked for.
# Every number is a config.ServerSettings field (INFINITE_ID_* environment variables; docs/reliability.md).
QUEUE_OPTIONS = {"max_size": SERVER.queue_max_size, "default_concurrency_limit": 1}
DELETE_CACHE = (SERVER.delete_cache_every_s, SERVER.delete_cache_age_s)
OUTPUT_MAX_AGE_S = DELETE_CACHE[1]
GPU = "gpu"  # the concurrency id of every event that runs the pipeline
BUSY_SESSION = ("You already have a generation waiting or running. Wait for it to finish (or press Stop) before "
                "starting another, so everyone in the queue gets a turn.")
FACE_THUMBNAIL = 128
# Gradio finds a handler's progress tracker by its default value. A default is built once either way, and the
# tracker keeps no per-call state for (done, total) updates (the event comes from a context variable).
PROGRESS = gr.Progress()

CSS = """
#engine-banner {background: #fff3cd; border: 2px solid #d39e00; border-radius: 8px; padding: 6px 12px;}
#engine-banner p {color: #5c4400; margin: 0;}
.similarity-note {font-size: 0.9em; opacity: 0.8;}
"""


# --- widgets --------------------------------------------------------------------------------------------------------


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


# --- services shared by every request (never per-call state) --------------------------------------------------------


class Jobs:
    """Cooperative cancel: one flag per browser session's running job.

    Gradio's cancel stops waiting for a handler, but the handler's thread runs on to the end, holding the GPU
    slot. The Stop button also sets this flag, which the step callback checks, so the pipeline call ends at the
    next step. Every job gets a fresh flag, so a cancel never leaks into the next job.
    """

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    @contextmanager
    def running(self, session: str | None):
        flag = threading.Event()
        key = session or uuid.uuid4().hex
        with self._lock:
            self._flags[key] = flag
        try:
            yield flag
        finally:
            with self._lock:
                if self._flags.get(key) is flag:
                    del self._flags[key]

    def cancel(self, session: str | None) -> bool:
        with self._lock:
            flag = self._flags.get(session or "")
        if flag is not None:
            flag.set()
        return flag is not None


class OutputFolder:
    """Where this server writes PNGs before Gradio serves them: one subfolder per request, removed after an hour
    and at exit (Gradio deletes its own copies on the same schedule through ``delete_cache``)."""

    def __init__(self, root: Path | None = None, max_age_s: float = OUTPUT_MAX_AGE_S):
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


@contextmanager
def user_errors():
    """Library errors -> ``gr.Error`` sentences; anything else is logged and answered with a generic sentence.
    The server keeps serving either way. Messages are HTML-escaped: Gradio renders them as HTML."""
    try:
        yield
    except gr.Error:
        raise
    except (ValueError, FileNotFoundError) as error:
        # Every user-facing error of the library is one of these, with a sentence for the person: a bad image,
        # no usable face, a blank or out-of-memory generation, a cancelled job, missing weights.
        raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from None
    except Exception:
        logger.exception("A request failed")
        raise gr.Error(
            "Something went wrong on our side. Please try again; if it keeps happening, the server log has "
            "the details.",
            print_exception=False,
        ) from None


def _on_gpu(function: Callable, duration: int = 120) -> Callable:
    """On a ZeroGPU Space, ``spaces.GPU`` attaches a GPU for the duration of each call; elsewhere a no-op."""
    if spaces is None:
        return function
    return spaces.GPU(duration=duration)(function)


def _progress_reporter(progress: gr.Progress, desc: str):
    def report(done: int, total: int) -> None:
        progress((done, total), desc=desc, unit="steps")

    return report


# --- handlers -------------------------------------------------------------------------------------------------------


class Handlers:
    """Turns widget values into one library call each. Holds only shared services: the engine getters, the
    identity cache (content-keyed, so safe across requests), the cancel flags and the output folder."""

    def __init__(self, get_pipeline: Callable, get_face_analyzer: Callable, outputs: OutputFolder | None = None,
                 timeout_s: float | None = None, guard: gen.OutputGuard | None = None):
        self.get_pipeline = get_pipeline
        # Built here, at start-up: a safety checker that cannot be imported stops the app before any request.
        self.guard = guard or gen.OutputGuard.from_settings(SERVER)
        self.get_face_analyzer = get_face_analyzer
        self.timeout_s = SERVER.request_timeout_s if timeout_s is None else timeout_s
        self.identities = gen.IdentityCache()
        self.jobs = Jobs()
        self.outputs = outputs or OutputFolder()

    # - shared steps -
    def _identity(self, pipe, photo, face_index=0, extra_photos=None) -> gen.Identity:
        if photo is None:
            raise gr.Error("Upload a photo of the person first (or take one with the webcam).")
        extras = [p for p in (extra_photos or []) if p]
        return self.identities.encode(
            pipe, photo, face_index=int(face_index or 0), extra_photos=extras, analyzer=self.get_face_analyzer()
        )

    @staticmethod
    def _request(pipe, aspect_ratio, seed, randomize_seed, **values) -> gen.GenerationRequest:
        width, height = gen.size_for(aspect_ratio, gen.native_size(pipe))
        return gen.GenerationRequest(
            width=width, height=height, seed=None if randomize_seed else seed, **values
        ).with_seed()

    def _save(self, images: list[gen.GeneratedImage], stem: str) -> list[str]:
        folder = self.outputs.new()
        return [str(p) for p in gen.save_images(images, folder, stem=stem)]

    def _screen(self, result: gen.GenerationResult, text_stream: bool = False):
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

    # - endpoints -
    def detect_faces(self, photo):
        """The faces in a photo, largest first, to pick from. Hidden when there is at most one."""
        if photo is None:
            return gr.Gallery(value=None, visible=False), 0, ""
        with user_errors():
            image = load_image(photo)
            faces = self.get_face_analyzer().analyze(image)
            thumbs = [
                (gen.face_thumbnail(image, face, FACE_THUMBNAIL), f"face {i}{' (largest)' if i == 0 else ''}")
                for i, face in enumerate(faces)
            ]
        many = len(faces) > 1
        note = (f"{len(faces)} faces found. Using face 0, the largest: click another to use it instead."
                if many else "One face found.")
        return gr.Gallery(value=thumbs, visible=many, selected_index=0), 0, note

    def generate(
        self, photo, prompt, style, aspect_ratio, negative_prompt, id_scale, semantic_scale, style_strength,
        mix_start, mix_end, steps, guidance, seed, randomize_seed, num_images, method, fast, show_text_stream,
        face_index, extra_photos, request: gr.Request, progress=PROGRESS,
    ):
        """New images of the person in ``photo`` following ``prompt``."""
        with user_errors():
            pipe = self.get_pipeline()
            progress(0, desc="Reading the photo")
            identity = None if method == "text" else self._identity(pipe, photo, face_index, extra_photos)
            job = self._request(
                pipe, aspect_ratio, seed, randomize_seed, prompt=prompt, negative_prompt=negative_prompt,
                style=style, method=method, id_scale=id_scale, semantic_scale=semantic_scale,
                style_strength=style_strength, mix_window=(mix_start, mix_end), num_inference_steps=steps,
                guidance_scale=guidance, num_images=num_images, fast=fast,
            )
            with self.jobs.running(request.session_hash if request else None) as cancel:
                result = gen.generate(pipe, job, identity, on_step=_progress_reporter(progress, "Generating"),
                                      cancel=cancel, deadline=gen.deadline_in(self.timeout_s))
            images, text_images, info = self._screen(result, text_stream=bool(show_text_stream))
            paths = self._save(images, "infinite-id")
            gallery = [(p, item.caption()) for p, item in zip(paths, images)]
            text_gallery = None
            if show_text_stream and text_images:
                text_paths = self._save(text_images, "text-stream")
                text_gallery = [(p, f"text stream (no identity) · {item.caption()}")
                                for p, item in zip(text_paths, text_images)]
        return (
            gallery,
            gr.Gallery(value=text_gallery, visible=bool(text_gallery)),
            info,
            paths,
            result.seed,
        )

    def compare(
        self, photo, prompt, mode, style, styles, id_scales, semantic_scales, aspect_ratio, steps, guidance, seed,
        randomize_seed, face_index, request: gr.Request, progress=PROGRESS,
    ):
        """One labelled grid: the same person, prompt and seed across methods, strengths or styles."""
        with user_errors():
            pipe = self.get_pipeline()
            progress(0, desc="Reading the photo")
            identity = self._identity(pipe, photo, face_index)
            job = self._request(
                pipe, aspect_ratio, seed, randomize_seed, prompt=prompt, style=style, num_inference_steps=steps,
                guidance_scale=guidance,
            )
            with self.jobs.running(request.session_hash if request else None) as cancel:
                result = gen.compare(
                    pipe, job, identity, mode, styles=styles or (), id_scales=id_scales,
                    semantic_scales=semantic_scales, on_step=_progress_reporter(progress, "Comparing"), cancel=cancel,
                    deadline=gen.deadline_in(self.timeout_s),
                )
            cells, withheld = self.guard.screen(result.cells)
            if withheld:  # one grid image holds every cell: a withheld cell withholds the grid
                raise gr.Error(gen.WITHHELD_MESSAGE, print_exception=False)
            result.cells, result.grid = cells, self.guard.mark(result.grid)
            grid, cell_paths = gen.save_comparison(result, self.outputs.new(), stem=f"compare-{mode}")
            grid_path, paths = str(grid), [str(p) for p in cell_paths]
            gallery = [(p, cell.caption()) for p, cell in zip(paths, result.cells)]
            info = f"{len(result.cells)} images · seed **{result.seed}** · {result.seconds:.1f} s"
        return grid_path, gallery, [grid_path, *paths], info, result.seed

    def mix(
        self, photo_a, photo_b, weight, prompt, style, aspect_ratio, steps, guidance, seed, randomize_seed,
        request: gr.Request, progress=PROGRESS,
    ):
        """One image of a person between two: ``weight`` 0 is person A, 1 is person B."""
        with user_errors():
            pipe = self.get_pipeline()
            progress(0, desc="Reading the photos")
            if photo_a is None or photo_b is None:
                raise gr.Error("Upload a photo of each of the two people.")
            first, second = self._identity(pipe, photo_a), self._identity(pipe, photo_b)
            job = self._request(
                pipe, aspect_ratio, seed, randomize_seed, prompt=prompt, style=style, num_inference_steps=steps,
                guidance_scale=guidance,
            )
            with self.jobs.running(request.session_hash if request else None) as cancel:
                result = gen.mix(pipe, job, first, second, weight, on_step=_progress_reporter(progress, "Mixing"),
                                 cancel=cancel, deadline=gen.deadline_in(self.timeout_s))
            images, _, info = self._screen(result)
            paths = self._save(images, "mix")
            gallery = [(p, item.caption()) for p, item in zip(paths, images)]
        return gallery, info, paths, result.seed

    def cancel(self, request: gr.Request):
        self.jobs.cancel(request.session_hash if request else None)


# --- layout ---------------------------------------------------------------------------------------------------------


def load_examples(engine: str) -> dict[str, list[list[str]]]:
    """The examples manifest (assets/examples.json), keeping those whose photos this engine can read."""
    path = ASSETS_DIR / "examples.json"
    if not path.exists():
        return {"generate": [], "mix": []}
    manifest = json.loads(path.read_text(encoding="utf-8"))
    keep = [e for e in manifest.get("generate", []) if e.get("engine", engine) == engine]
    mixes = [e for e in manifest.get("mix", []) if e.get("engine", engine) == engine]
    return {
        "generate": [[str(ASSETS_DIR / e["photo"]), e["prompt"], e["style"]] for e in keep],
        "mix": [[str(ASSETS_DIR / e["photo_a"]), str(ASSETS_DIR / e["photo_b"]), e["prompt"]] for e in mixes],
    }


def build_demo(get_pipeline: Callable, get_face_analyzer: Callable, *, engine: str = "real",
               banner: str | None = None, steps: int | None = None, guidance: float = 5.0,
               fast: bool = False, concurrency: int | None = None, delete_cache: tuple[int, int] | None = None,
               timeout_s: float | None = None, guard: gen.OutputGuard | None = None) -> gr.Blocks:
    """The app's Blocks. ``get_pipeline``/``get_face_analyzer`` return the already-loaded engine (the getters are
    only called by handlers). ``engine`` ("real" or "tiny") picks the examples; ``banner`` is shown above
    everything when given; ``steps``/``guidance``/``fast`` are the sliders' starting values (the loaded sampling
    mode's: a fast-mode LoRA is fused at start-up, so its few steps are the right default).
    ``concurrency`` (GPU jobs at once), ``delete_cache`` ((every_s, age_s)) and ``timeout_s`` (per request)
    default to ``config.SERVER``, as does ``guard`` (watermark and safety check); the tests override them."""
    delete_cache = delete_cache or DELETE_CACHE
    # The app's own copies of the outputs follow the same age as Gradio's cache of them.
    handlers = Handlers(get_pipeline, get_face_analyzer, OutputFolder(max_age_s=delete_cache[1]), timeout_s=timeout_s,
                        guard=guard)
    gpu_limit = max(1, int(concurrency or SERVER.gpu_concurrency))
    styles = load_styles()
    style_choices = list(styles)
    default_style = default_style_name()
    default_steps = steps or (TINY_STEPS if engine == "tiny" else 30)
    aspects = list(gen.ASPECT_RATIOS)
    methods = [("Infinite-ID", "infinite-id"), ("Adapter baseline", "adapter"), ("Text only (plain SDXL)", "text")]
    examples = load_examples(engine)

    def recommended_strength(name):
        return styles[name].style_strength if name in styles else 1.0

    with gr.Blocks(title="Infinite-ID", delete_cache=delete_cache, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\nUpload one photo of a person, describe a scene, pick a style. "
                    "Identity and text are handled by two streams, so the prompt and the style stay in charge of "
                    "the picture while the face stays the person's.")
        if banner:
            gr.Markdown(banner, elem_id="engine-banner")

        with gr.Tabs():
            # ---------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=1):
                        photo = photo_input(label="Photo of the person", height=320, elem_id="photo")
                        with gr.Group(visible=True):
                            faces = gr.Gallery(label="Faces in the photo (click to pick)", visible=False,
                                               columns=4, height=190, allow_preview=False, object_fit="contain",
                                               elem_id="faces")
                            face_note = gr.Markdown("", label="Faces found", elem_classes="similarity-note")
                            face_index = gr.Number(value=0, precision=0, minimum=0, label="Face number (0 = largest)",
                                                   elem_id="face-index")
                        extra_photos = gr.File(label="More photos of the same person (optional, averaged)",
                                               file_count="multiple", file_types=["image"], height=90, value=[])
                        prompt = gr.Textbox(label="Prompt", lines=2, max_length=SETTINGS.max_prompt_chars,
                                            value="a person wearing a yellow sweater in Times Square",
                                            placeholder="a photo of a woman wearing a yellow sweater in Times Square",
                                            elem_id="prompt")
                        with gr.Row():
                            style = gr.Dropdown(style_choices, value=default_style, label="Style", elem_id="style")
                            aspect = gr.Dropdown(aspects, value=gen.DEFAULT_ASPECT, label="Aspect ratio")
                        with gr.Row():
                            run_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=3)
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
                        with gr.Accordion("Advanced", open=False):
                            negative = gr.Textbox("", label="Negative prompt", lines=1,
                                                  max_length=SETTINGS.max_prompt_chars,
                                                  placeholder="what to keep out of the picture")
                            method = gr.Radio(methods, value="infinite-id", label="Method")
                            id_scale = gr.Slider(*gen.ID_SCALE_RANGE, value=1.0, step=0.05,
                                                 label="Identity strength",
                                                 info="how strongly the face is imposed (0: no identity)")
                            semantic_scale = gr.Slider(*gen.SEMANTIC_SCALE_RANGE, value=1.0, step=0.05,
                                                       label="Semantic strength",
                                                       info="how much the text stream steers the identity stream "
                                                            "(mixed attention; 0 turns mixing off)")
                            style_strength = gr.Slider(*gen.STYLE_STRENGTH_RANGE,
                                                       value=recommended_strength(default_style), step=0.05,
                                                       label="Style strength (AdaIN-mean)",
                                                       info="how much of the text stream's look is carried over; "
                                                            "set from the style preset")
                            with gr.Row():
                                mix_start = gr.Slider(0, 1, value=0.0, step=0.05, label="Mixing starts at")
                                mix_end = gr.Slider(0, 1, value=1.0, step=0.05, label="Mixing ends at")
                            with gr.Row():
                                steps_slider = gr.Slider(*gen.STEPS_RANGE, value=default_steps, step=1,
                                                         label="Steps")
                                guidance_slider = gr.Slider(*gen.GUIDANCE_RANGE, value=guidance, step=0.5,
                                                            label="Guidance")
                            with gr.Row():
                                seed = gr.Number(value=0, precision=0, minimum=0, maximum=gen.MAX_SEED,
                                                 label="Seed (shows the seed used)", elem_id="seed")
                                randomize = gr.Checkbox(value=True, label="Randomize seed")
                            with gr.Row():
                                num_images = gr.Slider(*gen.NUM_IMAGES_RANGE, value=1, step=1,
                                                       label="Number of images")
                                fast_mode = gr.Checkbox(
                                    value=fast, label=f"Fast mode ({gen.FAST_STEPS} steps)",
                                    info="full quality needs the app started with --fast (the distilled LoRA)"
                                    if not fast else "the step-distilled LoRA is loaded")
                                show_text = gr.Checkbox(value=False, label="Also show the text stream "
                                                                           "(same seed, no identity)")
                    with gr.Column(scale=1):
                        gallery = gr.Gallery(label="Results (identity similarity to the photo in each caption)",
                                             columns=2, height=520, format="png", elem_id="results",
                                             buttons=["download", "fullscreen"])
                        text_gallery = gr.Gallery(label="Text stream: the same seed without the person",
                                                  columns=2, height=260, format="png", visible=False)
                        info = gr.Markdown(label="Generation info", elem_id="generation-info")
                        files = gr.File(label="PNG files with generation settings (reproducible)",
                                        file_count="multiple", interactive=False)
                if examples["generate"]:
                    gr.Examples(examples["generate"], inputs=[photo, prompt, style], label="Examples")

            # ---------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=1):
                        c_photo = photo_input(label="Photo of the person (largest face)", height=260)
                        c_prompt = gr.Textbox(label="Prompt", lines=2, max_length=SETTINGS.max_prompt_chars,
                                              value="a person wearing a yellow sweater in Times Square")
                        c_mode = gr.Radio(
                            [("Methods: text only / adapter / Infinite-ID", "methods"),
                             ("Identity × semantic strength grid", "strengths"),
                             ("Style presets", "styles")],
                            value="methods", label="Compare",
                        )
                        c_style = gr.Dropdown(style_choices, value=default_style,
                                              label="Style (methods and strength grid)")
                        c_styles = gr.CheckboxGroup(style_choices, value=style_choices[:4],
                                                    label="Styles to compare (style presets)")
                        with gr.Row():
                            c_ids = gr.Textbox(value="0.5, 1.0, 1.5", label="Identity strengths (grid rows)")
                            c_sems = gr.Textbox(value="0, 1, 2", label="Semantic strengths (grid columns)")
                        with gr.Row():
                            c_aspect = gr.Dropdown(aspects, value=gen.DEFAULT_ASPECT, label="Aspect ratio")
                            c_steps = gr.Slider(*gen.STEPS_RANGE, value=default_steps, step=1, label="Steps")
                            c_guidance = gr.Slider(*gen.GUIDANCE_RANGE, value=guidance, step=0.5, label="Guidance")
                        with gr.Row():
                            c_seed = gr.Number(value=0, precision=0, minimum=0, maximum=gen.MAX_SEED,
                                               label="Seed (the same for every cell)")
                            c_randomize = gr.Checkbox(value=True, label="Randomize seed")
                        c_face = gr.Number(value=0, precision=0, minimum=0, visible=False)
                        with gr.Row():
                            c_btn = gr.Button("Compare", variant="primary", scale=3)
                            c_stop = gr.Button("Stop", variant="stop", scale=1)
                    with gr.Column(scale=1):
                        c_grid = gr.Image(label="Comparison grid", type="filepath", format="png", interactive=False,
                                          buttons=["download", "fullscreen"])
                        c_gallery = gr.Gallery(label="Each image, with its identity similarity", columns=3,
                                               height=300, format="png")
                        c_info = gr.Markdown(label="Comparison info")
                        c_files = gr.File(label="Grid and images (PNG with settings)", file_count="multiple",
                                          interactive=False)

            # ---------------------------------------------------------------- Identity mixing
            with gr.Tab("Identity mixing", id="mix"):
                with gr.Row():
                    with gr.Column(scale=1):
                        with gr.Row():
                            m_a = photo_input(label="Person A", height=220)
                            m_b = photo_input(label="Person B", height=220)
                        m_weight = gr.Slider(0, 1, value=0.5, step=0.05, label="Blend (0 = person A, 1 = person B)")
                        m_prompt = gr.Textbox(label="Prompt", lines=2, max_length=SETTINGS.max_prompt_chars,
                                              value="a portrait of a person")
                        with gr.Row():
                            m_style = gr.Dropdown(style_choices, value=default_style, label="Style")
                            m_aspect = gr.Dropdown(aspects, value=gen.DEFAULT_ASPECT, label="Aspect ratio")
                        with gr.Row():
                            m_steps = gr.Slider(*gen.STEPS_RANGE, value=default_steps, step=1, label="Steps")
                            m_guidance = gr.Slider(*gen.GUIDANCE_RANGE, value=guidance, step=0.5, label="Guidance")
                        with gr.Row():
                            m_seed = gr.Number(value=0, precision=0, minimum=0, maximum=gen.MAX_SEED, label="Seed")
                            m_randomize = gr.Checkbox(value=True, label="Randomize seed")
                        with gr.Row():
                            m_btn = gr.Button("Mix", variant="primary", scale=3)
                            m_stop = gr.Button("Stop", variant="stop", scale=1)
                    with gr.Column(scale=1):
                        m_gallery = gr.Gallery(label="The blend (similarity to each person in the caption)",
                                               columns=1, height=420, format="png")
                        m_info = gr.Markdown(label="Generation info")
                        m_files = gr.File(label="PNG with settings", file_count="multiple", interactive=False)
                if examples["mix"]:
                    gr.Examples(examples["mix"], inputs=[m_a, m_b, m_prompt], label="Examples")

        gr.Markdown(
            "Similarity is the ArcFace cosine between the face in each output and the face in the photo (the same "
            "person usually scores above about 0.4); *n/a* means no face was found in the output. Every PNG "
            "carries its prompt, seed and settings, so it can be reproduced "
            "(`python -m infinite_id generate --reproduce image.png --photo ...`). Photos are used only for the "
            "request and deleted from the server within the hour.",
            elem_classes="similarity-note",
        )

        # ---------------------------------------------------------------- events
        private = {"api_visibility": "private"}
        photo.change(handlers.detect_faces, photo, [faces, face_index, face_note], api_name="detect_faces",
                     concurrency_id="faces", concurrency_limit=2)
        faces.select(_selected_face, None, [face_index, face_note], **private)
        style.change(recommended_strength, style, style_strength, queue=False, **private)
        gen_event = run_btn.click(
            _on_gpu(handlers.generate),
            [photo, prompt, style, aspect, negative, id_scale, semantic_scale, style_strength, mix_start, mix_end,
             steps_slider, guidance_slider, seed, randomize, num_images, method, fast_mode, show_text, face_index, extra_photos],
            [gallery, text_gallery, info, files, seed],
            api_name="generate", concurrency_id=GPU, concurrency_limit=gpu_limit,
        )
        cmp_event = c_btn.click(
            _on_gpu(handlers.compare, duration=300),
            [c_photo, c_prompt, c_mode, c_style, c_styles, c_ids, c_sems, c_aspect, c_steps, c_guidance, c_seed,
             c_randomize, c_face],
            [c_grid, c_gallery, c_files, c_info, c_seed],
            api_name="compare", concurrency_id=GPU, concurrency_limit=gpu_limit,
        )
        mix_event = m_btn.click(
            _on_gpu(handlers.mix),
            [m_a, m_b, m_weight, m_prompt, m_style, m_aspect, m_steps, m_guidance, m_seed, m_randomize],
            [m_gallery, m_info, m_files, m_seed],
            api_name="mix", concurrency_id=GPU, concurrency_limit=gpu_limit,
        )
        # Stop: cancel this session's job in Gradio and set its flag, so the pipeline call itself ends at the next
        # step. Callable by API clients as /cancel (same session), undocumented.
        for button in (stop_btn, c_stop, m_stop):
            button.click(handlers.cancel, None, None, cancels=[gen_event, cmp_event, mix_event], queue=False,
                         api_name="cancel", api_visibility="undocumented")
    demo.handlers = handlers  # for tests and for callers that want the cache statistics
    return demo


def _selected_face(event: gr.SelectData):
    index = int(event.index)
    return index, f"Using face {index}{' (the largest)' if index == 0 else ''}. Click another face to change."


# --- launching ------------------------------------------------------------------------------------------------------


def enable_queue(demo: gr.Blocks, max_size: int | None = None, session_jobs: int | None = None) -> gr.Blocks:
    """``demo.queue`` with the production options (``QUEUE_OPTIONS``), plus a cap of ``session_jobs`` GPU jobs
    waiting or running per browser session (``config.SERVER.session_jobs``).

    Gradio bounds the queue as a whole, not per person: one script could fill all of it. Gradio has no option
    for that, so the queue's ``push`` (where a request joins) is wrapped on this one instance; a request over
    the cap gets ``BUSY_SESSION`` (HTTP 400) and never enters the queue. Shared by ``main`` and the tests.
    """
    demo.queue(**{**QUEUE_OPTIONS, **({"max_size": max_size} if max_size else {})})
    queue, cap = demo._queue, max(1, int(session_jobs or SERVER.session_jobs))
    push = queue.push

    def gpu_jobs_of(session: str) -> int:
        events = (queue.event_ids_to_events.get(i) for i in list(queue.pending_event_ids_session.get(session, ())))
        return sum(1 for event in events if event is not None and event.fn.concurrency_id == GPU)

    async def push_capped(body, request, username):
        fn = demo.fns.get(body.fn_index) if body.fn_index is not None else None
        if body.session_hash and fn is not None and fn.concurrency_id == GPU and gpu_jobs_of(body.session_hash) >= cap:
            return False, BUSY_SESSION, "error"
        return await push(body, request, username)

    queue.push = push_capped
    return demo



def launch_options(host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> dict:
    """Everything ``Blocks.launch`` gets (DESIGN 7), shared by ``main`` and the tests."""
    return {
        "server_name": host,
        "server_port": port,
        "share": share,
        "max_file_size": SETTINGS.images.max_file_bytes,
        "allowed_paths": [str(ASSETS_DIR)],  # the example photos, wherever the app is started from
        "footer_links": ["api", "gradio", "settings"],
        "run_history": False,  # nobody's prompts or photos kept in a browser's history page
        "ssr_mode": False,  # no Node server needed
        "show_error": False,  # only our gr.Error sentences reach people, never raw exception text
        "theme": gr.themes.Soft(),
        "css": CSS,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The Infinite-ID app.")
    # Spaces and Docker set GRADIO_SERVER_NAME=0.0.0.0; locally the app listens on this machine only.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    add_engine_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request URL is noise, not information
    args = parse_args(argv)
    try:
        guard = gen.OutputGuard.from_settings(SERVER)  # first: a configuration mistake costs no model loading
        engine: Engine = load_engine_from_args(args)
    except (ValueError, FileNotFoundError) as error:  # MissingWeightsError and friends: one message, no traceback
        print(f"\n{error}\n", file=sys.stderr)
        return 1
    except ImportError as error:
        print(f"\nThe real engine cannot be loaded here ({error}). Try `python app.py --engine tiny`.\n",
              file=sys.stderr)
        return 1
    if engine.name == "tiny":
        logger.warning("Serving the tiny engine (%s): every image is noise by design.", TINY_BANNER)
    demo = build_demo(lambda: engine.pipe, lambda: engine.face_analyzer, engine=engine.name, banner=engine.banner,
                      steps=engine.steps, guidance=engine.guidance, fast=engine.fast, guard=guard)
    enable_queue(demo).launch(**launch_options(args.host, args.port, args.share))
    return 0


if __name__ == "__main__":
    sys.exit(main())
