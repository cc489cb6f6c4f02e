"""The processors against hand-written attention on small tensors, through real diffusers Attention modules."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from infinite_id.method.attention import IDCall, IDCrossAttnProcessor, MixedSelfAttnProcessor

HEADS, DIM_HEAD, DIM, CROSS = 2, 8, 16, 12
TEXT_ROWS, ID_ROWS = torch.tensor([0, 2]), torch.tensor([1, 3])


def reference_attention(q, k, v, bias=None):
    """softmax(q k^T / sqrt(d) + bias) v per head, written out by hand. q: [Nq, C], k/v: [Nk, C]."""
    outs = []
    for h in range(HEADS):
        sl = slice(h * DIM_HEAD, (h + 1) * DIM_HEAD)
        logits = q[:, sl] @ k[:, sl].T / math.sqrt(DIM_HEAD)
        if bias is not None:
            logits = logits + bias
        outs.append(torch.softmax(logits, dim=-1) @ v[:, sl])
    return torch.cat(outs, dim=-1)


@pytest.fixture
def self_attn():
    torch.manual_seed(0)
    return Attention(query_dim=DIM, heads=HEADS, dim_head=DIM_HEAD)


@pytest.fixture
def cross_attn():
    torch.manual_seed(1)
    attn = Attention(query_dim=DIM, cross_attention_dim=CROSS, heads=HEADS, dim_head=DIM_HEAD)
    proc = IDCrossAttnProcessor("x.attn2.processor", DIM, CROSS)
    attn.set_processor(proc)
    return attn


def call(**kw):
    kw.setdefault("id_tokens", torch.randn(2, 3, CROSS))
    return IDCall(id_rows=ID_ROWS, text_rows=TEXT_ROWS, **kw)


@pytest.mark.parametrize("semantic,style", [(1.0, 1.0), (2.5, 0.3), (0.5, 0.0), (0.0, 0.7)])
def test_mixed_attention_matches_hand_written_reference(self_attn, semantic, style):
    hs = torch.randn(4, 5, DIM)
    proc = MixedSelfAttnProcessor("down.attn1.processor")
    out = proc(self_attn, hs, id_call=call(semantic_scale=semantic, style_strength=style))
    stock = AttnProcessor2_0()(self_attn, hs)
    a = self_attn
    for r, p in zip(ID_ROWS.tolist(), TEXT_ROWS.tolist()):
        q, k_id, v_id = a.to_q(hs[r]), a.to_k(hs[r]), a.to_v(hs[r])
        k_t, v_t = a.to_k(hs[p]), a.to_v(hs[p])
        k_id = k_id + style * (k_t.mean(0) - k_id.mean(0))
        v_id = v_id + style * (v_t.mean(0) - v_id.mean(0))
        if semantic > 0:
            bias = torch.cat([torch.zeros(5), torch.full((5,), math.log(semantic))])
            mixed = reference_attention(q, torch.cat([k_id, k_t]), torch.cat([v_id, v_t]), bias)
        else:
            mixed = reference_attention(q, k_id, v_id)
        torch.testing.assert_close(out[r], a.to_out[0](mixed), atol=1e-5, rtol=1e-5)
        # Text-stream rows are stock attention.
        torch.testing.assert_close(out[p], stock[p], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out[ID_ROWS], stock[ID_ROWS], atol=1e-4)


def test_mixed_attention_is_stock_without_a_call_outside_the_window_and_in_other_layers(self_attn):
    hs = torch.randn(4, 5, DIM)
    stock = AttnProcessor2_0()(self_attn, hs)
    proc = MixedSelfAttnProcessor("down_blocks.1.attn1.processor")
    torch.testing.assert_close(proc(self_attn, hs), stock, atol=1e-6, rtol=0)
    torch.testing.assert_close(proc(self_attn, hs, id_call=call(mixing=False)), stock, atol=1e-6, rtol=0)
    torch.testing.assert_close(proc(self_attn, hs, id_call=call(mix_layers=("up_blocks",))), stock, atol=1e-6, rtol=0)
    mixed = proc(self_attn, hs, id_call=call(mix_layers=("down_blocks",)))
    assert not torch.allclose(mixed, stock, atol=1e-4)


def test_id_cross_attention_matches_reference(cross_attn):
    hs, ctx = torch.randn(4, 5, DIM), torch.randn(4, 6, CROSS)
    tokens = torch.randn(2, 3, CROSS)
    out = cross_attn(hs, encoder_hidden_states=ctx, id_call=call(id_tokens=tokens, id_scale=0.7))
    stock = AttnProcessor2_0()(cross_attn, hs, encoder_hidden_states=ctx)
    a, p = cross_attn, cross_attn.processor
    for j, r in enumerate(ID_ROWS.tolist()):
        q = a.to_q(hs[r])
        text = reference_attention(q, a.to_k(ctx[r]), a.to_v(ctx[r]))
        image = reference_attention(q, p.to_k_ip(tokens[j]), p.to_v_ip(tokens[j]))
        torch.testing.assert_close(out[r], a.to_out[0](text + 0.7 * image), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[TEXT_ROWS], stock[TEXT_ROWS], atol=1e-6, rtol=0)
    # id_scale = 0 is exactly the stock layer.
    torch.testing.assert_close(cross_attn(hs, encoder_hidden_states=ctx, id_call=call(id_scale=0.0)), stock, atol=1e-6, rtol=0)


def test_training_mode_switches_the_text_branch_off(cross_attn):
    hs, tokens = torch.randn(2, 5, DIM), torch.randn(2, 3, CROSS)
    train = IDCall(id_rows=torch.tensor([0, 1]), id_tokens=tokens, text_branch=False)
    a = cross_attn(hs, encoder_hidden_states=torch.randn(2, 6, CROSS), id_call=train)
    b = cross_attn(hs, encoder_hidden_states=torch.randn(2, 6, CROSS), id_call=train)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # the prompt cannot reach the output
    p = cross_attn.processor
    image = reference_attention(cross_attn.to_q(hs[0]), p.to_k_ip(tokens[0]), p.to_v_ip(tokens[0]))
    torch.testing.assert_close(a[0], cross_attn.to_out[0](image), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="every batch row"):
        cross_attn(hs, encoder_hidden_states=torch.randn(2, 6, CROSS), id_call=call(text_branch=False, id_tokens=tokens))


def test_adain_on_cross_attention_image_keys_is_optional(cross_attn):
    hs, ctx = torch.randn(4, 5, DIM), torch.randn(4, 6, CROSS)
    off = cross_attn(hs, encoder_hidden_states=ctx, id_call=call(id_tokens=torch.ones(2, 3, CROSS)))
    on = cross_attn(hs, encoder_hidden_states=ctx, id_call=call(id_tokens=torch.ones(2, 3, CROSS), adain_cross=True))
    assert not torch.allclose(off[ID_ROWS], on[ID_ROWS], atol=1e-4)
    torch.testing.assert_close(off[TEXT_ROWS], on[TEXT_ROWS], atol=0, rtol=0)
