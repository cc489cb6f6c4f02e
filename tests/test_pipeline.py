"""The method's identities (DESIGN 2.5) and the call contract (DESIGN 4) on the tiny real pipeline."""

import pytest
import torch
from conftest import generate, random_identity
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from infinite_id.method.attention import MixedSelfAttnProcessor

# Latent tolerance for comparisons across different batch layouts (batch 2 vs batch 4 through the same convs):
# float32 reductions differ in their last bits, nothing more. Real differences in these tests are > 1e-1.
TOL = 1e-3


def close(a, b, tol=TOL):
    return (a - b).abs().max().item() <= tol


def test_neutral_knobs_make_infinite_id_equal_the_adapter_baseline(pipe, identity):
    adapter = generate(pipe, method="adapter", id_embeds=identity).images
    inf = generate(pipe, method="infinite-id", id_embeds=identity, semantic_scale=0, style_strength=0).images
    assert close(inf, adapter), (inf - adapter).abs().max()
    # ...and with mixing on it is not the baseline (the test can fail).
    assert not close(generate(pipe, method="infinite-id", id_embeds=identity).images, adapter, 0.05)


def test_zero_identity_makes_every_method_plain_sdxl(pipe, identity):
    text = generate(pipe, method="text").images
    out = generate(pipe, method="infinite-id", id_embeds=identity, id_scale=0, semantic_scale=0, style_strength=0)
    assert close(out.images, out.text_images), (out.images - out.text_images).abs().max()
    assert close(out.text_images, text)
    assert close(generate(pipe, method="adapter", id_embeds=identity, id_scale=0).images, text)


def test_text_stream_is_untouched_by_identity(pipe, identity):
    a = generate(pipe, id_embeds=identity)
    b = generate(pipe, id_embeds=random_identity(7), id_scale=1.4, semantic_scale=2.0, style_strength=0.3)
    torch.testing.assert_close(a.text_images, b.text_images, atol=0, rtol=0)
    assert not close(a.images, b.images, 0.05)
    # The text stream is exactly what plain SDXL makes for the same seed.
    assert close(a.text_images, generate(pipe, method="text").images)


@pytest.mark.parametrize(
    "knob",
    [{"id_scale": 0.5}, {"semantic_scale": 2.0}, {"style_strength": 0.5}, {"mix_window": (0.0, 0.5)},
     {"mix_layers": ("up_blocks",)}, {"adain_cross": False}],  # AdaIN-cross is on by default (issue 14)
)
def test_each_knob_changes_the_identity_stream(pipe, identity, knob):
    base = generate(pipe, id_embeds=identity)
    moved = generate(pipe, id_embeds=identity, **knob)
    assert not close(base.images, moved.images, 1e-2), knob
    torch.testing.assert_close(base.text_images, moved.text_images, atol=0, rtol=0)


def test_different_identities_give_different_images(pipe):
    a = generate(pipe, method="adapter", id_embeds=random_identity(1)).images
    b = generate(pipe, method="adapter", id_embeds=random_identity(2)).images
    assert not close(a, b, 0.05)


def test_processors_are_the_same_objects_after_a_call_and_after_a_failing_call(pipe, identity):
    before = dict(pipe.unet.attn_processors)
    generate(pipe, id_embeds=identity)

    def boom(*_):
        raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected"):
        generate(pipe, id_embeds=identity, callback_on_step_end=boom)
    after = pipe.unet.attn_processors
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before)
    assert sum(isinstance(p, MixedSelfAttnProcessor) for p in after.values()) == len(after) // 2


def test_seed_determinism_and_batches(pipe, identity):
    a, b = generate(pipe, seed=3, id_embeds=identity), generate(pipe, seed=3, id_embeds=identity)
    torch.testing.assert_close(a.images, b.images, atol=0, rtol=0)
    c = generate(pipe, seed=4, id_embeds=identity)
    assert not close(a.images, c.images, 0.05)
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    pair = generate(pipe, id_embeds=identity, num_images_per_prompt=2, generator=gens)
    assert pair.images.shape[0] == 2 and pair.text_images.shape[0] == 2
    assert close(pair.images[0], a.images[0]) and close(pair.images[1], c.images[0])
    assert close(pair.text_images[1], c.text_images[0])


