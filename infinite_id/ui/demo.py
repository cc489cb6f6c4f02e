"""The whole app's Blocks: the tabs put together, the Stop buttons wired across them, the queue and launch settings.

``build_demo(get_pipeline, get_face_analyzer)`` lays out the tabs; ``enable_queue`` and ``launch_options`` hold
the serving settings of DESIGN 7, shared by ``app.main`` and the tests. Every number is a
``config.ServerSettings`` field (INFINITE_ID_* environment variables; docs/reliability.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import gradio as gr
from starlette.middleware import Middleware

from .. import service as gen
from ..config import SERVER, SETTINGS
from ..models.engines import TINY_STEPS, Engine
from . import compare_tab, generate_tab, mix_tab
from .queue import SessionCap
from .services import OutputFolder, Services
from .widgets import TabSettings

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
TITLE = "Infinite-ID: your face, any prompt, any style"

# DESIGN 7: bounded queue, one GPU job at a time, uploads capped, uploaded and generated files deleted after an
# hour (checked every 30 minutes), no flagging (Blocks has none unless added), no share link unless asked for.
QUEUE_OPTIONS = {"max_size": SERVER.queue_max_size, "default_concurrency_limit": 1}
DELETE_CACHE = (SERVER.delete_cache_every_s, SERVER.delete_cache_age_s)

CSS = """
#engine-banner {background: #fff3cd; border: 2px solid #d39e00; border-radius: 8px; padding: 6px 12px;}
#engine-banner p {color: #5c4400; margin: 0;}
.small-note {font-size: 0.9em; opacity: 0.85;}
.status-line:empty {display: none;}
.status {border-radius: 8px; padding: 8px 12px; border: 1px solid var(--border-color-primary);
         overflow-wrap: anywhere;}
.status-error {background: #fdecea; border-color: #d93025; color: #7a1c14;}
.status-done {background: #e8f5e9; border-color: #2e7d32; color: #1b4d1f;}
.status-stopped {background: #f1f3f4; color: #3c4043;}
.status-bar {height: 8px; border-radius: 4px; background: var(--neutral-200); margin-bottom: 6px; overflow: hidden;}
.status-bar > div {height: 100%; background: var(--color-accent); transition: width 0.4s;}
.label-wrap .icon {flex-shrink: 0;}
/* Face thumbnails wrap onto more rows on a narrow screen instead of being cut off at the side. */
#faces .grid-container {grid-template-columns: repeat(auto-fill, minmax(88px, 1fr)) !important;
                        grid-template-rows: none !important; grid-auto-rows: auto !important;}
#faces .caption-label {font-size: 0.8em;}
#c-grid .image-container {padding-top: 36px;}  /* the grid's own title row stays clear of the image buttons */
.filename .stem {white-space: normal !important; overflow-wrap: break-word; text-overflow: clip !important;}
/* Long captions and example cells wrap instead of being cut off or pushing the page sideways. */
.caption-label {white-space: normal !important; overflow-wrap: anywhere;}
@media (max-width: 480px) {.caption-label {font-size: 0.75em;}}
/* Columns sized by their longest word, and lines broken between words: "Photographic" stays whole on a phone. */
#generate-examples table, #mix-examples table {table-layout: auto; width: 100%;}
#generate-examples td, #generate-examples th, #mix-examples td, #mix-examples th {
  white-space: normal; overflow-wrap: break-word;}
/* The licence table: a table on a wide screen; on a phone each model is a small block (part, model, licence,
   source, one per line), where four columns would break every word. */
#licences td, #licences th {white-space: normal; overflow-wrap: break-word; vertical-align: top;}
@media (max-width: 640px) {
  #licences table, #licences tbody, #licences tr, #licences td {display: block; width: auto; border: none;}
  #licences thead {display: none;}
  #licences tr {padding: 6px 0; border-bottom: 1px solid var(--border-color-primary);}
  #licences td {padding: 1px 4px;}
  #licences td:first-child {font-weight: 600;}
}
"""

INTRO = (f"# {TITLE}\nUpload one photo of a person, describe a scene, pick a style. The face and the words are "
         "handled in two separate streams, so the prompt and the style stay in charge of the picture while the "
         "face stays the person's.")
HOW_TO = """### How to get a good result
- **The photo**: one person, face clearly visible and well lit, looking roughly at the camera; no sunglasses or
  heavy shadows. A photo with several people works too: pick the face. More photos of the same person (under
  *More photos*) give a steadier likeness.
- **The prompt**: describe the scene, the clothes and the mood ("a woman reading in a sunlit library"); say
  *a man*, *a woman* or *a person* rather than a name. The style adds its own words.
- **The strengths** (under *Advanced*): if the face does not look like the person, raise *How much it looks like
  the person*; if the prompt or the style is ignored, raise *How much the picture follows the prompt* or lower the
  likeness. The *Compare* tab's strength grid shows the trade-off in one go.
"""
FOOTER = (
    "Each picture's caption says how much it looks like the person (*identity 0.53*): a face-recognition model's "
    "ArcFace cosine between the face in the picture and the face in the photo; the same person usually scores "
    "above about 0.4, and *n/a* means no face was found in the picture. Every PNG keeps its prompt, seed and "
    "settings, so it can be made again. "
    "Photos are used only for the request and deleted from the server within the hour."
)


def licence_table(rows: Sequence[tuple[str, str, str, str]]) -> str:
    """Markdown: one row per model this server runs (``Engine.licences``), its source as a link."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| part | model | licence | source |", "| --- | --- | --- | --- |"]
    for part, model, licence, source in rows:
        link = f"[{urlparse(source).netloc}]({source})" if str(source).startswith("http") else cell(source)
        lines.append(f"| {cell(part)} | {cell(model)} | {cell(licence)} | {link} |")
    return "\n".join(lines)


