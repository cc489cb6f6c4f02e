"""Many users and injected faults, against the app on the tiny engine (issue 8; docs/reliability.md).

* Concurrency: 8 overlapping requests on a server that runs 8 GPU jobs at once give exactly their serial outputs,
  and a deliberately leaking variant (per-call state on a shared object) is caught by the same comparison.
* Queue: with one GPU job at a time, a full queue answers "busy" at once, waiting people see their place, one
  session cannot hold more than one job, and every accepted job finishes.
* Faults: out-of-memory mid-generation, NaN/black decodes (with the fp32 retry), a step that hangs past the time
  limit, and missing face models at start-up. Cancel is covered in test_app.py.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from app_server import ASSETS, generate, pixels, serve

import app
from infinite_id import service as gen
from infinite_id.models.engines import load_engine
from infinite_id.service import runner
from infinite_id.ui import widgets

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import QueueError, Status  # noqa: E402

FACE = ASSETS / "synthetic_face.png"
CONCURRENT = 8
# Eight different requests: seeds, strengths, styles, methods and image counts all differ.
SPECS = [
    dict(seed=1, id_scale=1.0, style="Watercolor", method="infinite-id"),
    dict(seed=2, id_scale=0.3, semantic_scale=2.0, style="Comic book", method="infinite-id"),
    dict(seed=3, id_scale=1.5, style="Photographic", method="adapter"),
    dict(seed=4, style="Ukiyo-e", method="text"),
    dict(seed=5, id_scale=0.8, style_strength=0.2, style="Oil painting", method="infinite-id"),
    dict(seed=6, id_scale=1.2, style="Pixel art", method="adapter"),
    dict(seed=7, id_scale=0.6, mix_start=0.2, mix_end=0.8, style="Pop art", method="infinite-id"),
    dict(seed=8, id_scale=1.4, semantic_scale=0.5, num_images=2, style="Watercolor", method="infinite-id"),
]


@pytest.fixture(scope="module")
def engine():
    return load_engine("tiny")


@pytest.fixture(scope="module")
def parallel(engine):
    """The app with 8 GPU jobs at once (production runs 1): the setting under which shared state would show."""
    with serve(engine, concurrency=CONCURRENT, max_size=4 * CONCURRENT) as running:
        yield running


@pytest.fixture(scope="module")
def client(parallel):
    return Client(parallel[1], verbose=False)


def outputs(result) -> list[tuple[np.ndarray, dict]]:
    """Each image's pixels and its PNG metadata, minus the timing."""
    gallery, _text, _info, files, _seed = result
    return [(pixels(item["image"]), gen.read_metadata(path)) for item, path in zip(gallery, files)]


@pytest.fixture(scope="module")
def golden(client):
    """Each request alone, one after another."""
    return [outputs(generate(client, FACE, **spec)) for spec in SPECS]


def run_at_once(url: str) -> list[list[tuple[np.ndarray, dict]]]:
    """All SPECS submitted together, one client (browser session) each, as eight people would."""
    clients = [Client(url, verbose=False) for _ in SPECS]
    base = dict(photo=handle_file(str(FACE)), prompt="a person in a garden", steps=2, randomize_seed=False,
                api_name="/generate")
    jobs = [c.submit(**{**base, **spec}) for c, spec in zip(clients, SPECS)]
    return [outputs(job.result(timeout=120)) for job in jobs]


def differences(golden, results) -> list[int]:
    """Indices of the requests whose images or metadata differ from their serial run."""
    bad = []
    for i, (expected, got) in enumerate(zip(golden, results)):
        same = len(expected) == len(got) and all(
            np.array_equal(a_pixels, b_pixels) and a_meta == b_meta
            for (a_pixels, a_meta), (b_pixels, b_meta) in zip(expected, got)
        )
        if not same:
            bad.append(i)
    return bad


