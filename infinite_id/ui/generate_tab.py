"""The Generate tab: a photo (and optional extra photos), the face to use, a prompt and a style -> images.

Endpoints: ``/generate`` (the GPU job) and ``/detect_faces`` (the faces of an uploaded photo, to pick from).
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import service as gen
from ..config import SETTINGS
from ..images import load_image
from . import widgets
from .queue import GPU
from .services import Services
from .widgets import PROGRESS, TabEvents, TabSettings, on_gpu, photo_input, user_errors

FACE_THUMBNAIL = 128
METHODS = [("Infinite-ID", "infinite-id"), ("Adapter baseline", "adapter"), ("Text only (plain SDXL)", "text")]
DEFAULT_PROMPT = "a person wearing a yellow sweater in Times Square"


class GenerateHandlers:
    """``/detect_faces`` and ``/generate``: widget values -> one library call each."""

    def __init__(self, services: Services):
        self.services = services

    def detect_faces(self, photo):
        """The faces in a photo, largest first, to pick from. Hidden when there is at most one."""
        if photo is None:
            return gr.Gallery(value=None, visible=False), 0, ""
        with user_errors():
            image = load_image(photo)
            faces = self.services.get_face_analyzer().analyze(image)
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
        s = self.services
        with user_errors():
            pipe = s.get_pipeline()
            progress(0, desc="Reading the photo")
            identity = None if method == "text" else s.identity(pipe, photo, face_index, extra_photos)
            job = s.request(
                pipe, aspect_ratio, seed, randomize_seed, prompt=prompt, negative_prompt=negative_prompt,
                style=style, method=method, id_scale=id_scale, semantic_scale=semantic_scale,
                style_strength=style_strength, mix_window=(mix_start, mix_end), num_inference_steps=steps,
                guidance_scale=guidance, num_images=num_images, fast=fast,
            )
            with s.running(request) as cancel:
                result = gen.generate(pipe, job, identity, on_step=widgets.progress_reporter(progress, "Generating"),
                                      cancel=cancel, deadline=s.deadline())
            images, text_images, info = s.screen(result, text_stream=bool(show_text_stream))
            paths = s.save(images, "infinite-id")
            gallery = [(p, item.caption()) for p, item in zip(paths, images)]
            text_gallery = None
            if show_text_stream and text_images:
                text_paths = s.save(text_images, "text-stream")
                text_gallery = [(p, f"text stream (no identity) · {item.caption()}")
                                for p, item in zip(text_paths, text_images)]
        return gallery, gr.Gallery(value=text_gallery, visible=bool(text_gallery)), info, paths, result.seed


def selected_face(event: gr.SelectData):
    index = int(event.index)
    return index, f"Using face {index}{' (the largest)' if index == 0 else ''}. Click another face to change."


def _inputs(settings: TabSettings) -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.photo = photo_input(label="Photo of the person", height=320, elem_id="photo")
    with gr.Group(visible=True):
        ui.faces = gr.Gallery(label="Faces in the photo (click to pick)", visible=False, columns=4, height=190,
                              allow_preview=False, object_fit="contain", elem_id="faces")
        ui.face_note = gr.Markdown("", label="Faces found", elem_classes="similarity-note")
        ui.face_index = gr.Number(value=0, precision=0, minimum=0, label="Face number (0 = largest)",
                                  elem_id="face-index")
    ui.extra_photos = gr.File(label="More photos of the same person (optional, averaged)", file_count="multiple",
                              file_types=["image"], height=90, value=[])
    ui.prompt = gr.Textbox(label="Prompt", lines=2, max_length=SETTINGS.max_prompt_chars, value=DEFAULT_PROMPT,
                           placeholder="a photo of a woman wearing a yellow sweater in Times Square",
                           elem_id="prompt")
    with gr.Row():
        ui.style = gr.Dropdown(settings.style_choices, value=settings.default_style, label="Style", elem_id="style")
        ui.aspect = gr.Dropdown(list(gen.ASPECT_RATIOS), value=gen.DEFAULT_ASPECT, label="Aspect ratio")
    with gr.Row():
        ui.run = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=3)
        ui.stop = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
    with gr.Accordion("Advanced", open=False):
        _advanced(ui, settings)
    return ui


def _advanced(ui: SimpleNamespace, settings: TabSettings) -> None:
    ui.negative = gr.Textbox("", label="Negative prompt", lines=1, max_length=SETTINGS.max_prompt_chars,
                             placeholder="what to keep out of the picture")
    ui.method = gr.Radio(METHODS, value="infinite-id", label="Method")
    ui.id_scale = gr.Slider(*gen.ID_SCALE_RANGE, value=1.0, step=0.05, label="Identity strength",
                            info="how strongly the face is imposed (0: no identity)")
    ui.semantic_scale = gr.Slider(*gen.SEMANTIC_SCALE_RANGE, value=1.0, step=0.05, label="Semantic strength",
                                  info="how much the text stream steers the identity stream "
                                       "(mixed attention; 0 turns mixing off)")
    ui.style_strength = gr.Slider(*gen.STYLE_STRENGTH_RANGE,
                                  value=settings.recommended_strength(settings.default_style), step=0.05,
                                  label="Style strength (AdaIN-mean)",
                                  info="how much of the text stream's look is carried over; set from the style preset")
    with gr.Row():
        ui.mix_start = gr.Slider(0, 1, value=0.0, step=0.05, label="Mixing starts at")
        ui.mix_end = gr.Slider(0, 1, value=1.0, step=0.05, label="Mixing ends at")
    with gr.Row():
        ui.steps = gr.Slider(*gen.STEPS_RANGE, value=settings.steps, step=1, label="Steps")
        ui.guidance = gr.Slider(*gen.GUIDANCE_RANGE, value=settings.guidance, step=0.5, label="Guidance")
    with gr.Row():
        ui.seed = gr.Number(value=0, precision=0, minimum=0, maximum=gen.MAX_SEED,
                            label="Seed (shows the seed used)", elem_id="seed")
        ui.randomize = gr.Checkbox(value=True, label="Randomize seed")
    with gr.Row():
        ui.num_images = gr.Slider(*gen.NUM_IMAGES_RANGE, value=1, step=1, label="Number of images")
        ui.fast = gr.Checkbox(
            value=settings.fast, label=f"Fast mode ({gen.FAST_STEPS} steps)",
            info="full quality needs the app started with --fast (the distilled LoRA)"
            if not settings.fast else "the step-distilled LoRA is loaded")
        ui.show_text = gr.Checkbox(value=False, label="Also show the text stream (same seed, no identity)")


def _outputs() -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.gallery = gr.Gallery(label="Results (identity similarity to the photo in each caption)", columns=2,
                            height=520, format="png", elem_id="results", buttons=["download", "fullscreen"])
    ui.text_gallery = gr.Gallery(label="Text stream: the same seed without the person", columns=2, height=260,
                                 format="png", visible=False)
    ui.info = gr.Markdown(label="Generation info", elem_id="generation-info")
    ui.files = gr.File(label="PNG files with generation settings (reproducible)", file_count="multiple",
                       interactive=False)
    return ui


def build(services: Services, settings: TabSettings) -> TabEvents:
    """The tab's layout and events (call inside ``gr.Tabs``)."""
    handlers = GenerateHandlers(services)
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column(scale=1):
                ui = _inputs(settings)
            with gr.Column(scale=1):
                out = _outputs()
        if settings.examples.get("generate"):
            gr.Examples(settings.examples["generate"], inputs=[ui.photo, ui.prompt, ui.style], label="Examples")

    private = {"api_visibility": "private"}
    ui.photo.change(handlers.detect_faces, ui.photo, [ui.faces, ui.face_index, ui.face_note],
                    api_name="detect_faces", concurrency_id="faces", concurrency_limit=2)
    ui.faces.select(selected_face, None, [ui.face_index, ui.face_note], **private)
    ui.style.change(settings.recommended_strength, ui.style, ui.style_strength, queue=False, **private)
    run = ui.run.click(
        on_gpu(handlers.generate),
        [ui.photo, ui.prompt, ui.style, ui.aspect, ui.negative, ui.id_scale, ui.semantic_scale, ui.style_strength,
         ui.mix_start, ui.mix_end, ui.steps, ui.guidance, ui.seed, ui.randomize, ui.num_images, ui.method, ui.fast,
         ui.show_text, ui.face_index, ui.extra_photos],
        [out.gallery, out.text_gallery, out.info, out.files, ui.seed],
        api_name="generate", concurrency_id=GPU, concurrency_limit=settings.gpu_limit,
    )
    return TabEvents(run=run, stop=ui.stop)
