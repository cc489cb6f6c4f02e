"""``python -m infinite_id verify-weights``: the help, the tiny end-to-end run against a tiny diffusers reference, the
verdicts, and the offline start-up failure with the list of missing files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import infinite_id.evaluation.verify as vf
from infinite_id.__main__ import main as cli_main
from infinite_id.models.engines import load_engine

ROOT = Path(__file__).resolve().parents[1]


def test_verify_weights_is_a_command_with_help(capsys):
    assert cli_main(["--help"]) == 0
    assert "verify-weights" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli_main(["verify-weights", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--photos", "--seeds", "--engine", "--adapter", "--clip-model", "--out"):
        assert flag in out


def test_verify_weights_tiny_engine_writes_its_table_against_the_diffusers_reference(tmp_path, capsys):
    out = tmp_path / "verify"
    code = vf.main(["--engine", "tiny", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for name in vf.OUTPUTS:
        assert (out / name).is_file()
    table = (out / "table.md").read_text()
    for label in ("alone, diffusers (reference)", "alone, ours", "Infinite-ID, our defaults", "LoRA off",
                  "CLIP crop in RGB", "AdaIN-cross off"):
        assert label in table
    assert "reaches the diffusers reference" in table and "random weights" in table
    summary = json.loads((out / "verify.json").read_text())
    rows = summary["settings"]
    assert rows["ours-adapter"]["pixels_vs_reference"] <= 1.0  # ours reproduces diffusers' images
    assert rows["infinite-id"]["pixels_vs_reference"] > 1.0  # while the two-stream method makes other images
    records = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert len(records) == 1 * 3 * 1 * len(rows)  # one photo x three prompts x one seed x settings


def test_verdicts_say_when_ours_does_not_reach_the_reference():
    def row(face, clip, pixels=None):
        return {"label": "x, y", "knobs": {}, "images": 1, "face_sim": face, "clip_t": clip, "face_found": 100.0,
                "pixels_vs_reference": pixels}

    rows = {"reference": row(60.0, 25.0), "ours-adapter": row(50.0, 25.0, 40.0), "infinite-id": row(55.0, 30.0),
            "lora-off": row(58.0, 29.0)}
    rows["lora-off"]["label"] = "Infinite-ID, LoRA off"
    lines = vf.verdicts(rows)
    assert "does NOT reach" in lines[-2]
    assert any(line.startswith("LoRA off:") and "the switched setting wins" in line for line in lines)
    assert "Infinite-ID, LoRA off" in lines[0]
    rows["ours-adapter"] = row(59.5, 25.0, 0.4)
    assert " reaches the diffusers reference" in vf.verdicts(rows)[-2]


@pytest.mark.parametrize("kind,lora", [("faceid-plusv2", "rank 4, identity stream only"), ("plus-face", "none"),
                                       ("instantid", "none")])
def test_tiny_engine_runs_each_public_adapter_format_through_the_converter(kind, lora):
    engine = load_engine("tiny", adapter=kind)
    assert engine.pipe.id_encoder.kind == kind and engine.pipe.weights_info["lora"] == lora
    assert engine.pipe.adapter_file.is_file()


def test_verify_weights_offline_fails_with_the_missing_files(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "INFINITE_ID_FACE_ROOT": str(tmp_path / "faces"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "infinite_id", "verify-weights", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "python -m infinite_id download" in done.stderr and "Traceback" not in done.stderr
    for what in ("base model", "identity adapter"):
        assert f"- {what}:" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_the_reference_runs_while_our_unet_waits_on_the_cpu(monkeypatch, tmp_path):
    """On a GPU, verify-weights holds one UNet on the device at a time: diffusers' copy while the reference runs
    (ours parked on the CPU), then ours again. No face stack (the GPU machine may lack insightface): a face as
    the reference reads it, an ArcFace-sized embedding and a CLIP crop."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from PIL import Image

    from infinite_id.models.tiny_adapters import load_tiny_adapter
    from infinite_id.testing import tiny_pipeline

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pipe = tiny_pipeline(face_analyzer=None)
    load_tiny_adapter(pipe, "faceid-plusv2", tmp_path)
    pipe.to("cuda")
    embedding = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    face = SimpleNamespace(embedding=embedding / np.linalg.norm(embedding), embedding_norm=20.0,
                           clip_crop=Image.new("RGB", (224, 224), (120, 90, 80)))
    seen = []
    build = vf.build_reference

    def watched(pipe, adapter_file, device=None):
        reference = build(pipe, adapter_file, device=device)
        seen.append((pipe.unet.device.type, reference.pipe.unet.device.type))
        return reference

    monkeypatch.setattr(vf, "build_reference", watched)
    call = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64)
    images, has_lora = vf._reference_images(pipe, [("face", face)], ["a photo of a person"], [0], call)
    assert seen == [("cpu", "cuda")] and has_lora
    assert pipe.unet.device.type == "cuda" and len(images) == 1
