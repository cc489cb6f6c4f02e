"""The Generate tab: a photo (and optional extra photos), the face to use, a prompt and a style -> images.

Endpoints: ``/generate`` (the GPU job) and ``/detect_faces`` (the faces of an uploaded photo, to pick from); both
return plain values (lists, strings, numbers, files). What only the page needs (which widgets show, the status
line) is set by private steps chained after them.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import service as gen
from ..config import SETTINGS
from ..images import load_image
from .services import Services
from .widgets import (
    PRIVATE,
    PROGRESS,
    TabEvents,
    TabSettings,
    gpu_run,
    identity_note,
    photo_input,
    status_events,
    user_errors,
)

TAB = "generate"
FACE_THUMBNAIL = 128
METHODS = [("Infinite-ID (recommended)", "infinite-id"), ("Adapter baseline, for comparison", "adapter"),
           ("Prompt only, no face", "text")]
DEFAULT_PROMPT = "a person wearing a yellow sweater in Times Square"


def units(steps=30, num_images=1, method="infinite-id", fast=False, mix_start=0.0, mix_end=1.0,
          show_text_stream=False, **_) -> float:
    """The job's work in image-steps: the identity stream at every step and, in Infinite-ID, the text stream to the
    end when it is shown, else until the mixing window ends (the call drops it there: ``text_stream``)."""
    text = 0.0
    if method == "infinite-id":
        text = 1.0 if show_text_stream else max(gen.clamped(mix_start, 0.0, 0.0, 1.0), gen.clamped(mix_end, 1.0, 0.0, 1.0))
    return (gen.FAST_STEPS if fast else float(steps)) * float(num_images) * (1.0 + text)


class GenerateHandlers:
    """``/detect_faces`` and ``/generate``: widget values -> one library call each."""

    def __init__(self, services: Services):
        self.services = services

    def detect_faces(self, photo, request: gr.Request):
        """The faces in a photo, largest first, to pick from: (faces as (thumbnail, caption), the face index
        used (0, the largest), a note). Faces are numbered from 1 in captions, as people count."""
        board, session = self.services.board, request.session_hash if request else None
        idle = board.get(session, TAB).final  # a photo change never hides a running job's status
        if photo is None:
            if idle:
                board.update(session, TAB, phase="idle", message="")
            return [], 0, ""

        def record(sentence, _error):
            if idle:
                board.update(session, TAB, phase="error", message=sentence)

        with user_errors(record), gen.named("the photo"):
            image = load_image(photo)
            faces = self.services.get_face_analyzer().analyze(image)
        if idle:
            board.update(session, TAB, phase="idle", message="")
        thumbs = [(gen.face_thumbnail(image, face, FACE_THUMBNAIL), f"face {i + 1}{' (largest)' if i == 0 else ''}")
                  for i, face in enumerate(faces)]
        note = (f"{len(faces)} faces found. Using face 1, the largest: click another to use it instead."
                if len(faces) > 1 else "One face found.")
        return thumbs, 0, note

    def generate(
        self, photo, prompt, style, aspect_ratio, negative_prompt, id_scale, semantic_scale, style_strength,
        mix_start, mix_end, steps, guidance, seed, randomize_seed, num_images, method, fast, show_text_stream,
        face_index, extra_photos, lora_scale=1.0, request: gr.Request = None, progress=PROGRESS,
    ):
        """New images of the person in ``photo`` following ``prompt``: (gallery, text-stream gallery (empty
        unless asked for), info, PNG files, seed used). ``lora_scale`` (last, so older API calls still fit): the
        adapter's own LoRA on the identity stream, 0 to 2, 1 as trained; no effect when the adapter has none."""
        s = self.services
        work = units(steps, num_images, method, fast, mix_start, mix_end, show_text_stream)
        with s.job(request, TAB, work, progress, "Generating", "Reading the photo...") as report:
            pipe = s.get_pipeline()
            progress(0, desc="Reading the photo")
            identity = None if method == "text" else s.identity(pipe, photo, face_index, extra_photos)
            job = s.request(
                pipe, aspect_ratio, seed, randomize_seed, prompt=prompt, negative_prompt=negative_prompt,
                style=style, method=method, id_scale=id_scale, semantic_scale=semantic_scale,
                style_strength=style_strength, mix_window=(mix_start, mix_end), num_inference_steps=steps,
                guidance_scale=guidance, num_images=num_images, fast=fast, lora_scale=lora_scale,
                text_stream=bool(show_text_stream),
            )
            with s.running(request) as cancel:
                result = gen.generate(pipe, job, identity, on_step=report.step, cancel=cancel, deadline=s.deadline())
            images, text_images, info = s.screen(result, text_stream=bool(show_text_stream))
            paths = s.save(images, "infinite-id")
            gallery = [(p, item.caption()) for p, item in zip(paths, images)]
            text_gallery = []
            if show_text_stream and text_images:
                text_paths = s.save(text_images, "text-stream")
                text_gallery = [(p, f"text stream (no identity) · {item.caption()}")
                                for p, item in zip(text_paths, text_images)]
            report.finished(f"{len(images)} picture{'s' if len(images) > 1 else ''}.")
        return gallery, text_gallery, info, paths, result.seed


