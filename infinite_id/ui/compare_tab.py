"""The Compare tab: one labelled grid of the same person, prompt and seed across methods, strengths or styles.

Endpoint: ``/compare``.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import service as gen
from ..config import SETTINGS
from . import widgets
from .generate_tab import DEFAULT_PROMPT
from .queue import GPU
from .services import Services
from .widgets import PROGRESS, TabEvents, TabSettings, on_gpu, photo_input, user_errors

MODES = [("Methods: text only / adapter / Infinite-ID", "methods"),
         ("Identity × semantic strength grid", "strengths"),
         ("Style presets", "styles")]


class CompareHandlers:
    def __init__(self, services: Services):
        self.services = services

    def compare(
        self, photo, prompt, mode, style, styles, id_scales, semantic_scales, aspect_ratio, steps, guidance, seed,
        randomize_seed, face_index, request: gr.Request, progress=PROGRESS,
    ):
        """One labelled grid: the same person, prompt and seed across methods, strengths or styles."""
        s = self.services
        with user_errors():
            pipe = s.get_pipeline()
            progress(0, desc="Reading the photo")
            identity = s.identity(pipe, photo, face_index)
            job = s.request(pipe, aspect_ratio, seed, randomize_seed, prompt=prompt, style=style,
                            num_inference_steps=steps, guidance_scale=guidance)
            with s.running(request) as cancel:
                result = gen.compare(
                    pipe, job, identity, mode, styles=styles or (), id_scales=id_scales,
                    semantic_scales=semantic_scales, on_step=widgets.progress_reporter(progress, "Comparing"),
                    cancel=cancel, deadline=s.deadline(),
                )
            cells, withheld = s.guard.screen(result.cells)
            if withheld:  # one grid image holds every cell: a withheld cell withholds the grid
                raise gr.Error(gen.WITHHELD_MESSAGE, print_exception=False)
            result.cells, result.grid = cells, s.guard.mark(result.grid)
            grid, cell_paths = gen.save_comparison(result, s.outputs.new(), stem=f"compare-{mode}")
            grid_path, paths = str(grid), [str(p) for p in cell_paths]
            gallery = [(p, cell.caption()) for p, cell in zip(paths, result.cells)]
            info = f"{len(result.cells)} images · seed **{result.seed}** · {result.seconds:.1f} s"
        return grid_path, gallery, [grid_path, *paths], info, result.seed


def _inputs(settings: TabSettings) -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.photo = photo_input(label="Photo of the person (largest face)", height=260)
    ui.prompt = gr.Textbox(label="Prompt", lines=2, max_length=SETTINGS.max_prompt_chars, value=DEFAULT_PROMPT)
    ui.mode = gr.Radio(MODES, value="methods", label="Compare")
    ui.style = gr.Dropdown(settings.style_choices, value=settings.default_style,
                           label="Style (methods and strength grid)")
    ui.styles = gr.CheckboxGroup(settings.style_choices, value=settings.style_choices[:4],
                                 label="Styles to compare (style presets)")
    with gr.Row():
        ui.ids = gr.Textbox(value="0.5, 1.0, 1.5", label="Identity strengths (grid rows)")
        ui.sems = gr.Textbox(value="0, 1, 2", label="Semantic strengths (grid columns)")
    with gr.Row():
        ui.aspect = gr.Dropdown(list(gen.ASPECT_RATIOS), value=gen.DEFAULT_ASPECT, label="Aspect ratio")
        ui.steps = gr.Slider(*gen.STEPS_RANGE, value=settings.steps, step=1, label="Steps")
        ui.guidance = gr.Slider(*gen.GUIDANCE_RANGE, value=settings.guidance, step=0.5, label="Guidance")
    with gr.Row():
        ui.seed = gr.Number(value=0, precision=0, minimum=0, maximum=gen.MAX_SEED,
                            label="Seed (the same for every cell)")
        ui.randomize = gr.Checkbox(value=True, label="Randomize seed")
    ui.face = gr.Number(value=0, precision=0, minimum=0, visible=False)
    with gr.Row():
        ui.run = gr.Button("Compare", variant="primary", scale=3)
        ui.stop = gr.Button("Stop", variant="stop", scale=1)
    return ui


def _outputs() -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.grid = gr.Image(label="Comparison grid", type="filepath", format="png", interactive=False,
                       buttons=["download", "fullscreen"])
    ui.gallery = gr.Gallery(label="Each image, with its identity similarity", columns=3, height=300, format="png")
    ui.info = gr.Markdown(label="Comparison info")
    ui.files = gr.File(label="Grid and images (PNG with settings)", file_count="multiple", interactive=False)
    return ui


def build(services: Services, settings: TabSettings) -> TabEvents:
    """The tab's layout and events (call inside ``gr.Tabs``)."""
    handlers = CompareHandlers(services)
    with gr.Tab("Compare", id="compare"):
        with gr.Row():
            with gr.Column(scale=1):
                ui = _inputs(settings)
            with gr.Column(scale=1):
                out = _outputs()
    run = ui.run.click(
        on_gpu(handlers.compare, duration=300),
        [ui.photo, ui.prompt, ui.mode, ui.style, ui.styles, ui.ids, ui.sems, ui.aspect, ui.steps, ui.guidance,
         ui.seed, ui.randomize, ui.face],
        [out.grid, out.gallery, out.files, out.info, ui.seed],
        api_name="compare", concurrency_id=GPU, concurrency_limit=settings.gpu_limit,
    )
    return TabEvents(run=run, stop=ui.stop)
