"""Identity-enhanced training (DESIGN 2.3): native Infinite-ID checkpoints from photos of people.

SDXL stays frozen. The FaceMapper, the CLIPMapper and every image K/V projection learn to reconstruct a *different*
photo of the same person from the reference face's features, with the text branch of cross-attention switched off
(no prompt reaches the UNet's cross-attention), so the identity stream learns identity alone.

    python -m infinite_id train --config train.toml
    accelerate launch -m infinite_id.training --config train.toml      # several GPUs / nodes (see docs/training.md)

Every random draw of a step (which pairs, flips, noise, timesteps, identity dropout) comes from a generator seeded
by (seed, step, process), so a resumed run continues the exact trajectory of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..method.attention import IDCall, id_adapter_layers
from ..method.id_encoder import IdentityFeatures, InfiniteIDEncoder
from .data import CachedPairs, preprocess


@dataclass
class TrainConfig:
    data: str  # root/<person>/*.jpg, or a JSONL manifest of {"reference": ..., "target": ...}
    output_dir: str = "runs/infinite-id"
    cache_dir: str | None = None  # default: <output_dir>/cache
    engine: str = "real"  # "tiny": the offline tiny engine (smoke tests); "real": SDXL from the hub or disk
    resolution: int = 1024
    batch_size: int = 4
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    lr_warmup_steps: int = 0
    max_steps: int = 10_000  # optimizer steps
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    gradient_checkpointing: bool = False
    id_dropout: float = 0.05  # drop c_id to the null identity so CFG has an unconditional identity
    random_flip: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: bool = True
    seed: int = 0
    ema_decay: float | None = None  # e.g. 0.999; the exported checkpoint then holds the EMA weights
    init_from: str | None = None  # a native checkpoint to start from
    log_every: int = 10
    encoder: dict = field(default_factory=dict)  # InfiniteIDEncoder overrides (face_tokens, face_hidden_dim, ...)
    # The face recognizer whose embeddings the checkpoint learns from: an insightface pack ("buffalo_l",
    # "antelopev2") or "auraface" (Apache-2.0), which trains with the licence-clean setup (MTCNN, no
    # non-commercial model) and gives a checkpoint the licence-clean mode loads. Recorded in the checkpoint.
    recognizer: str = "buffalo_l"

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"


def load_config(path: str | Path, **overrides) -> TrainConfig:
    """A TrainConfig from a TOML or JSON file; unknown keys are an error naming them."""
    path = Path(path)
    raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"Unknown training settings in {path.name}: {', '.join(unknown)}.")
    return TrainConfig(**raw)


class IdentityBranch(nn.Module):
    """The frozen UNet with the trainable identity branch; ``forward`` is the training-mode denoiser."""

    def __init__(self, unet: nn.Module, encoder: InfiniteIDEncoder):
        super().__init__()
        self.unet, self.encoder = unet, encoder

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.encoder.parameters())
        for proc in id_adapter_layers(self.unet).values():
            params += [proc.to_k_ip.weight, proc.to_v_ip.weight]
        return params

    def forward(self, noisy, timesteps, features: IdentityFeatures, keep: torch.Tensor, context, pooled, time_ids):
        tokens = self.encoder(features)
        null = self.encoder.null_tokens(tokens.shape[0]).to(tokens.dtype)
        tokens = torch.where(keep[:, None, None], tokens, null)
        rows = torch.arange(noisy.shape[0], device=noisy.device)
        call = IDCall(id_rows=rows, id_tokens=tokens, text_branch=False)
        return self.unet(
            noisy, timesteps, encoder_hidden_states=context, cross_attention_kwargs={"id_call": call},
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False,
        )[0]


def build_engine(config: TrainConfig):
    """The pipeline whose components training uses (UNet, VAE, text encoders, CLIP image tower, face analyzer)."""
    if config.engine == "tiny":
        from ..testing import tiny_face_analyzer, tiny_pipeline

        return tiny_pipeline(seed=config.seed, face_analyzer=tiny_face_analyzer())
    from ..config import SETTINGS
    from ..models.licences import CLEAN_PACK
    from ..models.loading import load_pipeline

    if config.recognizer == CLEAN_PACK:
        return load_pipeline(dtype=torch.float32, models=dataclasses.replace(SETTINGS.models, license_clean=True))
    return load_pipeline(dtype=torch.float32, adapter=None, face_pack=config.recognizer)


def recognizer_record(config: TrainConfig) -> str:
    """What the checkpoint says its face embeddings came from (the licence-clean mode reads it)."""
    return "tiny random recognizer" if config.engine == "tiny" else config.recognizer


def new_encoder(pipe, config: TrainConfig) -> InfiniteIDEncoder:
    vision = pipe.image_encoder.config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    sizes = {"clip_dim": vision.hidden_size, "clip_tokens": tokens, "cross_attention_dim": pipe.unet.config.cross_attention_dim}
    return InfiniteIDEncoder(**{**sizes, **config.encoder})


def empty_prompt(pipe, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings and pooled embedding of the empty prompt, computed once.

    The cross-attention text branch is off in training, so only the pooled embedding (an SDXL added condition)
    reaches the UNet; we use the real encoding of "" rather than zeros (recorded in the checkpoint metadata).
    """
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("", device=device, do_classifier_free_guidance=False)
    return embeds, pooled