def show_picker(faces, note: str):
    """After ``/detect_faces``: the face picker shows only when the photo has several faces."""
    count = len(faces or [])
    return gr.Group(visible=count > 1), gr.Number(value=1, maximum=max(count, 1)), note


def hide_picker():
    """After ``/detect_faces`` failed: no faces to pick (the status line says why)."""
    return gr.Group(visible=False), gr.Number(value=1), ""


def selected_face(event: gr.SelectData):
    number = int(event.index) + 1
    return number, f"Using face {number}{' (the largest)' if number == 1 else ''}. Click another face to change."


def _inputs(settings: TabSettings) -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.photo = photo_input(label="Photo of the person", height=300, elem_id="photo")
    ui.face_note = gr.Markdown("", elem_classes="small-note", elem_id="face-note")
    with gr.Group(visible=False, elem_id="face-picker") as ui.picker:
        ui.faces = gr.Gallery(label="Several faces: click the one to use", show_label=False, columns=3, height=150,
                              allow_preview=False, interactive=False, object_fit="contain", elem_id="faces")
        ui.face_number = gr.Number(value=1, precision=0, minimum=1, label="Face number (1 = the largest)",
                                   elem_id="face-number")
    # What /detect_faces returns (plain values for API clients); the page shows them through the widgets above.
    ui.face_index = gr.Number(value=0, precision=0, minimum=0, visible=False, elem_id="face-index")
    ui.face_summary = gr.Textbox("", visible=False)
    ui.prompt = gr.Textbox(label="Prompt", info="the scene, the clothes, the mood", lines=2,
                           max_length=SETTINGS.max_prompt_chars, value=DEFAULT_PROMPT,
                           placeholder="a photo of a woman wearing a yellow sweater in Times Square",
                           elem_id="prompt")
    with gr.Row():
        ui.style = gr.Dropdown(settings.style_choices, value=settings.default_style, label="Style", elem_id="style",
                               min_width=200)
        ui.aspect = gr.Dropdown(list(gen.ASPECT_RATIOS), value=gen.DEFAULT_ASPECT, label="Shape and size",
                                elem_id="aspect", min_width=220)
    with gr.Row(elem_classes="run-row"):
        ui.run = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=3, min_width=120)
        ui.stop = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1, min_width=80)
    ui.status = gr.HTML("", elem_id="generate-status", elem_classes="status-line")
    with gr.Accordion("More photos (optional)", open=False):
        ui.extra_photos = gr.File(label="More photos of the same person, averaged in for a steadier likeness",
                                  file_count="multiple", file_types=["image"], value=[], elem_id="extra-photos")
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        _advanced(ui, settings)
    return ui


def _advanced(ui: SimpleNamespace, settings: TabSettings) -> None:
    ui.negative = gr.Textbox("", label="What to keep out of the picture", info="negative prompt", lines=1,
                             max_length=SETTINGS.max_prompt_chars, placeholder="blurry, extra fingers")
    ui.method = gr.Radio(METHODS, value="infinite-id", label="Method",
                         info="Infinite-ID keeps the face and the prompt in two streams; the adapter baseline "
                              "puts the face into the prompt's stream; prompt only is plain SDXL")
    ui.id_scale = gr.Slider(*gen.ID_SCALE_RANGE, value=1.0, step=0.05, label="How much it looks like the person",
                            info="identity strength (id_scale); 0 leaves the face out")
    # The adapter's LoRA only exists on some adapters (FaceID-PlusV2): the slider shows only when it does. Its value
    # still reaches /generate when hidden (1.0, as trained), so the API takes lora_scale either way.
    ui.lora_scale = gr.Slider(*gen.LORA_SCALE_RANGE, value=1.0, step=0.05, label="Adapter's own fine-tuning",
                              info="the identity adapter's LoRA (lora_scale), on the identity stream only: 1 = as "
                                   "the adapter was trained, 0 = off", visible=settings.lora, elem_id="lora-scale")
    ui.semantic_scale = gr.Slider(*gen.SEMANTIC_SCALE_RANGE, value=1.0, step=0.05,
                                  label="How much the picture follows the prompt",
                                  info="semantic strength: mixed attention lets the text stream steer the "
                                       "identity stream; 0 turns mixing off")
    ui.style_strength = gr.Slider(*gen.STYLE_STRENGTH_RANGE,
                                  value=settings.recommended_strength(settings.default_style), step=0.05,
                                  label="How strongly the style shows",
                                  info="style strength (AdaIN-mean of the text stream's look); set by the style")
    with gr.Row():
        ui.mix_start = gr.Slider(0, 1, value=0.0, step=0.05, label="Blend prompt and face from", min_width=220,
                                 info="mixing window start, as a share of the steps")
        ui.mix_end = gr.Slider(0, 1, value=1.0, step=0.05, label="... until", min_width=220,
                               info="mixing window end (1: the last step)")
    with gr.Row():
        ui.steps = gr.Slider(*gen.STEPS_RANGE, value=settings.steps, step=1, label="Steps (more: finer, slower)",
                             min_width=220, info="denoising steps", elem_id="steps")
        ui.guidance = gr.Slider(*gen.GUIDANCE_RANGE, value=settings.guidance, step=0.5, min_width=220,
                                label="How literally to take the words", info="guidance scale (CFG)")
    ui.seed = gr.Number(value=0, precision=0, minimum=0, maximum=gen.MAX_SEED, label="Seed", elem_id="seed",
                        info="the same seed and settings give the same picture")
    ui.randomize = gr.Checkbox(value=True, label="New seed each time")
    ui.num_images = gr.Slider(*gen.NUM_IMAGES_RANGE, value=1, step=1, label="Number of pictures")
    # Fast mode needs the step-distilled LoRA fused at start-up: offered only when this server has it.
    ui.fast = gr.Checkbox(value=settings.fast, label=f"Fast mode ({gen.FAST_STEPS} steps)", visible=settings.fast,
                          info="the step-distilled LoRA loaded on this server")
    ui.show_text = gr.Checkbox(value=False, label="Also show the same picture without the person",
                               info="the text stream: same seed, no identity", elem_id="show-text")


