"""The Infinite-ID app: the composition root.

It parses the flags, checks the settings, loads the engine (after the start-up check, never at import), builds the
Gradio UI from ``infinite_id.ui`` and launches it. The layout, the handlers and the serving settings live in the
package (``infinite_id/ui/``: one module per tab); ``build_demo`` is re-exported here, as DESIGN 4 promises.

    python app.py                      # the real model on http://127.0.0.1:7860
    python app.py --engine tiny        # random weights: a fast end-to-end check, no download
"""

import argparse
import logging
import os
import sys

try:  # Hugging Face ZeroGPU: `spaces` must be imported before torch sets up CUDA (the engine imports torch)
    import spaces  # noqa: F401  (the UI wraps its GPU handlers in spaces.GPU when it is importable)
except ImportError:
    spaces = None

import gradio as gr  # noqa: F401  (tests patch gr.Blocks.launch through this module)

from infinite_id import service as gen
from infinite_id.config import SERVER
from infinite_id.models.engines import TINY_BANNER, Engine, add_engine_arguments, load_engine_from_args
from infinite_id.models.options import for_this_start
from infinite_id.ui import (
    BUSY_SESSION,
    DELETE_CACHE,
    QUEUE_OPTIONS,
    build_demo,
    enable_queue,
    engine_options,
    launch_options,
)

__all__ = ["BUSY_SESSION", "DELETE_CACHE", "QUEUE_OPTIONS", "SERVER", "build_demo",
           "enable_queue", "launch_options", "main", "parse_args"]

logger = logging.getLogger("infinite_id.app")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # No abbreviations: the download command in a missing-weights message reads the flags as they were typed.
    parser = argparse.ArgumentParser(description="The Infinite-ID app.", allow_abbrev=False)
    # Spaces and Docker set GRADIO_SERVER_NAME=0.0.0.0; locally the app listens on this machine only.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    add_engine_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request URL is noise, not information
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        guard = gen.OutputGuard.from_settings(SERVER)  # first: a configuration mistake costs no model loading
        engine: Engine = load_engine_from_args(args)
    except (ValueError, FileNotFoundError) as error:  # MissingWeightsError and friends: one message, no traceback
        print(f"\n{for_this_start(error, argv)}\n", file=sys.stderr)
        return 1
    except ImportError as error:
        print(f"\nThe real engine cannot be loaded here ({error}). Try `python app.py --engine tiny`.\n",
              file=sys.stderr)
        return 1
    if engine.name == "tiny":
        logger.warning("Serving the tiny engine (%s): every image is noise by design.", TINY_BANNER)
    demo = build_demo(lambda: engine.pipe, lambda: engine.face_analyzer, guard=guard, **engine_options(engine))
    enable_queue(demo).launch(**launch_options(args.host, args.port, args.share, demo=demo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
