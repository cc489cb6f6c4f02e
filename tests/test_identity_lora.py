"""The identity LoRA and AdaIN-cross inside our processors, against an independent LoRA (peft) and hand-written
attention on real diffusers Attention modules; and the bad inputs of issue 14."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from adapter_specs import nested, random_tensors
from conftest import generate, random_identity
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from peft import LoraConfig, inject_adapter_in_model
from test_attention import CROSS, DIM, HEADS, ID_ROWS, TEXT_ROWS, reference_attention
from test_parity import adapter_spec

from infinite_id.adapters.convert import load_adapter
from infinite_id.method.attention import IDCall, IDCrossAttnProcessor, MixedSelfAttnProcessor, id_adapter_layers
from infinite_id.method.checkpoint import load_checkpoint, save_checkpoint
from infinite_id.method.id_lora import IdentityLoRA, add_on_rows, id_lora_state_dict, lora_rank
from infinite_id.testing import tiny_pipeline

RANK = 3


def with_lora(attn: Attention, proc, seed: int) -> tuple[Attention, IdentityLoRA]:
    """Install a random identity LoRA on ``proc``, and return a copy of ``attn`` with the same LoRA injected by
    peft (an implementation we did not write) for the reference."""
    attn.set_processor(proc)
    lora = IdentityLoRA(attn, RANK)
    g = torch.Generator().manual_seed(seed)
    for p in lora.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    proc.id_lora = lora
    peft_attn = copy.deepcopy(attn)
    peft_attn.set_processor(AttnProcessor2_0())
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    inject_adapter_in_model(config, peft_attn)
    for linear, part in (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"), ("to_out.0", "to_out_lora")):
        layer = peft_attn.get_submodule(linear)
        layer.lora_A["default"].weight.data = getattr(lora, part).down.weight.clone()
        layer.lora_B["default"].weight.data = getattr(lora, part).up.weight.clone()
    return peft_attn, lora


def call(**kw):
    kw.setdefault("id_tokens", torch.randn(2, 3, CROSS))
    return IDCall(id_rows=ID_ROWS, text_rows=TEXT_ROWS, **kw)


def test_lora_in_mixed_self_attention_acts_on_identity_rows_only_like_peft():
    torch.manual_seed(0)
    attn = Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS)
    peft_attn, _ = with_lora(attn, MixedSelfAttnProcessor("down.attn1.processor"), seed=1)
    hs, semantic, style = torch.randn(4, 5, DIM), 1.5, 0.6
    out = attn(hs, id_call=call(semantic_scale=semantic, style_strength=style))
    stock = AttnProcessor2_0()(attn, hs)
    for r, p in zip(ID_ROWS.tolist(), TEXT_ROWS.tolist()):
        q, k_id, v_id = peft_attn.to_q(hs[r]), peft_attn.to_k(hs[r]), peft_attn.to_v(hs[r])
        k_t, v_t = attn.to_k(hs[p]), attn.to_v(hs[p])  # the text stream's own keys and values: no LoRA
        k_id = k_id + style * (k_t.mean(0) - k_id.mean(0))
        v_id = v_id + style * (v_t.mean(0) - v_id.mean(0))
        bias = torch.cat([torch.zeros(5), torch.full((5,), math.log(semantic))])
        mixed = reference_attention(q, torch.cat([k_id, k_t]), torch.cat([v_id, v_t]), bias)
        torch.testing.assert_close(out[r], peft_attn.to_out[0](mixed), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[p], stock[p], atol=1e-6, rtol=0)  # text rows: plain SDXL
    # Outside the mixing window the identity rows are plain attention through the LoRA'd layer (peft's output).
    outside = attn(hs, id_call=call(mixing=False))
    torch.testing.assert_close(outside[ID_ROWS], peft_attn(hs)[ID_ROWS], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outside[TEXT_ROWS], stock[TEXT_ROWS], atol=1e-6, rtol=0)
    # lora_scale 0 and no call at all: no LoRA anywhere.
    torch.testing.assert_close(attn(hs, id_call=call(mixing=False, lora_scale=0.0)), stock, atol=1e-6, rtol=0)
    torch.testing.assert_close(attn(hs), stock, atol=1e-6, rtol=0)


def test_lora_in_id_cross_attention_matches_peft_and_scales_linearly():
    torch.manual_seed(2)
    attn = Attention(query_dim=DIM, cross_attention_dim=CROSS, heads=HEADS, dim_head=DIM // HEADS)
    proc = IDCrossAttnProcessor("x.attn2.processor", DIM, CROSS)
    peft_attn, _ = with_lora(attn, proc, seed=3)
    hs, ctx, tokens = torch.randn(4, 5, DIM), torch.randn(4, 6, CROSS), torch.randn(2, 3, CROSS)
    out = attn(hs, encoder_hidden_states=ctx, id_call=call(id_tokens=tokens, id_scale=0.7))
    stock = AttnProcessor2_0()(attn, hs, encoder_hidden_states=ctx)
    for j, r in enumerate(ID_ROWS.tolist()):
        q = peft_attn.to_q(hs[r])
        text = reference_attention(q, peft_attn.to_k(ctx[r]), peft_attn.to_v(ctx[r]))
        image = reference_attention(q, proc.to_k_ip(tokens[j]), proc.to_v_ip(tokens[j]))  # to_k_ip: no LoRA
        torch.testing.assert_close(out[r], peft_attn.to_out[0](text + 0.7 * image), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[TEXT_ROWS], stock[TEXT_ROWS], atol=1e-6, rtol=0)
    # The delta is linear in lora_scale: scale 2 moves the LoRA'd q twice as far.
    x = hs.reshape(-1, DIM)
    rows = torch.arange(x.shape[0])
    base = attn.to_q(x)
    one = add_on_rows(base, proc.id_lora, "to_q_lora", x, rows, 1.0)
    two = add_on_rows(base, proc.id_lora, "to_q_lora", x, rows, 2.0)
    torch.testing.assert_close(two - base, 2 * (one - base), atol=1e-5, rtol=1e-5)


def test_adain_cross_moves_image_kv_means_to_the_text_kv_inside_the_window_only():
    torch.manual_seed(4)
    attn = Attention(query_dim=DIM, cross_attention_dim=CROSS, heads=HEADS, dim_head=DIM // HEADS)
    proc = IDCrossAttnProcessor("x.attn2.processor", DIM, CROSS)
    attn.set_processor(proc)
    hs, ctx, tokens, style = torch.randn(4, 5, DIM), torch.randn(4, 6, CROSS), torch.randn(2, 3, CROSS), 0.6
    out = attn(hs, encoder_hidden_states=ctx, id_call=call(id_tokens=tokens, adain_cross=True, style_strength=style))
    for j, r in enumerate(ID_ROWS.tolist()):
        q, k, v = attn.to_q(hs[r]), attn.to_k(ctx[r]), attn.to_v(ctx[r])
        ip_k, ip_v = proc.to_k_ip(tokens[j]), proc.to_v_ip(tokens[j])
        ip_k = ip_k + style * (k.mean(0) - ip_k.mean(0))  # AdaIN-mean towards the same row's text keys
        ip_v = ip_v + style * (v.mean(0) - ip_v.mean(0))
        expected = reference_attention(q, k, v) + reference_attention(q, ip_k, ip_v)
        torch.testing.assert_close(out[r], attn.to_out[0](expected), atol=1e-5, rtol=1e-5)
    off = attn(hs, encoder_hidden_states=ctx, id_call=call(id_tokens=tokens, style_strength=style))
    outside = attn(hs, encoder_hidden_states=ctx,
                   id_call=call(id_tokens=tokens, adain_cross=True, style_strength=style, mixing=False))
    torch.testing.assert_close(outside, off, atol=0, rtol=0)  # outside the mixing window: no AdaIN
    alone = IDCall(id_rows=torch.arange(4), id_tokens=torch.randn(4, 3, CROSS), adain_cross=True)
    plain = IDCall(id_rows=torch.arange(4), id_tokens=alone.id_tokens)
    torch.testing.assert_close(attn(hs, encoder_hidden_states=ctx, id_call=alone),
                               attn(hs, encoder_hidden_states=ctx, id_call=plain), atol=0, rtol=0)  # no text stream


def test_adain_cross_is_on_by_default_in_infinite_id_and_never_in_the_adapter(pipe, identity):
    default = generate(pipe, id_embeds=identity)
    off = generate(pipe, id_embeds=identity, adain_cross=False)
    assert (default.images - off.images).abs().max() > 1e-2
    torch.testing.assert_close(default.text_images, off.text_images, atol=0, rtol=0)
    on = generate(pipe, method="adapter", id_embeds=identity, adain_cross=True).images
    torch.testing.assert_close(on, generate(pipe, method="adapter", id_embeds=identity, adain_cross=False).images,
                               atol=0, rtol=0)
    # An empty mixing window: no step mixes, so AdaIN-cross never acts either.
    window = dict(id_embeds=identity, mix_window=(0.0, 0.0))
    torch.testing.assert_close(generate(pipe, adain_cross=True, **window).images,
                               generate(pipe, adain_cross=False, **window).images, atol=0, rtol=0)


# --- loading, bad input ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipeline(seed=3, face_analyzer=None)


def write(tmp_path, tiny, kind="faceid-plusv2", name=None, change=None, **spec_kwargs):
    hidden = [p.to_k_ip.out_features for p in id_adapter_layers(tiny.unet).values()]
    flat = random_tensors(adapter_spec(kind, hidden, **spec_kwargs), seed=2)
    if change:
        change(flat)
    path = tmp_path / (name or f"{kind}.bin")
    torch.save(nested(flat), path)
    return path


def test_faceid_file_without_lora_runs_with_lora_scale_ignored_and_says_so_once(tiny, tmp_path, caplog):
    path = write(tmp_path, tiny, name="faceid-no-lora.bin", lora_rank_=None)
    with caplog.at_level(logging.WARNING, logger="infinite_id.adapters.convert"):
        info = load_adapter(tiny, path)
    said = [r for r in caplog.records if "has no LoRA keys, so lora_scale is ignored" in r.getMessage()]
    assert len(said) == 1 and "faceid-no-lora.bin" in said[0].getMessage() and info["lora"] == "none"
    who = random_identity(1)
    a = generate(tiny, id_embeds=who, lora_scale=0.0, num_inference_steps=1).images
    b = generate(tiny, id_embeds=who, lora_scale=1.5, num_inference_steps=1).images
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("change,message", [
    (lambda s: s.__setitem__("ip_adapter.2.to_k_lora.down.weight", torch.zeros(4, 48)),
     r"2\.to_k_lora\.down\.weight is \(4, 48\), this UNet's layer needs \(4, 64\)"),
    (lambda s: s.pop("ip_adapter.5.to_out_lora.up.weight"), r"it has no 5\.to_out_lora\.up\.weight"),
    (lambda s: s.__setitem__("ip_adapter.99.to_q_lora.down.weight", torch.zeros(4, 32)),
     r"it has 99\.to_q_lora\.down\.weight, which no attention layer of this UNet takes"),
])
def test_a_lora_that_does_not_fit_is_refused_naming_the_first_mismatch(tiny, tmp_path, change, message):
    load_adapter(tiny, write(tmp_path, tiny, name="good.bin"))
    before_encoder, before_lora = tiny.id_encoder, id_lora_state_dict(tiny.unet)
    with pytest.raises(ValueError, match=r"The LoRA in bad\.bin does not match this UNet's attention layers: " + message):
        load_adapter(tiny, write(tmp_path, tiny, name="bad.bin", change=change))
    assert tiny.id_encoder is before_encoder  # nothing changed
    assert all(torch.equal(v, before_lora[k]) for k, v in id_lora_state_dict(tiny.unet).items())


@pytest.mark.parametrize("bad", [-0.1, 2.5, float("nan")])
def test_lora_scale_outside_0_to_2_is_refused(pipe, identity, bad):
    with pytest.raises(ValueError, match="lora_scale must be between 0 and 2"):
        generate(pipe, id_embeds=identity, lora_scale=bad)


def test_loading_an_adapter_without_lora_removes_the_previous_lora(tiny, tmp_path):
    load_adapter(tiny, write(tmp_path, tiny))
    assert lora_rank(tiny.unet) == 4
    load_adapter(tiny, write(tmp_path, tiny, kind="plus-face"))
    assert lora_rank(tiny.unet) is None and not id_lora_state_dict(tiny.unet)


def test_native_checkpoint_carries_the_identity_lora(tmp_path):
    src = tiny_pipeline(seed=1, face_analyzer=None)
    load_adapter(src, write(tmp_path, src))  # a LoRA on the processors (the native encoder is put back below)
    native = tiny_pipeline(seed=2, face_analyzer=None)
    src.register_modules(id_encoder=native.id_encoder)
    path = save_checkpoint(src, tmp_path / "native.safetensors")
    dst = tiny_pipeline(seed=1, face_analyzer=None)  # the same base UNet; the identity branch comes from the file
    metadata = load_checkpoint(dst, path)
    assert metadata["lora_rank"] == "4" and lora_rank(dst.unet) == 4
    theirs, mine = id_lora_state_dict(src.unet), id_lora_state_dict(dst.unet)
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    who = random_identity(3)
    torch.testing.assert_close(generate(dst, id_embeds=who, num_inference_steps=1).images,
                               generate(src, id_embeds=who, num_inference_steps=1).images, atol=1e-5, rtol=0)
    # A checkpoint without a LoRA takes the LoRA off again; one whose metadata lies about it is refused.
    plain = tiny_pipeline(seed=6, face_analyzer=None)
    load_checkpoint(dst, save_checkpoint(plain, tmp_path / "plain.safetensors"))
    assert lora_rank(dst.unet) is None
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(tmp_path / "lying.safetensors"),
              metadata={**metadata, "lora_rank": "8"})
    with pytest.raises(ValueError, match="mis-shaped keys"):
        load_checkpoint(dst, tmp_path / "lying.safetensors")


def test_fast_mode_lora_fuses_into_the_unet_and_leaves_the_identity_lora_alone(tmp_path):
    from test_weights import tiny_lora

    from infinite_id.method.attention import check_installed
    from infinite_id.models.fast import apply_fast_mode

    pipe = tiny_pipeline(seed=3, face_analyzer=None)
    load_adapter(pipe, write(tmp_path, pipe))
    before = {k: v.clone() for k, v in id_lora_state_dict(pipe.unet).items()}
    apply_fast_mode(pipe, "hyper-sd", tiny_lora(pipe))  # diffusers' PEFT loading, fused, unloaded
    check_installed(pipe.unet)
    after = id_lora_state_dict(pipe.unet)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