class Overlap:
    """Wraps ``runner.run`` to count how many calls run at the same moment (the test must really overlap)."""

    def __init__(self, run, hold_s: float = 0.0):
        self.run, self.hold_s, self.active, self.most = run, hold_s, 0, 0
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(self.hold_s)  # give every request time to arrive before any finishes
            return self.run(*args, **kwargs)
        finally:
            with self.lock:
                self.active -= 1


# --- 1. concurrency ---------------------------------------------------------------------------------------------


def test_eight_overlapping_requests_equal_their_serial_outputs(parallel, golden, monkeypatch):
    overlap = Overlap(runner.run, hold_s=0.5)
    monkeypatch.setattr(runner, "run", overlap)
    results = run_at_once(parallel[1])
    assert overlap.most >= 4, f"only {overlap.most} requests overlapped"
    # Exact equality: every pixel of every PNG and every metadata field (seed, strengths, style, method...).
    assert differences(golden, results) == []


def test_the_comparison_catches_per_call_state_on_a_shared_object(parallel, golden, monkeypatch):
    """A deliberately wrong variant: the identity strength parked on the shared pipeline and read back later,
    as a processor that kept ``id_scale`` on itself would. The same comparison must fail."""
    real_run, shared = runner.run, SimpleNamespace(id_scale=None)

    def leaky_run(pipe, request, *args, **kwargs):
        shared.id_scale = request.id_scale  # the bug: per-call state on an object every request shares
        time.sleep(0.5)  # ... and by the time it is read, another request has overwritten it
        return real_run(pipe, request.replace(id_scale=shared.id_scale), *args, **kwargs)

    overlap = Overlap(leaky_run)
    monkeypatch.setattr(runner, "run", overlap)
    results = run_at_once(parallel[1])
    assert overlap.most >= 4
    assert len(differences(golden, results)) >= 3  # most requests got someone else's strength


# --- 2. the queue -----------------------------------------------------------------------------------------------


def test_full_queue_says_busy_queued_people_see_their_place_and_nothing_deadlocks(engine, monkeypatch):
    gate, entered = threading.Event(), threading.Event()
    real_run = runner.run

    def held_run(*args, **kwargs):  # the first job holds the (single) GPU slot until the test lets it go
        entered.set()
        assert gate.wait(60)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(runner, "run", held_run)
    with serve(engine, max_size=2) as (demo, url):  # production concurrency (1); a short queue to fill quickly
        assert demo.serving["default_concurrency_limit"] == 1
        a, b, c, d = (Client(url, verbose=False) for _ in range(4))
        base = dict(photo=handle_file(str(FACE)), prompt="a person", steps=2, api_name="/generate")
        running = a.submit(**base)
        assert entered.wait(30)
        queued = [b.submit(**base), c.submit(**base)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(j.status().rank is not None for j in queued):
            time.sleep(0.05)
        places = sorted(j.status().rank for j in queued)
        assert [j.status().code for j in queued] == [Status.IN_QUEUE] * 2
        assert places == [0, 1]  # each waiting person is told their place in the line

        with pytest.raises(QueueError, match="Queue is full"):  # a newcomer: Gradio's busy answer, at once
            d.submit(**base).result(timeout=30)
        with pytest.raises(httpx.HTTPStatusError) as refused:  # the first person again: one job per session
            a.submit(**base).result(timeout=30)
        assert refused.value.response.status_code == 400
        assert refused.value.response.json()["detail"] == app.BUSY_SESSION

        started = time.monotonic()
        gate.set()
        for job in (running, *queued):
            gallery, *_ = job.result(timeout=60)
            assert len(gallery) == 1
        assert time.monotonic() - started < 60
        gallery, *_ = a.predict(**base)  # the session's job is done: it may ask again
        assert len(gallery) == 1


def held_gpu(monkeypatch):
    """``runner.run`` held until the returned gate is set; ``entered`` is set once a job holds the GPU slot."""
    gate, entered = threading.Event(), threading.Event()
    real_run = runner.run

    def held_run(*args, **kwargs):
        entered.set()
        assert gate.wait(60)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(runner, "run", held_run)
    return gate, entered


def test_a_session_whose_browser_went_away_may_queue_again(engine, monkeypatch):
    """The cap counts a job out when its end passes the session's event stream; a stream that is cut (the tab was
    closed) releases the session's jobs, since Gradio drops its waiting jobs too."""
    gate, entered = held_gpu(monkeypatch)
    with serve(engine, max_size=4) as (demo, url):
        fn = next(d["id"] for d in demo.get_config_file()["dependencies"] if d["api_name"] == "generate")
        text_job = [None, "a lighthouse", "Watercolor", gen.DEFAULT_ASPECT, "", 1.0, 1.0, 1.0, 0.0, 1.0, 2, 5.0, 0,
                    True, 1, "text", False, False, 0, None]
        join = {"data": text_job, "fn_index": fn, "session_hash": "went-away"}
        first = Client(url, verbose=False).submit(photo=handle_file(str(FACE)), prompt="a person", steps=2,
                                                  api_name="/generate")
        assert entered.wait(30)  # the GPU is busy, so the raw job below waits
        assert httpx.post(f"{url}gradio_api/queue/join", json=join, timeout=30).status_code == 200
        again = httpx.post(f"{url}gradio_api/queue/join", json=join, timeout=30)
        assert again.status_code == 400 and again.json()["detail"] == app.BUSY_SESSION
        with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": "went-away"},
                          timeout=30) as stream:
            assert next(stream.iter_lines()).startswith("data:")  # its place in the queue; then the tab closes
        deadline, status = time.monotonic() + 15, 400
        while time.monotonic() < deadline and status == 400:
            status = httpx.post(f"{url}gradio_api/queue/join", json=join, timeout=30).status_code
            time.sleep(0.2)
        assert status == 200
        gate.set()
        assert len(first.result(timeout=60)[0]) == 1