def test_prompt_lists_and_negative_prompts(pipe, identity):
    out = generate(pipe, prompt=["a man", "a woman"], id_embeds=identity, negative_prompt=["blurry", "low quality"])
    assert out.images.shape[0] == 2
    plain = generate(pipe, id_embeds=identity)
    neg = generate(pipe, id_embeds=identity, negative_prompt="blurry, cartoon")
    assert not close(plain.images, neg.images, 1e-2)


def test_pil_output_and_no_cfg(pipe, identity):
    out = generate(pipe, id_embeds=identity, output_type="pil")
    assert out.images[0].size == (64, 64) and out.text_images[0].mode == "RGB"
    no_cfg = generate(pipe, id_embeds=identity, guidance_scale=1.0)
    assert no_cfg.images.shape == (1, 4, 32, 32)
    assert not close(no_cfg.images, generate(pipe, id_embeds=identity).images, 1e-2)


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_other_diffusers_schedulers_keep_the_identities(identity, scheduler_cls):
    from infinite_id.testing import tiny_pipeline

    p = tiny_pipeline()
    p.scheduler = scheduler_cls.from_config(p.scheduler.config)
    out = generate(p, id_embeds=identity, id_scale=0, semantic_scale=0, style_strength=0)
    assert close(out.images, out.text_images)
    assert close(out.text_images, generate(p, method="text").images)


def test_callback_sees_every_step_and_can_edit_latents(pipe, identity):
    seen = []

    def cb(p, i, t, kwargs):
        seen.append((i, tuple(kwargs["latents"].shape), tuple(kwargs["text_latents"].shape)))
        return {"latents": kwargs["latents"] * 0} if i == 3 else {}

    out = generate(pipe, id_embeds=identity, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents", "text_latents"])
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert out.images.abs().max() == 0 and out.text_images.abs().max() > 0

    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):  # a name the loop never fills
        generate(pipe, id_embeds=identity, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["noise"])

def test_shared_scheduler_is_never_stepped(pipe, identity):
    before = (pipe.scheduler.num_inference_steps, pipe.scheduler.timesteps.clone())
    generate(pipe, id_embeds=identity, num_inference_steps=3)
    assert pipe.scheduler.num_inference_steps == before[0]
    torch.testing.assert_close(pipe.scheduler.timesteps, before[1], atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"method": "dreambooth"}, "method must be one of"), ({"id_scale": -1}, "id_scale must be"),
     ({"semantic_scale": float("nan")}, "semantic_scale must be"), ({"mix_window": (0.6, 0.2)}, "mix_window"),
     ({"height": 60}, "multiples of 8"), ({"id_embeds": None}, "needs the person's photo")],
)
def test_bad_arguments_are_clear_errors(pipe, identity, kwargs, message):
    kwargs.setdefault("id_embeds", identity)
    with pytest.raises(ValueError, match=message):
        generate(pipe, **kwargs)


def test_id_image_without_face_analyzer_says_what_to_do():
    from PIL import Image

    from infinite_id.testing import tiny_pipeline

    with pytest.raises(ValueError, match="no face analyzer"):
        generate(tiny_pipeline(face_analyzer=None), id_image=Image.new("RGB", (128, 128)))


