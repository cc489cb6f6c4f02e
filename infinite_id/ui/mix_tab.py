"""The Mix tab: one image of a person between two. Endpoint: ``/mix``."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import service as gen
from ..config import SETTINGS
from .services import Services
from .widgets import PROGRESS, TabEvents, TabSettings, gpu_run, identity_note, photo_input

TAB = "mix"


def units(steps=30, **_) -> float:
    """The job's work in image-steps: one blended Infinite-ID image (identity and text streams)."""
    return 2.0 * float(steps)


class MixHandlers:
    def __init__(self, services: Services):
        self.services = services

    def mix(
        self, photo_a, photo_b, weight, prompt, style, aspect_ratio, steps, guidance, seed, randomize_seed,
        request: gr.Request, progress=PROGRESS,
    ):
        """One image of a person between two, ``weight`` 0 being person A and 1 person B: (gallery, info, PNG
        files, seed used)."""
        s = self.services
        with s.job(request, TAB, units(steps), progress, "Mixing", "Reading the photos...") as report:
            pipe = s.get_pipeline()
            progress(0, desc="Reading the photos")
            first = s.identity(pipe, photo_a, name="Person A")
            second = s.identity(pipe, photo_b, name="Person B")
            job = s.request(pipe, aspect_ratio, seed, randomize_seed, prompt=prompt, style=style,
                            num_inference_steps=steps, guidance_scale=guidance, text_stream=False)
            with s.running(request) as cancel:
                result = gen.mix(pipe, job, first, second, weight, on_step=report.step, cancel=cancel,
                                 deadline=s.deadline())
            images, _, info = s.screen(result)
            paths = s.save(images, "mix")
            gallery = [(p, item.caption()) for p, item in zip(paths, images)]
            report.finished("the blend of the two people.")
        return gallery, info, paths, result.seed


def _inputs(settings: TabSettings) -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row():
        ui.a = photo_input(label="Person A", height=220, min_width=160, elem_id="person-a")
        ui.b = photo_input(label="Person B", height=220, min_width=160, elem_id="person-b")
    ui.weight = gr.Slider(0, 1, value=0.5, step=0.05, label="Blend: 0 is Person A, 1 is Person B",
                          info="identity interpolation weight (between the two people's identity tokens)")
    ui.prompt = gr.Textbox(label="Prompt", lines=2, max_length=SETTINGS.max_prompt_chars,
                           value="a portrait of a person")
    with gr.Row():
        ui.style = gr.Dropdown(settings.style_choices, value=settings.default_style, label="Style", min_width=200)
        ui.aspect = gr.Dropdown(list(gen.ASPECT_RATIOS), value=gen.DEFAULT_ASPECT, label="Shape and size",
                                min_width=220)
    with gr.Row():
        ui.steps = gr.Slider(*gen.STEPS_RANGE, value=settings.steps, step=1, label="Steps", min_width=220)
        ui.guidance = gr.Slider(*gen.GUIDANCE_RANGE, value=settings.guidance, step=0.5, min_width=220,
                                label="How literally to take the words", info="guidance scale (CFG)")
    with gr.Row():
        ui.seed = gr.Number(value=0, precision=0, minimum=0, maximum=gen.MAX_SEED, label="Seed", min_width=160)
        ui.randomize = gr.Checkbox(value=True, label="New seed each time", min_width=160)
    with gr.Row(elem_classes="run-row"):
        ui.run = gr.Button("Mix", variant="primary", scale=3, min_width=120, elem_id="mix-btn")
        ui.stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="mix-stop")
    ui.status = gr.HTML("", elem_id="mix-status", elem_classes="status-line")
    return ui


def build(services: Services, settings: TabSettings) -> TabEvents:
    """The tab's layout and events (call inside ``gr.Tabs``)."""
    handlers = MixHandlers(services)
    with gr.Tab("Mix two people", id=TAB):
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                ui = _inputs(settings)
            with gr.Column(scale=1, min_width=300):
                gallery = gr.Gallery(label="The blend",
                                     columns=1, height="auto", format="png", elem_id="m-gallery")
                info = gr.Markdown(elem_classes="small-note")
                identity_note(settings, "mix-identity-note")
                files = gr.File(label="PNG with settings", file_count="multiple", interactive=False)
        if settings.examples.get("mix"):
            gr.Examples(settings.examples["mix"], inputs=[ui.a, ui.b, ui.prompt], label="Examples",
                        elem_id="mix-examples")
        timer = gr.Timer(1.0, active=False)

    inputs = [ui.a, ui.b, ui.weight, ui.prompt, ui.style, ui.aspect, ui.steps, ui.guidance, ui.seed, ui.randomize]
    return gpu_run(services, TAB, settings, ui, timer, handlers.mix, inputs, [gallery, info, files, ui.seed],
                   api_name="mix", units=units)