def _outputs(settings: TabSettings) -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.gallery = gr.Gallery(label="Results", columns=2,
                            height="auto", format="png", elem_id="results", buttons=["download", "fullscreen"])
    ui.text_gallery = gr.Gallery(label="Without the person", columns=2, height="auto",
                                 format="png", visible=False, elem_id="text-results")
    ui.info = gr.Markdown(elem_id="generation-info", elem_classes="small-note")
    identity_note(settings, "generate-identity-note")
    ui.files = gr.File(label="PNG files (each keeps its settings, to make it again)", file_count="multiple",
                       interactive=False, elem_id="files")
    return ui


def build(services: Services, settings: TabSettings) -> TabEvents:
    """The tab's layout and events (call inside ``gr.Tabs``)."""
    handlers = GenerateHandlers(services)
    with gr.Tab("Generate", id=TAB):
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                ui = _inputs(settings)
            with gr.Column(scale=1, min_width=300):
                out = _outputs(settings)
        if settings.examples.get("generate"):
            gr.Examples(settings.examples["generate"], inputs=[ui.photo, ui.prompt, ui.style], label="Examples",
                        elem_id="generate-examples")
        timer = gr.Timer(1.0, active=False)

    _, view = status_events(services, TAB)
    detect = ui.photo.change(handlers.detect_faces, ui.photo, [ui.faces, ui.face_index, ui.face_summary],
                             api_name="detect_faces", concurrency_id="faces", concurrency_limit=2,
                             show_progress="hidden")
    picker = [ui.picker, ui.face_number, ui.face_note]
    # Gradio runs .then() steps after a success only: .failure() steps cover the error.
    detect.then(show_picker, [ui.faces, ui.face_summary], picker, queue=False, **PRIVATE)
    detect.failure(hide_picker, None, picker, queue=False, **PRIVATE)
    for after in (detect.then, detect.failure):
        after(view, None, [ui.status, timer], queue=False, **PRIVATE)
    ui.faces.select(selected_face, None, [ui.face_number, ui.face_note], queue=False, **PRIVATE)
    ui.face_number.change(lambda n: max(0, int(n or 1) - 1), ui.face_number, ui.face_index, queue=False, **PRIVATE)
    ui.style.change(settings.recommended_strength, ui.style, ui.style_strength, queue=False, **PRIVATE)
    ui.show_text.change(lambda on: gr.Gallery(visible=bool(on)), ui.show_text, out.text_gallery, queue=False,
                        **PRIVATE)
    inputs = [ui.photo, ui.prompt, ui.style, ui.aspect, ui.negative, ui.id_scale, ui.semantic_scale,
              ui.style_strength, ui.mix_start, ui.mix_end, ui.steps, ui.guidance, ui.seed, ui.randomize,
              ui.num_images, ui.method, ui.fast, ui.show_text, ui.face_index, ui.extra_photos, ui.lora_scale]
    return gpu_run(services, TAB, settings, ui, timer, handlers.generate, inputs,
                   [out.gallery, out.text_gallery, out.info, out.files, ui.seed], api_name="generate", units=units)
