"""The Identity mixing tab: one image of a person between two. Endpoint: ``/mix``."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import service as gen
from ..config import SETTINGS
from . import widgets
from .queue import GPU
from .services import Services
from .widgets import PROGRESS, TabEvents, TabSettings, on_gpu, photo_input, user_errors


class MixHandlers:
    def __init__(self, services: Services):
        self.services = services

    def mix(
        self, photo_a, photo_b, weight, prompt, style, aspect_ratio, steps, guidance, seed, randomize_seed,
        request: gr.Request, progress=PROGRESS,
    ):
        """One image of a person between two: ``weight`` 0 is person A, 1 is person B."""
        s = self.services
        with user_errors():
            pipe = s.get_pipeline()
            progress(0, desc="Reading the photos")
            if photo_a is None or photo_b is None:
                raise gr.Error("Upload a photo of each of the two people.")
            first, second = s.identity(pipe, photo_a), s.identity(pipe, photo_b)
            job = s.request(pipe, aspect_ratio, seed, randomize_seed, prompt=prompt, style=style,
                            num_inference_steps=steps, guidance_scale=guidance)
            with s.running(request) as cancel:
                result = gen.mix(pipe, job, first, second, weight,
                                 on_step=widgets.progress_reporter(progress, "Mixing"), cancel=cancel,
                                 deadline=s.deadline())
            images, _, info = s.screen(result)
            paths = s.save(images, "mix")
            gallery = [(p, item.caption()) for p, item in zip(paths, images)]
        return gallery, info, paths, result.seed


def _inputs(settings: TabSettings) -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row():
        ui.a = photo_input(label="Person A", height=220)
        ui.b = photo_input(label="Person B", height=220)
    ui.weight = gr.Slider(0, 1, value=0.5, step=0.05, label="Blend (0 = person A, 1 = person B)")
    ui.prompt = gr.Textbox(label="Prompt", lines=2, max_length=SETTINGS.max_prompt_chars,
                           value="a portrait of a person")
    with gr.Row():
        ui.style = gr.Dropdown(settings.style_choices, value=settings.default_style, label="Style")
        ui.aspect = gr.Dropdown(list(gen.ASPECT_RATIOS), value=gen.DEFAULT_ASPECT, label="Aspect ratio")
    with gr.Row():
        ui.steps = gr.Slider(*gen.STEPS_RANGE, value=settings.steps, step=1, label="Steps")
        ui.guidance = gr.Slider(*gen.GUIDANCE_RANGE, value=settings.guidance, step=0.5, label="Guidance")
    with gr.Row():
        ui.seed = gr.Number(value=0, precision=0, minimum=0, maximum=gen.MAX_SEED, label="Seed")
        ui.randomize = gr.Checkbox(value=True, label="Randomize seed")
    with gr.Row():
        ui.run = gr.Button("Mix", variant="primary", scale=3)
        ui.stop = gr.Button("Stop", variant="stop", scale=1)
    return ui


def build(services: Services, settings: TabSettings) -> TabEvents:
    """The tab's layout and events (call inside ``gr.Tabs``)."""
    handlers = MixHandlers(services)
    with gr.Tab("Identity mixing", id="mix"):
        with gr.Row():
            with gr.Column(scale=1):
                ui = _inputs(settings)
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="The blend (similarity to each person in the caption)", columns=1,
                                     height=420, format="png")
                info = gr.Markdown(label="Generation info")
                files = gr.File(label="PNG with settings", file_count="multiple", interactive=False)
        if settings.examples.get("mix"):
            gr.Examples(settings.examples["mix"], inputs=[ui.a, ui.b, ui.prompt], label="Examples")
    run = ui.run.click(
        on_gpu(handlers.mix),
        [ui.a, ui.b, ui.weight, ui.prompt, ui.style, ui.aspect, ui.steps, ui.guidance, ui.seed, ui.randomize],
        [gallery, info, files, ui.seed],
        api_name="mix", concurrency_id=GPU, concurrency_limit=settings.gpu_limit,
    )
    return TabEvents(run=run, stop=ui.stop)
