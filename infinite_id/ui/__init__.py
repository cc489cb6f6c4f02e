"""The Gradio app: one module per tab (``generate_tab``, ``compare_tab``, ``mix_tab``), shared widgets
(``widgets``), the services the handlers share (``services``), each tab's status line (``status``), the
per-session job cap and cooperative cancel (``queue``), and the Blocks put together with its serving settings
(``demo``). docs/ui.md explains the choices. The only package that imports
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
    "engine_options": ".demo",
    "launch_options": ".demo",
    "licence_table": ".demo",
    "load_examples": ".demo",
    "BUSY_SESSION": ".queue",
    "GPU": ".queue",
    "Jobs": ".queue",
    "SessionCap": ".queue",
    "SessionJobs": ".queue",
    "QUEUE_FULL": ".services",
    "OutputFolder": ".services",
    "Services": ".services",
    "JobReport": ".status",
    "Pace": ".status",
    "QueueView": ".status",
    "Status": ".status",
    "StatusBoard": ".status",
    "render": ".status",
    "PROGRESS": ".widgets",
    "TOAST_S": ".widgets",
    "by_position": ".widgets",
    "identity_note": ".widgets",
    "TabEvents": ".widgets",
    "TabSettings": ".widgets",
    "on_gpu": ".widgets",
    "photo_input": ".widgets",
    "progress_reporter": ".widgets",
    "user_errors": ".widgets",
})