def engine_options(engine: Engine) -> dict:
    """``build_demo``'s keyword arguments that describe the loaded engine (shared by ``app.main`` and the tests):
    its name, banner, sampling defaults, licences, identity note and whether its adapter carries a LoRA."""
    weights = getattr(engine.pipe, "weights_info", None) or {}
    return {"engine": engine.name, "banner": engine.banner, "steps": engine.steps, "guidance": engine.guidance,
            "fast": engine.fast, "licences": engine.licences, "identity_note": engine.identity_note,
            "lora": gen.carries_lora(weights)}


def load_examples(engine: str) -> dict[str, list[list[str]]]:
    """The examples manifest (assets/examples.json), keeping those listed for this engine ("real" or "tiny")."""
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
               timeout_s: float | None = None, guard: gen.OutputGuard | None = None,
               licences: Sequence[tuple[str, str, str, str]] = (), identity_note: str | None = None,
               lora: bool = False) -> gr.Blocks:
    """The app's Blocks. ``get_pipeline``/``get_face_analyzer`` return the already-loaded engine (the getters are
    only called by handlers). ``engine`` ("real" or "tiny") picks the examples; ``banner`` is shown above
    everything when given; ``steps``/``guidance``/``fast`` are the sliders' starting values (the loaded sampling
    mode's: a fast-mode LoRA is fused at start-up, so its few steps are the right default).
    ``concurrency`` (GPU jobs at once), ``delete_cache`` ((every_s, age_s)) and ``timeout_s`` (per request)
    default to ``config.SERVER``, as does ``guard`` (watermark and safety check); the tests override them.
    ``licences`` (``Engine.licences`` rows) fill the "Models and licences" section; ``identity_note`` goes under
    every result (the tiny engine's identity scores mean nothing); ``lora`` shows the adapter-LoRA slider.
    ``engine_options(engine)`` gives all of these for a loaded ``Engine``. The shared services are
    ``demo.handlers``."""
    delete_cache = delete_cache or DELETE_CACHE
    # The app's own copies of the outputs follow the same age as Gradio's cache of them.
    gpu_limit = max(1, int(concurrency or SERVER.gpu_concurrency))
    services = Services(get_pipeline, get_face_analyzer, OutputFolder(max_age_s=delete_cache[1]),
                        timeout_s=timeout_s, guard=guard, gpu_limit=gpu_limit)
    settings = TabSettings(
        styles=gen.load_styles(), default_style=gen.default_style_name(),
        steps=steps or (TINY_STEPS if engine == "tiny" else 30), guidance=guidance, fast=fast,
        gpu_limit=gpu_limit, examples=load_examples(engine), lora=lora, identity_note=identity_note,
    )
    with gr.Blocks(title="Infinite-ID", delete_cache=delete_cache, analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        if banner:
            gr.Markdown(banner, elem_id="engine-banner")
        with gr.Tabs(elem_id="tabs", overflow_behavior="wrap"):  # every tab reachable by name on a phone
            tabs = [tab.build(services, settings) for tab in (generate_tab, compare_tab, mix_tab)]
        gr.Markdown(HOW_TO, elem_id="how-to")
        gr.Markdown(FOOTER, elem_classes="small-note")
        if licences:
            with gr.Accordion("Models and licences", open=False, elem_id="licences"):
                gr.Markdown(licence_table(licences), elem_classes="small-note")

        # Stop: cancel this session's job in Gradio and set its flag, so the pipeline call itself ends at the next
        # step. Callable by API clients as /cancel (same session), undocumented.
        runs = [tab.run for tab in tabs]
        for tab in tabs:
            tab.stop.click(services.cancel, None, None, cancels=runs, queue=False, api_name="cancel",
                           api_visibility="undocumented")
        services.sessions.gpu_fns.update({tab.run["id"]: tab.units for tab in tabs})  # what the cap counts
    demo.handlers = services  # for tests and for callers that want the cache statistics
    return demo


def enable_queue(demo: gr.Blocks, max_size: int | None = None, session_jobs: int | None = None) -> gr.Blocks:
    """``demo.queue`` with the production options (``QUEUE_OPTIONS``), and the cap of ``session_jobs`` GPU jobs
    waiting or running per browser session (``config.SERVER.session_jobs``), which ``launch_options(demo=demo)``
    installs. The applied settings are kept in ``demo.serving``. Shared by ``main`` and the tests."""
    options = {**QUEUE_OPTIONS, **({"max_size": max_size} if max_size else {})}
    demo.queue(**options)
    demo.handlers.sessions.cap = max(1, int(session_jobs or SERVER.session_jobs))
    demo.serving = {**options, "session_jobs": demo.handlers.sessions.cap}
    return demo


def launch_options(host: str = "127.0.0.1", port: int = 7860, share: bool = False,
                   demo: gr.Blocks | None = None) -> dict:
    """Everything ``Blocks.launch`` gets (DESIGN 7), shared by ``main`` and the tests. With ``demo`` (built by
    ``build_demo``), its per-session job cap is installed as an ASGI middleware through ``app_kwargs``."""
    options = {
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
    if demo is not None:
        options["app_kwargs"] = {"middleware": [Middleware(SessionCap, jobs=demo.handlers.sessions)]}
    return options
