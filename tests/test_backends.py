"""The attention backend (issue 15): chosen once, safely; the same maths on every path.

The broken xformers install most users have (a wheel built for another torch: it imports, and every op raises
``NotImplementedError: No operator found for memory_efficient_attention_forward``) is simulated by a stand-in
package written to a temporary folder on ``sys.path``. It is the only stand-in here; everything else is real.
"""

import importlib
import logging
import math
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import generate

from infinite_id.config import model_settings_from_env
from infinite_id.method import attention as id_attention
from infinite_id.method import backends
from infinite_id.testing import tiny_pipeline

CUDA = torch.cuda.is_available()
BROKEN_VERSION = "0.0.35"
NO_OPERATOR = (
    "No operator found for `memory_efficient_attention_forward` with inputs:\n"
    "     query       : shape=(2, 64, 2, 64) (torch.float16)\n"
    "`fa2F@2.7.4` is not supported because:\n    xFormers wasn't build with CUDA support"
)


@pytest.fixture
def broken_xformers(tmp_path, monkeypatch):
    """An xformers that imports but has no kernels, as the 0.0.35 wheel beside torch 2.11 behaves."""
    root = tmp_path / "site"
    (root / "xformers" / "ops" / "fmha").mkdir(parents=True)
    (root / "xformers" / "__init__.py").write_text(f'__version__ = "{BROKEN_VERSION}"\n')
    # The real wheel records the torch it was built for here (python -m xformers.info shows it too).
    (root / "xformers" / "cpp_lib.json").write_text(
        '{"version": {"cuda": 1208, "torch": "2.10.0+cu128", "python": "3.10.19"}}')
    raising = textwrap.dedent(f"""
        def _no_operator(*args, **kwargs):
            raise NotImplementedError({NO_OPERATOR!r})
        """)
    (root / "xformers" / "ops" / "__init__.py").write_text(
        "from . import fmha\n" + raising + "memory_efficient_attention = _no_operator\n")
    (root / "xformers" / "ops" / "fmha" / "__init__.py").write_text(
        raising + "memory_efficient_attention_partial = _no_operator\n")
    dist = root / f"xformers-{BROKEN_VERSION}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: xformers\nVersion: {BROKEN_VERSION}\n")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield root
    for name in [n for n in sys.modules if n == "xformers" or n.startswith("xformers.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def test_auto_falls_back_to_sdpa_when_xformers_raises(broken_xformers, caplog):
    with caplog.at_level(logging.INFO, logger=backends.__name__):
        chosen = backends.resolve_backend("auto", "cpu", torch.float32)
    assert chosen is backends.SDPA
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines  # one line, saying why
    assert f"xformers {BROKEN_VERSION} (built for torch 2.10.0+cu128) cannot run" in lines[0]
    assert "NotImplementedError" in lines[0]
    assert torch.__version__ in lines[0]


def test_explicit_xformers_that_cannot_run_stops_with_one_sentence_naming_both_versions(broken_xformers):
    with pytest.raises(backends.AttentionBackendError) as caught:
        backends.resolve_backend("xformers", "cpu", torch.float16)
    message = str(caught.value)
    assert f"xformers {BROKEN_VERSION} (built for torch 2.10.0+cu128)" in message
    assert f"with torch {torch.__version__}" in message
    assert "No operator found" in message and "--attention auto or sdpa" in message
    assert message.endswith(".") and ". " not in message  # one sentence


def test_explicit_xformers_stops_load_pipeline_before_any_weight_is_read(broken_xformers, tmp_path):
    from infinite_id.models.loading import load_pipeline

    # The base model does not exist: reaching the weights would raise MissingWeightsError instead.
    with pytest.raises(backends.AttentionBackendError, match=BROKEN_VERSION):
        load_pipeline(base_model=str(tmp_path / "nowhere"), device="cpu", dtype="fp32", attention="xformers",
                      local_files_only=True, face_analyzer=False)


def test_xformers_not_installed_is_said_plainly(monkeypatch, caplog):
    monkeypatch.setattr(backends, "installed_versions", lambda: (None, torch.__version__))
    with caplog.at_level(logging.INFO, logger=backends.__name__):
        assert backends.resolve_backend(None, "cpu", torch.float32) is backends.SDPA
    assert "xformers is not installed" in caplog.records[-1].getMessage()
    with pytest.raises(backends.AttentionBackendError, match="not installed beside torch"):
        backends.resolve_backend("xformers", "cpu", torch.float32)
    with pytest.raises(ValueError, match="attention must be one of"):
        backends.resolve_backend("flash", "cpu", torch.float32)


def test_attention_choice_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("INFINITE_ID_ATTENTION", "sdpa")
    assert model_settings_from_env().attention == "sdpa"
    monkeypatch.delenv("INFINITE_ID_ATTENTION")
    assert model_settings_from_env().attention == "auto"


def _partial(q, k, v):
    """One bias-free SDPA call and the log-sum-exp of its (scaled) logits: what xformers' partial call returns."""
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return F.scaled_dot_product_attention(q, k, v), torch.logsumexp(logits, dim=-1)


@pytest.mark.parametrize("weight", [0.3, 1.0, 2.5, 0.0])
def test_logsumexp_merge_of_two_calls_equals_one_biased_sdpa_call(weight):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 40, 16, generator=g)
    k1, v1 = torch.randn(2, 3, 40, 16, generator=g), torch.randn(2, 3, 40, 16, generator=g)
    k2, v2 = torch.randn(2, 3, 23, 16, generator=g), torch.randn(2, 3, 23, 16, generator=g)
    log_w = math.log(weight) if weight else -math.inf
    bias = torch.zeros(1, 1, 1, 63)
    bias[..., 40:] = log_w
    one_call = F.scaled_dot_product_attention(q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), attn_mask=bias)
    merged = backends.merge_partials(*_partial(q, k1, v1), *_partial(q, k2, v2), log_weight=log_w)
    assert (merged - one_call).abs().max().item() < 1e-5
    # The SDPA backend's mixed form is that one biased call.
    assert (backends.SDPA.mixed(q, k1, v1, k2, v2, log_w) - one_call).abs().max().item() < 1e-6