def test_session_jobs_count_each_job_once_whatever_order_its_end_arrives_in():
    from infinite_id.ui import SessionJobs

    jobs = SessionJobs(cap=1)
    ticket = jobs.reserve("s")
    assert ticket and jobs.reserve("s") is None and jobs.reserve("other")  # per session
    jobs.bind("s", ticket, "e1")
    assert jobs.count("s") == 1
    jobs.finish("s", "e1")
    assert jobs.count("s") == 0
    ticket = jobs.reserve("s")
    jobs.finish("s", "e2")  # its end passed the stream before Gradio's answer to the join did
    jobs.bind("s", ticket, "e2")
    assert jobs.count("s") == 0
    jobs.bind("s", jobs.reserve("s"), None)  # Gradio refused the join (queue full): nothing is held
    assert jobs.count("s") == 0

    stale = SessionJobs(cap=1, stale_after_s=0.05)
    stale.bind("s", stale.reserve("s"), "lost")  # an end that never arrives
    assert stale.reserve("s") is None
    time.sleep(0.1)
    assert stale.reserve("s") is not None  # a last resort: never locked out for good


def test_the_status_line_says_place_wait_and_progress_in_words():
    from infinite_id.ui.status import Pace, QueueView, Status, duration, render

    assert [duration(s) for s in (4.24, 42, 75, 120)] == ["4.2 s", "42 s", "1 min 15 s", "2 min"]
    pace = Pace()
    assert pace.seconds(10) is None  # nothing measured yet: no made-up estimate
    pace.record(units=10, seconds=5.0)
    assert pace.seconds(4) == 2.0
    pace.record(units=10, seconds=10.0)  # a slower job moves the average part of the way
    assert 0.5 < pace.seconds_per_unit < 1.0

    waiting = render(Status("sent"), QueueView(ahead=1, starts_in=20, takes=4))
    assert "Waiting: 1 job ahead of yours; yours starts in about 20 s and takes about 4.0 s." in waiting
    assert "a time estimate appears once" in render(Status("sent"), QueueView(ahead=2, starts_in=None, takes=None))
    running = render(Status("running", done=3, total=10, stepping_since=0.0), now=4.0)
    assert "Step 3 of 10 · about 14 s left" in running and 'aria-valuenow="3"' in running  # 2 s a step after step 1
    assert "&lt;script&gt;" in render(Status("error", message="<script>"))  # Gradio renders HTML: escaped
    assert render(Status("idle")) == ""


