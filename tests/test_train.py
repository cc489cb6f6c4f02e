"""Identity-enhanced training on the tiny engine with a synthetic dataset made here."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import generate

from infinite_id.faces.tiny_pack import synthetic_face_photo
from infinite_id.method.checkpoint import load_checkpoint
from infinite_id.method.id_encoder import IdentityFeatures
from infinite_id.testing import tiny_pipeline
from infinite_id.training.trainer import TrainConfig, Trainer, load_config, main

COLOURS = [(255, 0, 0), (0, 0, 255), (255, 255, 255)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three people, three photos each (different framing), each person against their own colour."""
    root = tmp_path_factory.mktemp("people")
    for person, colour in enumerate(COLOURS):
        folder = root / f"person{person}"
        folder.mkdir()
        for k in range(3):
            photo = synthetic_face_photo(96, faces=[(44 + 3 * k, 46, 27 + 2 * k, person)], seed=k, background=colour)
            photo.save(folder / f"{k}.png")
    (root / "person0" / "broken.jpg").write_bytes(b"not a photo")
    return root


def make_trainer(dataset, out: Path, **overrides) -> Trainer:
    settings = dict(
        data=str(dataset), output_dir=str(out), cache_dir=str(dataset.parent / "cache"), engine="tiny", resolution=32,
        batch_size=4, max_steps=24, learning_rate=3e-3, checkpoint_every=1000, random_flip=True, log_every=1000,
    )
    settings.update(overrides)
    return Trainer(TrainConfig(**settings), pipe=tiny_pipeline(seed=0))


def eval_loss(trainer: Trainer) -> float:
    """Mean loss over fixed batches and fixed noise: comparable before and after training."""
    total = 0.0
    with torch.no_grad():
        for s in range(3):
            batch = trainer.data.batch(50_000 + s, 4, 0, 1, torch.Generator().manual_seed(s), False)
            total += trainer.loss_on(batch, torch.Generator().manual_seed(100 + s)).item()
    return total / 3


def frozen_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainable = {id(p) for p in trainer.model.trainable_parameters()}
    state = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"):
        for key, p in getattr(trainer.pipe, name).named_parameters():
            if id(p) not in trainable:
                state[f"{name}.{key}"] = p.detach().clone()
    return state


def test_training_learns_changes_only_the_identity_branch_and_exports_a_loadable_checkpoint(dataset, tmp_path, identity):
    trainer = make_trainer(dataset, tmp_path)
    assert len(trainer.data) == 18  # 3 people x 3 photos x 2 others; the unreadable file is reported, not fatal
    assert any("broken.jpg" in s["path"] for s in trainer.data.skipped)
    frozen = frozen_state(trainer)
    trainable = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    before = eval_loss(trainer)
    losses = trainer.train(progress=False)
    after = eval_loss(trainer)
    assert len(losses) == 24
    assert after < before * 0.95, (before, after)
    for key, value in frozen_state(trainer).items():
        assert torch.equal(value, frozen[key]), f"frozen tensor {key} changed"
    changed = [not torch.equal(a, b) for a, b in zip(trainable, trainer.model.trainable_parameters())]
    assert all(changed)

    ckpt = trainer.export(tmp_path / "trained.safetensors")
    pipe = tiny_pipeline(seed=0)
    plain = generate(pipe, id_embeds=identity).images
    meta = load_checkpoint(pipe, ckpt)
    assert meta["trained_steps"] == "24"
    assert (generate(pipe, id_embeds=identity).images - plain).abs().max() > 1e-3


def test_prompt_cannot_reach_the_training_forward(dataset, tmp_path):
    trainer = make_trainer(dataset, tmp_path)
    batch = trainer.data.batch(0, 2, 0, 1, torch.Generator().manual_seed(0), False)
    feats = IdentityFeatures(face=batch["face"], clip=batch["clip"])
    x, t, keep = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.ones(2, dtype=torch.bool)
    outs = []
    for prompt in ("a photo of a man", "an oil painting of a red ship at sunset"):
        context, _, _, _ = trainer.pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        outs.append(trainer.model(x, t, feats, keep, context.expand(2, -1, -1), trainer.pooled.expand(2, -1), batch["time_ids"]))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    # ...while the identity does reach it.
    other = IdentityFeatures(face=batch["face"].flip(0), clip=batch["clip"].flip(0))
    moved = trainer.model(x, t, other, keep, context.expand(2, -1, -1), trainer.pooled.expand(2, -1), batch["time_ids"])
    assert not torch.allclose(moved, outs[1], atol=1e-5)


