"""VRAM tiers (issue 15): each tier's options land on the built pipeline, and the exact ones keep the images.

Tiers are applied to the tiny pipeline on the CPU (diffusers' model offload accepts a CPU "accelerator", so its
hooks run here too; sequential offload cannot target a CPU, see test_speed_options.py). Images are compared as
decoded tensors in [0, 1] with two images per prompt, so VAE slicing has rows to slice.
"""

import dataclasses
import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import generate

from infinite_id.config import model_settings_from_env
from infinite_id.models import tiers
from infinite_id.testing import tiny_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory  # noqa: E402

GIB = tiers.GIB
CPU = torch.device("cpu")


def images(pipe, identity):
    return generate(pipe, id_embeds=identity, num_images_per_prompt=2, output_type="pt").images.cpu()


@pytest.fixture(scope="module")
def tier24(identity):
    pipe = tiny_pipeline(seed=0, face_analyzer=None)
    tiers.apply(pipe, tiers.TIERS["24"], CPU)
    return images(pipe, identity)


def test_the_auto_tier_follows_free_memory():
    picks = {free: tiers.pick_tier(int(free * GIB)).name for free in (80, 23.0, 15.5, 11.5, 7.5, 5.6, 3.0)}
    assert picks == {80: "24", 23.0: "24", 15.5: "16", 11.5: "12", 7.5: "8", 5.6: "6", 3.0: "6"}
    assert tiers.choose("auto", None).name == "none"  # no accelerator: nothing to save
    assert tiers.choose("auto", (int(7.5 * GIB), 8 * GIB)).memory_mode == "model"
    assert tiers.choose("12", (int(70 * GIB), 80 * GIB)).name == "12"  # asked for: taken as is
    assert tiers.choose("12", None).name == "none"
    overridden = tiers.choose("8", (int(7.5 * GIB), 8 * GIB), memory_mode="sequential")
    assert (overridden.name, overridden.memory_mode, overridden.vae_tiling) == ("8", "sequential", True)
    with pytest.raises(ValueError, match="vram_tier must be one of"):
        tiers.choose("10", None)


def test_the_tier_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("INFINITE_ID_VRAM_TIER", "8")
    assert model_settings_from_env().vram_tier == "8"
    monkeypatch.delenv("INFINITE_ID_VRAM_TIER")
    assert model_settings_from_env().vram_tier == "auto" and model_settings_from_env().memory_mode is None


@pytest.mark.parametrize("name", ["16", "12", "8"])
def test_each_exact_tier_is_applied_and_gives_the_tier_24_images(name, identity, tier24):
    tier = tiers.TIERS[name]
    assert tier.exact
    pipe = tiny_pipeline(seed=0, face_analyzer=None)
    applied = tiers.apply(pipe, tier, CPU)
    assert applied == tier
    assert (pipe.vae.use_slicing, pipe.vae.use_tiling) == (tier.vae_slicing, tier.vae_tiling)
    offloaded = hasattr(pipe.unet, "_hf_hook")  # accelerate's model-offload hook
    assert offloaded == (tier.memory_mode == "model")
    out = images(pipe, identity)
    assert (out - tier24).abs().max().item() <= 1e-4  # float rounding only (slicing: 1e-5 in test_speed_options)
    if offloaded:
        assert next(pipe.unet.parameters()).device.type == "cpu"


def test_tier_6_quantizes_the_unet_with_torchao(identity, tier24):
    pytest.importorskip("torchao")
    tiers.quantizer_problem.cache_clear()
    pipe = tiny_pipeline(seed=0, face_analyzer=None)
    applied = tiers.apply(pipe, tiers.TIERS["6"], CPU)
    assert applied.quantize == "int8" and applied.memory_mode == "model" and not applied.exact
    linear = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all("Int8" in type(m.weight).__name__ for m in linear)  # our identity projections too
    out = images(pipe, identity)
    assert torch.isfinite(out).all()
    # Approximate by design (per-row int8 weights): close to tier 24, not equal.
    assert 0 < (out - tier24).abs().mean().item() < 0.02