def test_a_generate_job_counts_the_work_its_call_will_do():
    """The queue's time estimate weighs a job by its image-steps: the text stream counts to the end only when it is
    shown, else until the mixing window ends (where the call drops it); junk from an API client counts as defaults."""
    from infinite_id.ui.generate_tab import units

    assert units(30, 1, "infinite-id", False, 0.0, 1.0, False) == 60  # the text stream is read at every step
    assert units(30, 1, "infinite-id", False, 0.0, 0.5, False) == 45
    assert units(30, 1, "infinite-id", False, 0.0, 0.5, True) == 60
    assert units(30, 2, "adapter", False, 0.0, 0.5, True) == 60
    assert units(30, 1, "infinite-id", True, 0.6, 0.2, False) == gen.FAST_STEPS * 1.6
    assert units(30, 1, "infinite-id", False, "x", None, False) == 60


def test_a_refused_join_ends_the_waiting_line_with_a_sentence():
    """A run button pressed when the queue is full (or the session already has its job): the status line stops
    saying "Sending..." and says why."""
    import gradio as gr

    from infinite_id.ui import QUEUE_FULL, Services, Status

    services = Services(lambda: None, lambda: None, guard=gen.OutputGuard())
    for session, detail, sentence in [("a", "Queue is full. Please try again later.", QUEUE_FULL),
                                      ("b", app.BUSY_SESSION, app.BUSY_SESSION)]:
        services.board.set(session, "generate", Status("sent", since=time.monotonic()))
        html, timer = services.view(gr.Request(session_hash=session), "generate")
        assert "Sending your request" in html and timer.active  # the join has not been answered yet
        services.sessions.refused(session, detail)
        html, timer = services.view(gr.Request(session_hash=session), "generate")
        assert sentence in html and "status-error" in html and not timer.active


# --- 3. faults ----------------------------------------------------------------------------------------------------


def test_out_of_memory_mid_generation_frees_memory_and_the_next_request_is_right(client, golden, monkeypatch):
    freed = []
    real_free = runner._free_memory
    monkeypatch.setattr(runner, "_free_memory", lambda: (freed.append(1), real_free()))

    def reporter(progress, desc):
        def report(done, total):
            if done == 1:  # mid-generation: after the first denoising step
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        return report

    with monkeypatch.context() as patch:
        patch.setattr(widgets, "progress_reporter", reporter)
        with pytest.raises(AppError, match="The GPU ran out of memory for this request"):
            generate(client, FACE, **SPECS[0])
    assert freed == [1]
    assert differences(golden[:1], [outputs(generate(client, FACE, **SPECS[0]))]) == []