class Trainer:
    """One training run: model, optimizer, data and the step function, under accelerate."""

    def __init__(self, config: TrainConfig, pipe=None, accelerator=None):
        from accelerate import Accelerator
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        self.config = config
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=_tensorboard_or_none(),
            project_dir=config.output_dir,
        )
        acc = self.accelerator
        self.pipe = pipe if pipe is not None else build_engine(config)
        pipe = self.pipe
        device = acc.device
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        cache = preprocess(config.data, config.cache, pipe, config.resolution, show_progress=acc.is_main_process)
        self.data = CachedPairs(cache, seed=config.seed)

        encoder = new_encoder(pipe, config)
        if config.init_from:
            from ..method.checkpoint import load_checkpoint

            # load_checkpoint rebuilds the encoder from the file's metadata and hands it to register_modules.
            holder = SimpleNamespace(unet=pipe.unet)
            holder.register_modules = lambda id_encoder: setattr(holder, "id_encoder", id_encoder)
            load_checkpoint(holder, config.init_from)
            encoder = holder.id_encoder
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
        unet, vae = pipe.unet, pipe.vae
        unet.requires_grad_(False)
        vae.requires_grad_(False)
        unet.to(device, weight_dtype)
        vae.to(device, torch.float32)  # the SDXL VAE overflows in fp16; encoding targets is cheap next to the UNet
        self.model = IdentityBranch(unet, encoder.to(device))
        trainable = self.model.trainable_parameters()
        for p in trainable:
            p.data = p.data.float()  # trainable weights stay fp32 under mixed precision
            p.requires_grad_(True)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.context, self.pooled = empty_prompt(pipe, device)
        self.context, self.pooled = self.context.to(weight_dtype), self.pooled.to(weight_dtype)
        self.weight_dtype = weight_dtype

        self.optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup", self.optimizer, num_warmup_steps=config.lr_warmup_steps
        )
        self.model, self.optimizer, self.lr_scheduler = acc.prepare(self.model, self.optimizer, self.lr_scheduler)
        self.ema = None
        if config.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(trainable, decay=config.ema_decay)
        self.step = 0  # optimizer steps done
        if acc.is_main_process and acc.log_with:
            acc.init_trackers("infinite-id", config=_flat(config))

    # ---------------------------------------------------------------- one step
    def _generator(self, micro_step: int) -> torch.Generator:
        seed = (self.config.seed * 1_000_003 + micro_step) * 1009 + self.accelerator.process_index
        return torch.Generator().manual_seed(seed)

    def loss_on(
        self, batch: dict, gen: torch.Generator, features: IdentityFeatures | None = None, t_min: int = 0
    ) -> torch.Tensor:
        """Denoising loss of a batch. ``features`` overrides the batch's own identity and ``t_min`` restricts the
        timesteps (both for evaluation, e.g. the learning test's right-vs-wrong identity comparison)."""
        acc, device = self.accelerator, self.accelerator.device
        pixels = batch["pixels"].to(device, torch.float32) / 127.5 - 1.0
        with torch.no_grad():
            latents = self.pipe.vae.encode(pixels).latent_dist.sample(generator=gen)
            latents = (latents * self.pipe.vae.config.scaling_factor).to(self.weight_dtype).contiguous()
        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        t = torch.randint(t_min, self.noise_scheduler.config.num_train_timesteps, (n,), generator=gen).to(device)
        keep = (torch.rand(n, generator=gen) >= self.config.id_dropout).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        feats = features or IdentityFeatures(face=batch["face"], clip=batch["clip"])
        feats = feats.to(device)
        time_ids = batch["time_ids"].to(device, self.weight_dtype)
        with acc.autocast():
            pred = self.model(
                noisy, t, feats, keep, self.context.expand(n, -1, -1), self.pooled.expand(n, -1), time_ids
            )
        return F.mse_loss(pred.float(), target.float())

    def train(self, max_steps: int | None = None, progress: bool = True) -> list[float]:
        """Run until ``max_steps`` optimizer steps are done; returns the loss of each optimizer step."""
        from tqdm.auto import tqdm

        acc, config = self.accelerator, self.config
        max_steps = max_steps or config.max_steps
        losses = []
        bar = tqdm(total=max_steps, initial=self.step, disable=not (progress and acc.is_local_main_process), desc="train")
        while self.step < max_steps:
            step_loss = 0.0
            for micro in range(config.gradient_accumulation_steps):
                micro_step = self.step * config.gradient_accumulation_steps + micro
                gen = self._generator(micro_step)
                batch = self.data.batch(micro_step, config.batch_size, acc.process_index, acc.num_processes, gen, config.random_flip)
                with acc.accumulate(self.model):
                    loss = self.loss_on(batch, gen)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(self.model.parameters(), 1.0)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().item() / config.gradient_accumulation_steps
            if self.ema is not None:
                self.ema.step(_unwrap(acc, self.model).trainable_parameters())
            self.step += 1
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if self.step % config.log_every == 0 and acc.log_with:
                acc.log({"loss": step_loss, "lr": self.lr_scheduler.get_last_lr()[0]}, step=self.step)
            if self.step % config.checkpoint_every == 0 or self.step == max_steps:
                self.save()
        bar.close()
        return losses

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoints(self) -> Path:
        return Path(self.config.output_dir) / "checkpoints"

    def save(self) -> Path:
        """Training state (trainable weights, optimizer, LR schedule, EMA, step) and the native checkpoint."""
        acc = self.accelerator
        acc.wait_for_everyone()
        folder = self.checkpoints / f"step-{self.step:08d}"
        if acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            model = _unwrap(acc, self.model)
            state = {
                "trainable": [p.detach().cpu() for p in model.trainable_parameters()],
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step,
            }
            torch.save(state, folder / "training_state.pt")
            self.export(folder / "infinite-id.safetensors")
            (folder / "done").write_text(str(self.step))  # written last: a folder without it is incomplete
            self._prune()
        acc.wait_for_everyone()
        return folder

    def export(self, path: Path) -> Path:
        """Write the native checkpoint (EMA weights when EMA is on) that loads straight into the app."""
        from ..method.checkpoint import save_checkpoint

        model = _unwrap(self.accelerator, self.model)
        params = model.trainable_parameters()
        if self.ema is not None:
            self.ema.store(params)
            self.ema.copy_to(params)
        try:
            holder = SimpleNamespace(unet=model.unet, id_encoder=model.encoder)
            extra = {"trained_steps": self.step, "empty_prompt": "encoded", "face_recognizer": recognizer_record(
                self.config)}
            return save_checkpoint(holder, path, extra=extra)
        finally:
            if self.ema is not None:
                self.ema.restore(params)

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p.parent for p in self.checkpoints.glob("step-*/done"))
        return done[-1] if done else None

    def resume(self, folder: Path | None = None) -> bool:
        folder = folder or self.latest_checkpoint()
        if folder is None:
            return False
        state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False)
        model = _unwrap(self.accelerator, self.model)
        with torch.no_grad():
            for p, saved in zip(model.trainable_parameters(), state["trainable"], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = state["step"]
        return True

    def _prune(self):
        done = sorted(p.parent for p in self.checkpoints.glob("step-*/done"))
        for old in done[: -self.config.keep_checkpoints]:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def _unwrap(acc, model):
    return acc.unwrap_model(model)


def _tensorboard_or_none():
    try:
        import tensorboard  # noqa: F401

        return "tensorboard"
    except ImportError:
        return None


def _flat(config: TrainConfig) -> dict:
    return {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in dataclasses.asdict(config).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infinite_id train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="TOML or JSON file of TrainConfig settings")
    parser.add_argument("--max-steps", type=int, help="override max_steps")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, max_steps=args.max_steps, output_dir=args.output_dir)
    except (OSError, ValueError, TypeError) as exc:
        print(f"Cannot read the training config: {exc}", file=sys.stderr)
        return 2
    trainer = Trainer(config)
    if config.resume and not args.no_resume and trainer.resume():
        print(f"Resumed at step {trainer.step}.")
    losses = trainer.train()
    final = trainer.export(Path(config.output_dir) / "infinite-id.safetensors")
    if trainer.accelerator.is_main_process:
        tail = losses[-min(len(losses), 50):] or [math.nan]
        print(f"Saved {final} (mean loss of the last {len(tail)} steps: {sum(tail) / len(tail):.4f}).")
    trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
