"""Shared fixtures: one tiny real pipeline per test session (built offline in well under a second)."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny models are overhead-bound: one thread is faster than two, and far faster on a loaded machine.
torch.set_num_threads(1)

from infinite_id.method.id_encoder import IdentityFeatures  # noqa: E402
from infinite_id.testing import tiny_pipeline  # noqa: E402

STEPS = 4
SIZE = 64


@pytest.fixture(scope="session")
def pipe():
    return tiny_pipeline(seed=0)


def random_identity(seed: int, clip_tokens: int = 17, clip_dim: int = 32) -> IdentityFeatures:
    g = torch.Generator().manual_seed(seed)
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1)
    return IdentityFeatures(face=face, clip=torch.randn(1, clip_tokens, clip_dim, generator=g))


@pytest.fixture(scope="session")
def identity():
    return random_identity(1)


def generate(pipe, seed=0, prompt="a photo of a woman in times square", **kwargs):
    """One tiny call returning latents (output_type='latent'), so comparisons are not blurred by uint8 rounding."""
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("height", SIZE)
    kwargs.setdefault("width", SIZE)
    kwargs.setdefault("output_type", "latent")
    if "generator" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return pipe(prompt, **kwargs)


@pytest.fixture(scope="module")
def lora_engine():
    """The tiny engine with a tiny IP-Adapter-FaceID-PlusV2 file, LoRA included (``--adapter faceid-plusv2``)."""
    from infinite_id.models.engines import load_engine

    return load_engine("tiny", adapter="faceid-plusv2")


@pytest.fixture(scope="module")
def served_lora(lora_engine):
    """The app on ``lora_engine``, served for this test module: (demo, url)."""
    from app_server import serve

    with serve(lora_engine) as running:
        yield running