def test_free_memory_collects_and_empties_the_device_cache(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    runner._free_memory()
    assert emptied == [1]


@pytest.mark.parametrize(("fill", "reason"), [(float("nan"), "NaN decode"), (-1.0, "all-black decode")])
def test_nan_or_black_output_is_an_error_never_a_success(engine, client, golden, monkeypatch, fill, reason):
    vae = engine.pipe.vae
    real_decode = vae.decode

    def bad_decode(latents, return_dict=False):
        image = real_decode(latents, return_dict=False)[0]
        return (torch.full_like(image, fill),)

    with monkeypatch.context() as patch:
        patch.setattr(vae, "decode", bad_decode)
        with pytest.raises(AppError, match="blank image"):
            generate(client, FACE, **SPECS[0])
    assert differences(golden[:1], [outputs(generate(client, FACE, **SPECS[0]))]) == [], reason


@torch.no_grad()
def test_decode_overflow_is_retried_once_in_fp32(pipe, monkeypatch):
    """A low-precision VAE whose decode overflows: one fp32 retry gives the fp32 image; the VAE's dtype is
    restored afterwards."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    vae, calls = pipe.vae, []
    saved = {k: v.clone() for k, v in vae.state_dict().items()}
    real_decode = vae.decode

    def overflows_below_fp32(z, return_dict=False):
        calls.append(z.dtype)
        image = real_decode(z, return_dict=False)[0]
        return (image if z.dtype == torch.float32 else torch.full_like(image, float("inf")),)

    try:
        vae.to(torch.bfloat16).to(torch.float32)  # bf16-exact weights, so the fp32 retry is comparable
        expected = pipe._decode(latents, "np")
        vae.to(torch.bfloat16)
        monkeypatch.setattr(vae, "decode", overflows_below_fp32)
        image = pipe._decode(latents, "np")
        assert calls == [torch.bfloat16, torch.float32]
        assert vae.dtype == torch.bfloat16  # the shared VAE is left as it was found
        np.testing.assert_array_equal(image, expected)
    finally:
        vae.to(torch.float32)
        vae.load_state_dict(saved)  # the session's pipeline keeps its exact fp32 weights for other tests


@torch.no_grad()
def test_decode_that_stays_nan_raises_and_nan_latents_are_not_retried(pipe, monkeypatch):
    vae, calls = pipe.vae, []

    def always_nan(z, return_dict=False):
        calls.append(z.dtype)
        return (torch.full((z.shape[0], 3, 64, 64), float("nan"), dtype=z.dtype),)

    monkeypatch.setattr(vae, "decode", always_nan)
    saved = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.to(torch.bfloat16)
    try:
        with pytest.raises(FloatingPointError, match="even in fp32"):
            pipe._decode(torch.zeros(1, 4, 8, 8), "pil")
        assert calls == [torch.bfloat16, torch.float32]  # exactly one retry
        calls.clear()
        with pytest.raises(FloatingPointError, match="denoised latents"):
            pipe._decode(torch.full((1, 4, 8, 8), float("nan")), "pil")
        assert calls == [torch.bfloat16]  # NaN latents stay NaN in any precision: no retry
    finally:
        vae.to(torch.float32)
        vae.load_state_dict(saved)


def test_a_step_past_the_time_limit_is_cut_with_a_sentence(parallel, client, golden, monkeypatch):
    def reporter(progress, desc):
        def report(done, total):
            time.sleep(0.6)  # a step that hangs well past the limit

        return report

    with monkeypatch.context() as patch:
        patch.setattr(parallel[0].handlers, "timeout_s", 0.3)
        patch.setattr(widgets, "progress_reporter", reporter)
        started = time.monotonic()
        with pytest.raises(AppError, match="took longer than this server allows"):
            generate(client, FACE, **{**SPECS[0], "steps": 50})
        assert time.monotonic() - started < 10  # stopped after one slow step, not 50
    assert differences(golden[:1], [outputs(generate(client, FACE, **SPECS[0]))]) == []


def test_missing_face_models_stop_the_app_at_start_up_not_on_a_request(tmp_path, monkeypatch, capsys):
    pytest.importorskip("infinite_id.models.loading")
    from infinite_id.models import fetching, loading

    real_check = fetching.startup_check
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(fetching, "startup_check", lambda models=None, **kw: real_check(
        models, **{**kw, "face_root": tmp_path / "faces", "cache_dir": tmp_path / "hub"}))
    monkeypatch.setattr(loading, "load_pipeline", lambda **kw: pytest.fail("a model was loaded"))
    monkeypatch.setattr(app.gr.Blocks, "launch", lambda *a, **kw: pytest.fail("the server started"))
    assert app.main(["--engine", "real"]) == 1
    assert "face models" in capsys.readouterr().err


def test_prompt_encoding_is_serialized_so_concurrent_calls_keep_their_own_padding(engine):
    """The bug the concurrency test found: diffusers' encode_prompt switches the shared tokenizers between
    max-length and longest padding, so unserialized concurrent calls got each other's (shape errors, or silently
    wrong embeddings). ``InfiniteIDPipeline.encode_prompt`` holds a lock so each call sees its own."""
    pipe = engine.pipe
    prompts = [("a long prompt " * (30 if i % 2 else 1)) + str(i) for i in range(8)]

    def encode(prompt):
        return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                  negative_prompt="blurry")[0]

    serial = [encode(p) for p in prompts]
    results: dict[int, list] = {i: [] for i in range(len(prompts))}

    def work(i):
        for _ in range(5):
            try:
                results[i].append(encode(prompts[i]))
            except Exception as error:  # a race shows as a shape error; recorded, then asserted below
                results[i].append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, got in results.items():
        assert all(isinstance(g, torch.Tensor) and torch.equal(g, serial[i]) for g in got)


# --- 7. optional safety check and watermark -----------------------------------------------------------------------


def test_the_safety_check_withholds_flagged_images_and_says_so(parallel, client, monkeypatch):
    handlers, seen = parallel[0].handlers, []

    def flag_the_first(images):
        seen.append(len(images))
        return [i == 0 for i in range(len(images))]

    monkeypatch.setattr(handlers, "guard", gen.OutputGuard(safety_checker=flag_the_first))
    gallery, _, info, files, seed = generate(client, FACE, **{**SPECS[0], "num_images": 2})
    assert seen[0] == 2 and len(gallery) == len(files) == 1
    assert gen.read_metadata(files[0])["seed"] == seed + 1  # the first image (seed) was withheld, never saved
    assert "1 image(s) withheld by the safety check" in info

    monkeypatch.setattr(handlers, "guard", gen.OutputGuard(safety_checker=lambda images: [True] * len(images)))
    with pytest.raises(AppError, match="The safety check withheld this image"):
        generate(client, FACE, **SPECS[0])


def test_guard_settings_are_honoured(monkeypatch):
    from infinite_id.config import ServerSettings

    off = gen.OutputGuard.from_settings(ServerSettings())
    assert off.encoder is None and off.safety_checker is None
    named = gen.OutputGuard.from_settings(ServerSettings(safety_checker="os.path:isabs"))
    assert named.safety_checker is __import__("os").path.isabs
    with pytest.raises(ValueError, match="cannot be loaded"):
        gen.OutputGuard(safety_checker="no_such_module_here:check")
    monkeypatch.setitem(__import__("sys").modules, "imwatermark", None)  # the package missing
    with pytest.raises(ValueError, match="pip install invisible-watermark"):
        gen.OutputGuard.from_settings(ServerSettings(watermark=True))


def test_the_invisible_watermark_is_sdxls_and_only_when_asked():
    pytest.importorskip("imwatermark")
    from imwatermark import WatermarkDecoder

    from infinite_id.faces.tiny_pack import synthetic_face_photo

    image = synthetic_face_photo(320, seed=4)
    assert gen.OutputGuard().mark(image) is image  # off by default
    marked = gen.OutputGuard(watermark=True).mark(image)
    bits = WatermarkDecoder("bits", len(gen.WATERMARK_BITS)).decode(np.asarray(marked)[:, :, ::-1].copy(), "dwtDct")
    assert list(bits) == gen.WATERMARK_BITS
    assert np.abs(np.asarray(marked, dtype=np.int16) - np.asarray(image, dtype=np.int16)).mean() < 3  # invisible
    small = image.resize((64, 64))
    assert gen.OutputGuard(watermark=True).mark(small) is small  # too small for dwtDct, as in diffusers
