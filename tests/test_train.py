"""Identity-enhanced training on the tiny engine with a synthetic dataset made here."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import generate

from infinite_id.id_encoder import IdentityFeatures
from infinite_id.testing import tiny_pipeline
from infinite_id.tiny_face import synthetic_face_photo
from infinite_id.train import TrainConfig, Trainer, load_config, main
from infinite_id.weights import load_checkpoint

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
