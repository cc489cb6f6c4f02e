"""The Compare tab: one labelled grid of the same person, prompt and seed across methods, strengths or styles.

Endpoint: ``/compare``. Only the chosen mode's controls show; when the grid leaves something out (more strengths
than fit, no style ticked) the status line and the info say what and why.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import service as gen
from ..config import SETTINGS
from .generate_tab import DEFAULT_PROMPT
from .services import Services
from .widgets import PRIVATE, PROGRESS, TabEvents, TabSettings, gpu_run, identity_note, photo_input

TAB = "compare"
MODES = [("The three methods side by side", "methods"), ("A grid of likeness × prompt strengths", "strengths"),
         ("Several styles", "styles")]


def units(mode="methods", styles=(), id_scales="", semantic_scales="", steps=30, **_) -> float:
    """The job's work in image-steps (an Infinite-ID cell is two images per step: identity and text streams)."""
    if mode == "strengths":
        ids = gen.parse_values(id_scales, *gen.ID_SCALE_RANGE, default=(0.5, 1.0, 1.5))
        sems = gen.parse_values(semantic_scales, *gen.SEMANTIC_SCALE_RANGE, default=(0.0, 1.0, 2.0))
        cells = 2 * len(ids) * len(sems)
    elif mode == "styles":
        cells = 2 * max(1, min(len(styles or ()), gen.MAX_COMPARE_CELLS))
    else:
        cells = 3  # the adapter (1) and Infinite-ID (2, its text stream is the "text only" cell)
    return float(steps) * cells


class CompareHandlers:
    def __init__(self, services: Services):
        self.services = services

    def compare(
        self, photo, prompt, mode, style, styles, id_scales, semantic_scales, aspect_ratio, steps, guidance, seed,
        randomize_seed, face_index, request: gr.Request, progress=PROGRESS,
    ):
        """One labelled grid: the same person, prompt and seed across methods, strengths or styles: (grid PNG,
        each image as (PNG, caption), every PNG, info, seed used)."""
        s = self.services
        work = units(mode, styles, id_scales, semantic_scales, steps)
        with s.job(request, TAB, work, progress, "Comparing", "Reading the photo...") as report:
            pipe = s.get_pipeline()
            progress(0, desc="Reading the photo")
            identity = s.identity(pipe, photo, face_index)
            job = s.request(pipe, aspect_ratio, seed, randomize_seed, prompt=prompt, style=style,
                            num_inference_steps=steps, guidance_scale=guidance)
            with s.running(request) as cancel:
                result = gen.compare(
                    pipe, job, identity, mode, styles=styles or (), id_scales=id_scales,
                    semantic_scales=semantic_scales, on_step=report.step, cancel=cancel, deadline=s.deadline(),
                )
            cells, withheld = s.guard.screen(result.cells)
            if withheld:  # one grid image holds every cell: a withheld cell withholds the grid
                raise ValueError(gen.WITHHELD_MESSAGE)
            result.cells, result.grid = cells, s.guard.mark(result.grid)
            grid, cell_paths = gen.save_comparison(result, s.outputs.new(), stem=f"compare-{mode}")
            grid_path, paths = str(grid), [str(p) for p in cell_paths]
            gallery = [(p, cell.caption()) for p, cell in zip(paths, result.cells)]
            info = f"{len(result.cells)} images · seed **{result.seed}** · {result.seconds:.1f} s"
            info += "".join(f"  \n{note}" for note in result.notes)
            report.finished(" ".join([f"{len(result.cells)} images.", *result.notes]))
        return grid_path, gallery, [grid_path, *paths], info, result.seed


def mode_controls(mode: str):
    """Only the chosen mode's controls: the style for methods and strengths, the strengths, or the styles."""
    return (gr.Dropdown(visible=mode != "styles"), gr.Row(visible=mode == "strengths"),
            gr.CheckboxGroup(visible=mode == "styles"))