class _Unscaled:
    """A real attention that forgets the 1/sqrt(d) scale: runs fine, computes something else."""

    name = "unscaled"

    def __call__(self, q, k, v, bias=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)

    def mixed(self, q, k1, v1, k2, v2, log_weight):
        return backends.SDPA.mixed(q, k1, v1, k2, v2, log_weight)


def test_the_probe_accepts_sdpa_and_refuses_a_kernel_that_computes_something_else():
    assert backends.probe(backends.SDPA, "cpu", torch.float32) is None
    assert backends.probe(backends.SDPA, "cpu", torch.bfloat16) is None
    why = backends.probe(_Unscaled(), "cpu", torch.float32)
    assert why is not None and "plain attention differs from SDPA's" in why


def test_the_xformers_bias_is_aligned_and_broadcast_without_a_copy_per_row():
    q, k = torch.randn(2, 4, 50, 8, dtype=torch.float16), torch.randn(2, 4, 101, 8, dtype=torch.float16)
    bias = torch.zeros(1, 1, 1, 101)
    bias[..., 64:] = math.log(0.5)
    aligned = backends._aligned_bias(bias, q, k)
    assert aligned.shape == (2, 4, 50, 101) and aligned.dtype == torch.float16
    assert aligned.stride()[:3] == (0, 0, 0) and aligned.stride(-1) == 1  # one row in memory, broadcast
    assert aligned.untyped_storage().nbytes() == 104 * 2  # the key axis padded to a multiple of 8
    assert torch.equal(aligned[1, 3, 7].float(), bias[0, 0, 0].half().float())


class _Counting:
    """Real SDPA that counts its calls and the biased ones: shows which kernel each attention path reaches."""

    name = "counting-sdpa"
    key_multiple = staticmethod(backends.SDPA.key_multiple)  # pads the identity keys as SDPA does (CPU: 16)

    def __init__(self):
        self.calls = self.biased = 0

    def __call__(self, q, k, v, bias=None):
        self.calls += 1
        self.biased += bias is not None
        return backends.SDPA(q, k, v, bias)


