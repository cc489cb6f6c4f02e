"""Soak run: many sequential requests, valid and invalid, against the app on the tiny engine (not in CI).

Serves the app in this process (the production launch and queue settings, the tiny engine at 64 px, 2 steps)
and sends ``--requests`` requests through gradio_client, one after another: four in five valid (generate with
varied seeds, styles and methods; compare; mix), one in five invalid (a damaged JPEG, a text file, a photo
without a face, a face number that is not there, a number outside a slider's range). Reports the process's
resident memory (RSS), the size of the temp folders (Gradio's upload/output cache and the app's outputs) and the
number of open file descriptors at the start, after warm-up and at the end. Flat means RSS grew under 5 percent
from warm-up to the end. Results: benchmarks/SOAK.md.

    .venv/bin/python benchmarks/soak.py                       # 300 requests, cache deleted every 60 s
    .venv/bin/python benchmarks/soak.py --requests 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def folder_bytes(*folders: Path) -> int:
    total = 0
    for folder in folders:
        for path in folder.rglob("*") if folder.exists() else ():
            try:
                total += path.stat().st_size if path.is_file() else 0
            except OSError:  # deleted by the cache cleaner while we walked
                pass
    return total


def snapshot(process, folders) -> dict:
    return {"rss_mb": round(process.memory_info().rss / 2**20, 1), "temp_mb": round(folder_bytes(*folders) / 2**20, 2),
            "open_files": process.num_fds()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50, help="requests before the reference measurement")
    parser.add_argument("--delete-cache", type=int, nargs=2, default=(60, 60), metavar=("EVERY_S", "AGE_S"),
                        help="Gradio's cache schedule for the run (production: 1800 3600)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    # A fresh Gradio cache folder, so its size is this run's alone. Set before gradio is imported.
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="soak_gradio_")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    import psutil
    import torch
    from app_server import ASSETS, serve
    from gradio_client import Client, handle_file

    from infinite_id.faces.tiny_pack import synthetic_face_photo
    from infinite_id.models.engines import load_engine
    from infinite_id.service.styles import load_styles

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="soak_inputs_"))
    face, face_2 = ASSETS / "synthetic_face.png", ASSETS / "synthetic_face_2.png"
    synthetic_face_photo(256, faces=[], seed=2).save(work / "landscape.png")
    (work / "holiday.jpg").write_bytes(b"\xff\xd8\xff\xe0" + face.read_bytes()[4:200])
    (work / "notes.png").write_text("not a photo\n")
    styles = list(load_styles())
    methods = ["infinite-id", "adapter", "text"]

    def request(client, i):
        """Request ``i``: (kind, call). Four in five valid, one in five invalid."""
        base = dict(prompt=f"a person, take {i}", steps=2, randomize_seed=False, seed=i, api_name="/generate")
        if i % 5 == 4:
            bad = [dict(photo=handle_file(str(work / "holiday.jpg"))), dict(photo=handle_file(str(work / "notes.png"))),
                   dict(photo=handle_file(str(work / "landscape.png"))),
                   dict(photo=handle_file(str(face)), face_index=9), dict(photo=handle_file(str(face)), steps=10_000)]
            return "invalid", lambda: client.predict(**{**base, **bad[(i // 5) % len(bad)]})
        if i % 10 == 3:
            return "compare", lambda: client.predict(photo=handle_file(str(face)), prompt="a person", mode="methods",
                                                     steps=2, seed=i, randomize_seed=False, api_name="/compare")
        if i % 10 == 7:
            return "mix", lambda: client.predict(photo_a=handle_file(str(face)), photo_b=handle_file(str(face_2)),
                                                 prompt="a person", steps=2, seed=i, randomize_seed=False,
                                                 api_name="/mix")
        return "generate", lambda: client.predict(photo=handle_file(str(face)), style=styles[i % len(styles)],
                                                  method=methods[i % 3], num_images=1 + i % 2, **base)

    process = psutil.Process()
    engine = load_engine("tiny")
    counts = {"ok": 0, "refused": 0, "unexpected": 0}
    started = time.perf_counter()
    with serve(engine, delete_cache=tuple(args.delete_cache)) as (demo, url):
        folders = [Path(os.environ["GRADIO_TEMP_DIR"]), demo.handlers.outputs.root]
        client = Client(url, verbose=False, download_files=False)  # measure the server, not a client's downloads
        figures = {"start": snapshot(process, folders)}
        for i in range(args.requests):
            kind, send = request(client, i)
            try:
                send()
                counts["ok" if kind != "invalid" else "unexpected"] += 1
            except Exception as error:  # an invalid request must be refused with a sentence; a valid one never
                refused = kind == "invalid" and type(error).__name__ == "AppError"
                counts["refused" if refused else "unexpected"] += 1
                if not refused:
                    print(f"request {i} ({kind}) failed: {error!r}", file=sys.stderr)
            if i + 1 == args.warmup:
                figures["warm"] = snapshot(process, folders)
            if (i + 1) % 50 == 0:
                print(f"{i + 1} requests, {time.perf_counter() - started:.0f} s, {snapshot(process, folders)}",
                      flush=True)
        figures["end"] = snapshot(process, folders)
    warm, end = figures.get("warm", figures["start"]), figures["end"]
    growth = 100 * (end["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"]
    result = {
        "requests": args.requests, "seconds": round(time.perf_counter() - started, 1), **counts,
        "rss_growth_after_warmup_pct": round(growth, 2), "delete_cache": list(args.delete_cache), **figures,
        "torch": torch.__version__, "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    flat = growth < 5 and counts["unexpected"] == 0
    print("FLAT" if flat else "NOT FLAT (or unexpected failures)")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