def test_id_image_goes_through_the_face_stack_like_the_real_pipeline(pipe):
    from infinite_id.faces.analyzer import NoFaceError
    from infinite_id.faces.tiny_pack import synthetic_face_photo

    photo_a = synthetic_face_photo(256, faces=[(128, 120, 60, 0)])
    photo_b = synthetic_face_photo(256, faces=[(128, 120, 60, 3)])
    a = generate(pipe, id_image=photo_a)
    # The same photo through precomputed features gives the same image (encoding once, reusing it, is exact).
    feats = pipe.encode_identity(photo_a)
    assert feats.face.shape == (1, 512) and feats.clip.shape == (1, 17, 32)
    torch.testing.assert_close(generate(pipe, id_embeds=feats).images, a.images, atol=0, rtol=0)
    assert not close(generate(pipe, id_image=photo_b).images, a.images, 1e-2)
    # Two photos of the same person are averaged; a list of one equals the photo itself.
    torch.testing.assert_close(generate(pipe, id_image=[photo_a]).images, a.images, atol=0, rtol=0)
    both = pipe.encode_identity([photo_a, synthetic_face_photo(256, faces=[(120, 130, 70, 0)], seed=2)])
    assert torch.isclose(both.face.norm(), torch.tensor(1.0), atol=1e-5)
    with pytest.raises(NoFaceError, match="No face"):
        generate(pipe, id_image=synthetic_face_photo(256, faces=[]))


def test_precomputed_tokens_and_stacked_people(pipe):
    a, b = random_identity(1), random_identity(2)
    ta, tb = pipe.id_encoder(a), pipe.id_encoder(b)
    via_tokens = generate(pipe, method="adapter", id_embeds=ta).images
    assert close(via_tokens, generate(pipe, method="adapter", id_embeds=a).images, 1e-5)
    two = generate(pipe, method="adapter", id_embeds=torch.cat([ta, tb], dim=1)).images
    assert not close(two, via_tokens, 1e-2)
    with pytest.raises(ValueError, match="not a multiple"):
        generate(pipe, method="adapter", id_embeds=ta[:, :5])


def test_dropping_the_text_stream_after_the_window_does_not_change_the_images(pipe, identity):
    full = generate(pipe, id_embeds=identity, mix_window=(0.0, 0.5))
    skipped = generate(pipe, id_embeds=identity, mix_window=(0.0, 0.5), return_text_images=False)
    assert skipped.text_images is None
    assert close(skipped.images, full.images), (skipped.images - full.images).abs().max()
    # With the whole schedule mixing, nothing can be dropped: the same batch, bit for bit.
    torch.testing.assert_close(
        generate(pipe, id_embeds=identity, return_text_images=False).images, generate(pipe, id_embeds=identity).images,
        atol=0, rtol=0,
    )


def test_cfg_truncation_is_an_option(pipe, identity):
    base = generate(pipe, id_embeds=identity)
    torch.testing.assert_close(generate(pipe, id_embeds=identity, cfg_cutoff=1.0).images, base.images, atol=0, rtol=0)
    cut = generate(pipe, id_embeds=identity, cfg_cutoff=0.5)
    assert not close(cut.images, base.images, 1e-3)
    # Steps without CFG are the conditional rows alone: cutting at 0 is guidance_scale 1.
    assert close(generate(pipe, id_embeds=identity, cfg_cutoff=0.0).images, generate(pipe, id_embeds=identity, guidance_scale=1.0).images)
    assert close(generate(pipe, method="text", cfg_cutoff=0.0).images, generate(pipe, method="text", guidance_scale=1.0).images)
    with pytest.raises(ValueError, match="cfg_cutoff"):
        generate(pipe, id_embeds=identity, cfg_cutoff=2)


def test_identity_keys_and_values_are_projected_once_per_call_and_layout(pipe, identity):
    from infinite_id.method.attention import id_adapter_layers

    proc = next(iter(id_adapter_layers(pipe.unet).values()))
    calls = []
    hook = proc.to_k_ip.register_forward_hook(lambda *_: calls.append(1))
    try:
        generate(pipe, id_embeds=identity, num_inference_steps=4)
        assert len(calls) == 1  # not once per step: the tokens do not change between steps
        calls.clear()
        generate(pipe, id_embeds=identity, num_inference_steps=4, cfg_cutoff=0.5)
        assert len(calls) == 2  # the batch layout changes once (CFG rows dropped), so the rows change once
    finally:
        hook.remove()
