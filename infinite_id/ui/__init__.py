"""The Gradio app: one module per tab (``generate_tab``, ``compare_tab``, ``mix_tab``), shared widgets
(``widgets``), the services the handlers share (``services``), the per-session job cap and cooperative cancel
(``queue``), and the Blocks put together with its serving settings (``demo``). The only package that imports
Gradio; it uses ``service``, ``models``, ``images`` and ``config`` below it, public Gradio API only.
"""

from .._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "ASSETS_DIR": ".demo",
    "CSS": ".demo",
    "DELETE_CACHE": ".demo",
    "QUEUE_OPTIONS": ".demo",
    "TITLE": ".demo",
    "build_demo": ".demo",
    "enable_queue": ".demo",
    "launch_options": ".demo",
    "load_examples": ".demo",
    "BUSY_SESSION": ".queue",
    "GPU": ".queue",
    "Jobs": ".queue",
    "SessionCap": ".queue",
    "SessionJobs": ".queue",
    "OutputFolder": ".services",
    "Services": ".services",
    "PROGRESS": ".widgets",
    "TabEvents": ".widgets",
    "TabSettings": ".widgets",
    "on_gpu": ".widgets",
    "photo_input": ".widgets",
    "progress_reporter": ".widgets",
    "user_errors": ".widgets",
})