def test_every_attention_path_uses_the_backend_set_at_load(identity):
    pipe = tiny_pipeline(seed=0, face_analyzer=None)
    reference = {m: generate(pipe, id_embeds=identity, method=m, semantic_scale=1.5, num_inference_steps=1).images
                 for m in ("infinite-id", "text")}
    counting = _Counting()
    assert id_attention.set_attention_backend(pipe.unet, counting) == len(pipe.unet.attn_processors)
    layers = len(pipe.unet.attn_processors)
    for method, ref in reference.items():
        counting.calls = counting.biased = 0
        out = generate(pipe, id_embeds=identity, method=method, semantic_scale=1.5, num_inference_steps=1).images
        assert torch.equal(out, ref)
        if method == "text":
            assert (counting.calls, counting.biased) == (layers, 0)  # plain SDXL through our processors
        else:
            # attn1: text rows + mixed identity rows (biased: log 1.5); attn2: text branch + identity branch, the
            # latter biased too where the identity keys are padded (-inf on the padding; CPU, tokens not a multiple
            # of 16: the tiny encoder's 21).
            tokens = pipe.id_encoder.num_tokens
            padded = counting.key_multiple(out.device) > 1 and tokens % counting.key_multiple(out.device)
            assert (counting.calls, counting.biased) == (2 * layers, layers // 2 + (layers // 2 if padded else 0))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_on_cuda_uses_xformers_only_when_it_runs_and_matches(identity):
    version, _ = backends.installed_versions()
    chosen = backends.resolve_backend("auto", "cuda", torch.float16)
    if version is None or backends.probe(backends.XFormersBackend(importlib.import_module("xformers.ops")), "cuda",
                                         torch.float16) is not None:
        assert chosen is backends.SDPA
        pytest.skip(f"xformers {version} cannot run here: auto chose SDPA, as it should")
    assert chosen.name == "xformers"
    pipe = tiny_pipeline(seed=0, face_analyzer=None).to("cuda", torch.float16)
    sdpa = generate(pipe, id_embeds=identity, semantic_scale=1.5).images.float()
    id_attention.set_attention_backend(pipe.unet, chosen)
    with_xformers = generate(pipe, id_embeds=identity, semantic_scale=1.5).images.float()
    assert (with_xformers - sdpa).abs().max().item() <= 2e-2


class _TwoCallSDPA:
    """A backend that merges two bias-free calls through their log-sum-exp in mixed attention, as xformers with
    partial attention does; each partial call is real SDPA with its log-sum-exp computed by hand."""

    name = "two-call-sdpa"
    merges_two_calls = True
    key_multiple = staticmethod(backends.SDPA.key_multiple)

    def __init__(self):
        self.mixed_calls = self.biased = 0

    def __call__(self, q, k, v, bias=None):
        self.biased += bias is not None
        return backends.SDPA(q, k, v, bias)

    def mixed(self, q, k1, v1, k2, v2, log_weight):
        self.mixed_calls += 1
        return backends.merge_partials(*_partial(q, k1, v1), *_partial(q, k2, v2), log_weight=log_weight)


def test_mixed_attention_through_a_logsumexp_merge_of_two_calls_equals_one_biased_call(identity):
    pipe = tiny_pipeline(seed=0, face_analyzer=None)
    kwargs = dict(id_embeds=identity, semantic_scale=1.5, num_inference_steps=2)
    one_call = generate(pipe, **kwargs).images
    two_calls = _TwoCallSDPA()
    id_attention.set_attention_backend(pipe.unet, two_calls)
    merged = generate(pipe, **kwargs).images
    self_layers = sum(name.endswith("attn1.processor") for name in pipe.unet.attn_processors)
    assert two_calls.mixed_calls == 2 * self_layers  # every mixed self-attention, both steps
    assert (merged - one_call).abs().max().item() <= 1e-4