def test_quantization_without_torchao_falls_back_with_one_log_line(identity, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    tiers.quantizer_problem.cache_clear()
    try:
        assert "torchao is not usable" in tiers.quantizer_problem("cpu", torch.float32)
        pipe = tiny_pipeline(seed=0, face_analyzer=None)
        # Tier 6's fallback is sequential offload, which cannot target a CPU: the same tier falling back to model.
        tier = dataclasses.replace(tiers.TIERS["6"], fallback_memory_mode="model")
        with caplog.at_level(logging.INFO, logger=tiers.__name__):
            applied = tiers.apply(pipe, tier, CPU)
    finally:
        tiers.quantizer_problem.cache_clear()
    assert applied.quantize is None and applied.memory_mode == "model" and applied.exact
    assert not any("Int8" in type(m.weight).__name__ for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "torchao is not usable" in lines[0] and "model instead" in lines[0]
    assert torch.isfinite(images(pipe, identity)).all()


def test_the_memory_count_sees_every_live_byte_and_no_score_matrix():
    # The estimator behind the tier table (benchmarks/memory.py) on sums it must get exactly.
    with torch.device("meta"):
        a, b = torch.randn(256, 256), torch.randn(256, 256)  # made outside: not counted

    def work():
        x = a @ b  # 256 KiB
        y = x + 1  # 256 KiB, x still alive: 512 KiB peak
        del x
        z = y.t()  # a view: nothing new
        return z.sum()

    assert memory.peak_activation_bytes(work) == 2 * 256 * 256 * 4
    with torch.device("meta"):
        q = torch.randn(1, 2, 4096, 64, dtype=torch.float16)
    fused = memory.peak_activation_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert fused == q.nbytes + 2 * 4096 * 4  # the output and the kernel's log-sum-exp, not 4096² scores


def test_the_tier_estimates_meet_the_goals():
    # The committed estimate (python benchmarks/memory.py --json benchmarks/memory-1024-fp16.json), re-read
    # through the tier table: a change of tier options that breaks a goal fails here.
    import json

    m = json.loads((Path(memory.__file__).parent / "memory-1024-fp16.json").read_text())
    goals = {"12": 12 * GIB, "8": 8e9, "6": 6e9}
    for name, goal in goals.items():
        tier = tiers.TIERS[name]
        assert max(memory.tier_peaks(m, tier.memory_mode, tier.quantize == "int8").values()) <= goal, name
        if tier.fallback_memory_mode:
            assert max(memory.tier_peaks(m, tier.fallback_memory_mode, False).values()) <= goal, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["8", "6"])
def test_offload_tiers_on_cuda_keep_the_images(name, identity):
    # On a GPU the offload hooks really move weights; tier 6 quantizes with torchao where it runs, else it takes its
    # sequential-offload fallback. fp16 on both sides: exact tiers within fp16 rounding, int8 within its error.
    cuda = torch.device("cuda")
    reference = tiny_pipeline(seed=0, face_analyzer=None).to(torch.float16)
    tiers.apply(reference, tiers.TIERS["24"], cuda)
    want = images(reference, identity).float()
    pipe = tiny_pipeline(seed=0, face_analyzer=None).to(torch.float16)
    applied = tiers.apply(pipe, tiers.TIERS[name], cuda)
    got = images(pipe, identity).float()
    assert torch.isfinite(got).all()
    if applied.exact:
        assert (got - want).abs().max().item() <= 1e-2, applied
    else:
        assert (got - want).abs().mean().item() < 0.02, applied


def test_a_memory_mode_is_checked_even_where_it_is_ignored():
    assert tiers.choose("auto", None, memory_mode="model").memory_mode == "none"  # a CPU: nothing to offload from
    with pytest.raises(ValueError, match="memory_mode must be one of"):
        tiers.choose("auto", None, memory_mode="disk")