def _inputs(settings: TabSettings) -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.photo = photo_input(label="Photo of the person", height=260, elem_id="c-photo")
    gr.Markdown("The largest face in the photo is used.", elem_classes="small-note")
    ui.prompt = gr.Textbox(label="Prompt", lines=2, max_length=SETTINGS.max_prompt_chars, value=DEFAULT_PROMPT)
    ui.mode = gr.Radio(MODES, value="methods", label="What to compare", elem_id="c-mode",
                       info="methods: prompt only (plain SDXL), adapter baseline, Infinite-ID; "
                            "strengths: identity × semantic strength")
    ui.style = gr.Dropdown(settings.style_choices, value=settings.default_style, label="Style", elem_id="c-style")
    ui.styles = gr.CheckboxGroup(settings.style_choices, value=settings.style_choices[:4], visible=False,
                                 label=f"Styles to compare (up to {gen.MAX_COMPARE_CELLS})", elem_id="c-styles")
    with gr.Row(visible=False, elem_id="c-strengths") as ui.strengths:
        limit = gen.MAX_AXIS_VALUES
        ui.ids = gr.Textbox(value="0.5, 1.0, 1.5", label="Likeness values (rows)", min_width=220, elem_id="c-ids",
                            info=f"identity strengths, up to {limit}, e.g. 0.5, 1, 1.5")
        ui.sems = gr.Textbox(value="0, 1, 2", label="Prompt-following values (columns)", min_width=220,
                             elem_id="c-sems", info=f"semantic strengths, up to {limit}")
    ui.aspect = gr.Dropdown(list(gen.ASPECT_RATIOS), value=gen.DEFAULT_ASPECT, label="Shape and size")
    with gr.Row():
        ui.steps = gr.Slider(*gen.STEPS_RANGE, value=settings.steps, step=1, label="Steps", min_width=220,
                             elem_id="c-steps")
        ui.guidance = gr.Slider(*gen.GUIDANCE_RANGE, value=settings.guidance, step=0.5, min_width=220,
                                label="How literally to take the words", info="guidance scale (CFG)")
    with gr.Row():
        ui.seed = gr.Number(value=0, precision=0, minimum=0, maximum=gen.MAX_SEED, label="Seed", min_width=160,
                            info="the same for every image")
        ui.randomize = gr.Checkbox(value=True, label="New seed each time", min_width=160)
    ui.face = gr.Number(value=0, precision=0, minimum=0, visible=False)
    with gr.Row(elem_classes="run-row"):
        ui.run = gr.Button("Compare", variant="primary", scale=3, min_width=120, elem_id="compare-btn")
        ui.stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="compare-stop")
    ui.status = gr.HTML("", elem_id="compare-status", elem_classes="status-line")
    return ui


def _outputs(settings: TabSettings) -> SimpleNamespace:
    ui = SimpleNamespace()
    # No label over the grid: the grid image carries its own title, which a label would cover.
    ui.grid = gr.Image(label="Comparison grid", show_label=False, type="filepath", format="png", interactive=False,
                       buttons=["download", "fullscreen"], elem_id="c-grid")
    ui.gallery = gr.Gallery(label="Each image", columns=2, height="auto",
                            format="png", elem_id="c-gallery")
    ui.info = gr.Markdown(elem_classes="small-note", elem_id="c-info")
    identity_note(settings, "compare-identity-note")
    ui.files = gr.File(label="The grid and each image (PNG with settings)", file_count="multiple",
                       interactive=False)
    return ui


def build(services: Services, settings: TabSettings) -> TabEvents:
    """The tab's layout and events (call inside ``gr.Tabs``)."""
    handlers = CompareHandlers(services)
    with gr.Tab("Compare", id=TAB):
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                ui = _inputs(settings)
            with gr.Column(scale=1, min_width=300):
                out = _outputs(settings)
        timer = gr.Timer(1.0, active=False)

    ui.mode.change(mode_controls, ui.mode, [ui.style, ui.strengths, ui.styles], queue=False, **PRIVATE)
    inputs = [ui.photo, ui.prompt, ui.mode, ui.style, ui.styles, ui.ids, ui.sems, ui.aspect, ui.steps, ui.guidance,
              ui.seed, ui.randomize, ui.face]
    return gpu_run(services, TAB, settings, ui, timer, handlers.compare, inputs,
                   [out.grid, out.gallery, out.files, out.info, ui.seed], api_name="compare", units=units, duration=300)