def test_resume_continues_the_same_trajectory(dataset, tmp_path):
    straight = make_trainer(dataset, tmp_path / "a", max_steps=6)
    full = straight.train(progress=False)

    first = make_trainer(dataset, tmp_path / "b", max_steps=6, checkpoint_every=3)
    first.train(max_steps=3, progress=False)
    assert first.latest_checkpoint().name == "step-00000003"
    resumed = make_trainer(dataset, tmp_path / "b", max_steps=6)
    assert resumed.resume() and resumed.step == 3
    rest = resumed.train(progress=False)
    assert rest == pytest.approx(full[3:], abs=1e-6)
    for a, b in zip(straight.model.trainable_parameters(), resumed.model.trainable_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_train_command_and_config_errors(dataset, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(
        f'data = "{dataset}"\noutput_dir = "{tmp_path / "run"}"\ncache_dir = "{dataset.parent / "cache"}"\n'
        'engine = "tiny"\nresolution = 32\nbatch_size = 2\nmax_steps = 2\ncheckpoint_every = 1\nkeep_checkpoints = 1\n'
    )
    assert main(["--config", str(config)]) == 0
    assert (tmp_path / "run" / "infinite-id.safetensors").is_file()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]
    bad = tmp_path / "bad.toml"
    bad.write_text('data = "x"\nlearning_rat = 1.0\n')
    with pytest.raises(ValueError, match="learning_rat"):
        load_config(bad)
    assert main(["--config", str(bad)]) == 2
    shutil.rmtree(tmp_path / "run")


def pretrain_denoiser(trainer: Trainer, steps: int) -> None:
    """Make the tiny UNet a working denoiser of these photos (plain diffusion training, no identity).

    Identity-enhanced training freezes a *trained* SDXL: the identity branch can only refine a UNet that already
    predicts noise from the noisy latent. A random UNet cannot, and no identity signal helps it (the noise is
    independent of the person), so the learning test first trains the tiny base, as SDXL was, then freezes it.
    """
    pipe, unet = trainer.pipe, trainer.pipe.unet
    base = [p for n, p in unet.named_parameters() if "_ip." not in n]
    for p in base:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(base, lr=1e-3)
    n = 8
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        batch = trainer.data.batch(step, n, 0, 1, gen, False)
        with torch.no_grad():
            pixels = batch["pixels"].float() / 127.5 - 1
            latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
        noise, t = torch.randn(latents.shape, generator=gen), torch.randint(0, 1000, (n,), generator=gen)
        pred = unet(
            trainer.noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=trainer.context.expand(n, -1, -1),
            added_cond_kwargs={"text_embeds": trainer.pooled.expand(n, -1), "time_ids": batch["time_ids"]},
        ).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in base:
        p.requires_grad_(False)
        p.grad = None


def identity_loss(trainer: Trainer, wrong: bool) -> float:
    """Mean denoising loss on fixed batches with each pair's own reference, or another person's."""
    others = {"person0": "person1", "person1": "person2", "person2": "person0"}
    first_photo = {}
    for i, photo in enumerate(trainer.data.photos):
        first_photo.setdefault(photo["person"], i)
    total = 0.0
    with torch.no_grad():
        for s in range(6):
            batch = trainer.data.batch(90_000 + s, 6, 0, 1, torch.Generator().manual_seed(s), False)
            features = None
            if wrong:
                idx = trainer.data.pair_indices(90_000 + s, 6, 0, 1)
                persons = [trainer.data.photos[trainer.data.pairs[i][0]]["person"] for i in idx]
                refs = [first_photo[others[p]] for p in persons]
                features = IdentityFeatures(
                    face=torch.stack([trainer.data._row(r, "face") for r in refs]),
                    clip=torch.stack([trainer.data._row(r, "clip").float() for r in refs]),
                )
            total += trainer.loss_on(batch, torch.Generator().manual_seed(100 + s), features=features).item()
    return total / 6


def test_trained_identity_branch_uses_the_identity(dataset, tmp_path):
    """Would fail if identity conditioning were broken: after training, the right person's features denoise
    their photos clearly better than another person's (before training the two are equal)."""
    trainer = make_trainer(dataset, tmp_path, batch_size=8, max_steps=200, id_dropout=0.0, random_flip=False)
    pretrain_denoiser(trainer, steps=250)
    right, wrong = identity_loss(trainer, False), identity_loss(trainer, True)
    assert abs(right - wrong) < 0.03 * wrong, (right, wrong)
    trainer.train(progress=False)
    right, wrong = identity_loss(trainer, False), identity_loss(trainer, True)
    print(f"learning test: loss with the right identity {right:.4f}, with a wrong one {wrong:.4f}")
    assert right < 0.95 * wrong, (right, wrong)
