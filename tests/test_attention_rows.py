"""The processors' fast paths (issue 15) compute what the general ones compute: rows as slices (the pipeline's
stream-major blocks, views) against index tensors (copies), the per-call K/V cache against projecting every time,
identity keys padded on CPU against unpadded ones, AdaIN-mean written into a buffer against a new tensor. The
general paths themselves are checked against hand-written attention and peft in test_attention.py and
test_identity_lora.py."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention
from test_attention import CROSS, DIM, HEADS

from infinite_id.method import backends
from infinite_id.method.attention import IDCall, IDCrossAttnProcessor, MixedSelfAttnProcessor
from infinite_id.method.id_lora import IdentityLoRA
from infinite_id.method.ops import adain_mean
from infinite_id.method.pipeline import _Layout

# Stream-major, as the pipeline lays out one image with CFG: [text_u, text_c, id_u, id_c].
SLICES = dict(id_rows=slice(2, 4), text_rows=slice(0, 2), other_rows=slice(0, 2))
TENSORS = dict(id_rows=torch.tensor([2, 3]), text_rows=torch.tensor([0, 1]))


class _Unpadded:
    """SDPA that never pads keys (as a CUDA backend does)."""

    name = "sdpa-unpadded"

    def __call__(self, q, k, v, bias=None):
        return backends.SDPA(q, k, v, bias)


def _layer(cross: bool, seed: int, lora: bool) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(query_dim=DIM, cross_attention_dim=CROSS if cross else None, heads=HEADS, dim_head=DIM // HEADS)
    proc = IDCrossAttnProcessor("x.attn2.processor", DIM, CROSS) if cross else MixedSelfAttnProcessor("x.attn1.processor")
    attn.set_processor(proc)
    if lora:
        proc.id_lora = IdentityLoRA(attn, 3)
        for p in proc.id_lora.parameters():
            p.data = torch.randn(p.shape) * 0.3
    return attn


KNOBS = [dict(), dict(semantic_scale=2.5, style_strength=0.3), dict(semantic_scale=0.0, style_strength=0.7),
         dict(semantic_scale=0.5, style_strength=0.0, lora_scale=1.5), dict(mixing=False, adain_cross=True)]


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("knobs", KNOBS)
def test_slices_and_index_tensors_give_the_same_outputs(knobs, lora):
    hs, ctx, tokens = torch.randn(4, 5, DIM), torch.randn(4, 6, CROSS), torch.randn(2, 3, CROSS)
    knobs = {"adain_cross": True, **knobs}
    for attn, kwargs in ((_layer(False, 0, lora), {}), (_layer(True, 1, lora), {"encoder_hidden_states": ctx})):
        with torch.no_grad():
            by_slice = attn(hs, id_call=IDCall(id_tokens=tokens, **SLICES, **knobs), **kwargs)
            by_index = attn(hs, id_call=IDCall(id_tokens=tokens, **TENSORS, **knobs), **kwargs)
        torch.testing.assert_close(by_slice, by_index, atol=1e-6, rtol=0)
        if lora:  # the LoRA acts on the identity block only: the text block is the LoRA-free layer's
            without = attn(hs, id_call=IDCall(id_tokens=tokens, **SLICES, **{**knobs, "lora_scale": 0.0}), **kwargs)
            torch.testing.assert_close(by_slice[:2], without[:2], atol=1e-6, rtol=0)
            assert (by_slice[2:] - without[2:]).abs().max() > 1e-3


def test_the_kv_cache_projects_once_per_call_and_changes_no_bit():
    attn = _layer(True, 2, lora=True)
    proc = attn.processor
    hs, ctx, tokens = torch.randn(4, 5, DIM), torch.randn(4, 6, CROSS), torch.randn(2, 3, CROSS)
    calls = []
    hooks = [proc.to_k_ip.register_forward_hook(lambda *_: calls.append("identity")),
             attn.to_k.register_forward_hook(lambda *_: calls.append("text"))]
    try:
        with torch.no_grad():
            fresh = attn(hs, encoder_hidden_states=ctx, id_call=IDCall(id_tokens=tokens, **SLICES))
            calls.clear()
            cache: dict = {}
            steps = [attn(hs * (1 + i), encoder_hidden_states=ctx, id_call=IDCall(id_tokens=tokens, kv_cache=cache,
                                                                                 **SLICES)) for i in range(3)]
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == ["text", "identity"]  # three steps, one projection each
    assert torch.equal(steps[0], fresh)
    assert sorted(k[1:] for k in cache) == [("identity", "tokens"), ("text", "layout")]


@pytest.mark.parametrize("adain_cross", [False, True])
def test_identity_keys_padded_for_the_cpu_kernel_give_the_same_attention(adain_cross):
    attn = _layer(True, 3, lora=False)
    hs, ctx, tokens = torch.randn(4, 5, DIM), torch.randn(4, 6, CROSS), torch.randn(2, 21, CROSS)
    call = IDCall(id_tokens=tokens, adain_cross=adain_cross, kv_cache={}, **SLICES)
    with torch.no_grad():
        padded = attn(hs, encoder_hidden_states=ctx, id_call=call)
        k, v, bias = attn.processor.identity_kv(call, hs.dtype)
        assert k.shape[1] == v.shape[1] == 32 and torch.isinf(bias[..., 21:]).all() and not bias[..., :21].any()
        assert not k[:, 21:].any()
        attn.processor.backend = _Unpadded()
        unpadded = attn(hs, encoder_hidden_states=ctx, id_call=IDCall(id_tokens=tokens, adain_cross=adain_cross,
                                                                      **SLICES))
    torch.testing.assert_close(padded, unpadded, atol=1e-6, rtol=0)
    assert backends.SDPA.key_multiple(torch.device("cpu")) == 16 and backends.SDPA.key_multiple("cuda") == 1


def test_adain_mean_into_a_buffer_equals_the_new_tensor():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 12, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    expected = x + 0.6 * (y.mean(1, keepdim=True) - x.mean(1, keepdim=True))
    buf = torch.zeros(2, 19, 8)
    assert adain_mean(x, y, 0.6, out=buf[:, :12]).data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf[:, :12], expected, atol=1e-6, rtol=0)
    assert not buf[:, 12:].any()
    torch.testing.assert_close(adain_mean(x, y, 0.6), expected, atol=1e-6, rtol=0)
    adain_mean(x, y, 0.0, out=buf[:, 7:])
    assert torch.equal(buf[:, 7:], x)
    # bf16: sum / n accumulates in fp32 as mean() does; the same values for a power-of-two token count.
    xb = x[:, :8].bfloat16()
    assert torch.equal(xb.sum(1, keepdim=True) / 8, xb.mean(1, keepdim=True))


def test_the_pipeline_layout_is_stream_major_with_one_block_per_stream():
    layout = _Layout(("text", "id"), ("uncond", "cond"), batch=2)
    assert layout.rows("text") == slice(0, 4) and layout.rows("id") == slice(4, 8)
    rows = layout.per_row({"uncond": torch.tensor([0, 1]), "cond": torch.tensor([2, 3])})
    # [text_u x2, text_c x2, id_u x2, id_c x2]: identity row i pairs with text row i (same image and polarity).
    assert rows.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert _Layout(("id",), ("cond",), batch=3).rows("id") == slice(0, 3)
    assert layout.key == "text+id|uncond+cond|2"


def test_a_hand_built_call_with_irregular_rows_still_computes_every_row():
    # id row 1 of 3, no text rows and no other_rows given: rows 0 and 2 are found on the host and computed stock.
    attn = _layer(False, 4, lora=False)
    hs = torch.randn(3, 5, DIM)
    call = IDCall(id_rows=torch.tensor([1]), id_tokens=torch.randn(1, 3, CROSS), text_rows=torch.tensor([0]),
                  semantic_scale=math.e)
    with torch.no_grad():
        out = attn(hs, id_call=call)
        stock = attn(hs)
    torch.testing.assert_close(out[2], stock[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0], stock[0], atol=1e-6, rtol=0)
    assert (out[1] - stock[1]).abs().max() > 1e-3
