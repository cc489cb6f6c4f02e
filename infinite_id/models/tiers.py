"""VRAM tiers: one documented set of memory options per GPU size, for SDXL at 1024², 30 steps (DESIGN 6).

``--vram-tier auto`` (the default) picks the largest tier the accelerator's free memory holds at start-up;
``24``, ``16``, ``12``, ``8`` or ``6`` name one. An explicit ``--memory-mode`` overrides the tier's placement.
On a CPU (or MPS, whose free memory torch cannot report) no tier applies.

| tier | placement | VAE | UNet weights | faithful 1024² peak allocated (GB) |
| --- | --- | --- | --- | --- |
| 24 | all resident | as is | fp16 | 11.6 estimated with the CLIP tower (10.37 measured on an H200 without it) |
| 16 | all resident | slicing | fp16 | the same for one image; slicing bounds the decode of several |
| 12 | all resident | slicing | fp16 | the same: under 12 GiB (12.9 GB), with room for the CUDA context |
| 8 | model offload | slicing + tiling | fp16 | 7.6 estimated |
| 6 | model offload | slicing + tiling | int8 weight-only (torchao) | 5.1 estimated; without torchao, sequential offload: 2.8 |

Estimates: ``benchmarks/memory.py`` (live tensor bytes on the meta device, calibrated on the H200 run); the method
and the per-phase table are in benchmarks/README.md ("VRAM tiers"). ``benchmarks/gpu.sh`` measures tiers 8 and 6.

Why these options and not others:

* **Offload** (accelerate's hooks, through diffusers): ``model`` keeps one component on the GPU at a time, so the
  peak is the UNet (with our identity K/V projections) plus its activations; ``sequential`` streams every layer's
  weights per step (slow: the whole UNet crosses PCIe at every step) and is only the fallback of tier 6.
* **VAE slicing** decodes the images of one call one by one: exact, and it bounds the decode when a call makes
  several images. **Tiling** only acts above the tile size (SDXL: 1024 px per side), where it is approximate by
  design; at 1024² it changes nothing, so it is only on the tiers that need every byte at larger sizes.
* **UNet int8 weight-only** (torchao ``Int8WeightOnlyConfig`` on every ``nn.Linear`` of the UNet, our processors'
  identity projections included): halves the Linear weights, not exact (per-row scales). Optional: probed once;
  when torchao is missing or cannot run here, tier 6 falls back to sequential offload with one log line.
* **Attention slicing** does not apply: diffusers' ``enable_attention_slicing`` replaces every processor (ours
  included, which the pipeline then refuses), and SDPA / xformers never hold the score matrix anyway.
* **The text-stream skip** (``return_text_images=False`` with a mixing window) changes the method, so no tier
  turns it on; with VAE slicing the faithful call's two decodes have the peak of one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

GIB = 1024**3
TIER_NAMES = ("24", "16", "12", "8", "6")
CHOICES = ("auto", *TIER_NAMES)
MEMORY_MODES = ("none", "model", "sequential")
# A tier is picked when free memory is at least this share of its size: a "12 GB" card reports ~11.5 GiB free
# with a desktop on it, and the estimates in benchmarks/README.md leave the rest for the CUDA context.
FREE_SHARE = 0.9


@dataclass(frozen=True)
class Tier:
    name: str  # "24" ... "6", or "none" (no accelerator: nothing to save)
    memory_mode: str  # none | model | sequential
    vae_slicing: bool = False
    vae_tiling: bool = False
    quantize: str | None = None  # "int8": torchao int8 weight-only on the UNet's Linear layers
    fallback_memory_mode: str | None = None  # placement when ``quantize`` cannot run here
    note: str = ""

    @property
    def exact(self) -> bool:
        """Whether the tier gives the same images as tier 24 (up to float rounding)."""
        return self.quantize is None


TIERS: dict[str, Tier] = {
    "24": Tier("24", "none", note="everything resident"),
    "16": Tier("16", "none", vae_slicing=True, note="everything resident; decodes one image at a time"),
    "12": Tier("12", "none", vae_slicing=True, note="everything resident (no offload); one image decoded at a time"),
    "8": Tier("8", "model", vae_slicing=True, vae_tiling=True, note="one model on the GPU at a time"),
    "6": Tier("6", "model", vae_slicing=True, vae_tiling=True, quantize="int8", fallback_memory_mode="sequential",
              note="one model at a time, UNet Linear weights in int8"),
}
NO_TIER = Tier("none", "none", note="no accelerator: VRAM tiers do not apply")


def pick_tier(free_bytes: int) -> Tier:
    """The largest tier whose size ``free_bytes`` covers (to ``FREE_SHARE``); tier 6 below that."""
    for name in TIER_NAMES:
        if free_bytes >= FREE_SHARE * int(name) * GIB:
            return TIERS[name]
    return TIERS["6"]


def choose(choice: str | None, free: tuple[int, int] | None, memory_mode: str | None = None) -> Tier:
    """The tier for ``choice`` ("auto" or a name), given the accelerator's (free, total) bytes or None without
    one; an explicit ``memory_mode`` replaces the tier's placement (without an accelerator there is nothing to
    offload from: it is checked, then ignored). Logs one line saying which and why."""
    choice = str(choice or "auto").lower().removesuffix("gb")
    if choice not in CHOICES:
        raise ValueError(f"vram_tier must be one of {', '.join(CHOICES)}; got {choice!r}.")
    if memory_mode is not None and memory_mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {', '.join(MEMORY_MODES)}, got {memory_mode!r}.")
    if free is None:
        tier, why = NO_TIER, NO_TIER.note
    elif choice == "auto":
        tier = pick_tier(free[0])
        why = f"auto: {free[0] / GIB:.1f} GiB free of {free[1] / GIB:.1f} GiB"
        if free[0] < FREE_SHARE * 6 * GIB:
            why += ", less than tier 6 is made for: expect out-of-memory errors at 1024²"
    else:
        tier, why = TIERS[choice], "as asked"
    if memory_mode is not None and memory_mode != tier.memory_mode and free is not None:
        tier = dataclasses.replace(tier, memory_mode=memory_mode, note=f"{tier.note}; memory mode {memory_mode} as asked")
    logger.info("VRAM tier %s (%s): %s", tier.name, why, describe(tier))
    return tier


def describe(tier: Tier) -> str:
    parts = [{"none": "no offload", "model": "model CPU offload", "sequential": "sequential CPU offload"}[tier.memory_mode]]
    parts += [name for name, on in (("VAE slicing", tier.vae_slicing), ("VAE tiling", tier.vae_tiling)) if on]
    if tier.quantize:
        parts.append(f"UNet {tier.quantize} weight-only (torchao)")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------- quantization


@functools.cache
def quantizer_problem(device: str, dtype: torch.dtype) -> str | None:
    """None when torchao's int8 weight-only quantization runs on ``device`` in ``dtype`` and stays close to the
    dense layer; else why not. Probed once per device and dtype (a tiny real layer), never fatal."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception as exc:  # noqa: BLE001 - missing, or built for another torch
        return f"torchao is not usable ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
    try:
        g = torch.Generator().manual_seed(0)
        layer = torch.nn.Linear(256, 256, bias=False)
        layer.weight.data = torch.randn(256, 256, generator=g) / 16
        layer = layer.to(device, dtype)
        x = torch.randn(4, 256, generator=g).to(device, dtype)
        with torch.no_grad():
            dense = layer(x)
            quantize_(layer, Int8WeightOnlyConfig())
            error = ((layer(x) - dense).float().norm() / dense.float().norm()).item()
    except Exception as exc:  # noqa: BLE001
        return f"torchao int8 weight-only failed on {device} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    if not error < 0.05:  # int8 per-row scales: ~0.5% relative error; more means a broken kernel
        return f"torchao int8 weight-only is off by {error:.1%} on {device}"
    return None


def quantize_unet(unet: torch.nn.Module) -> int:
    """Int8 weight-only on every ``nn.Linear`` of ``unet`` (in place); returns how many layers were converted."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    count = sum(isinstance(m, torch.nn.Linear) for m in unet.modules())
    quantize_(unet, Int8WeightOnlyConfig())
    return count


# ----------------------------------------------------------------------------------------------- applying


def apply(pipe, tier: Tier, device: torch.device) -> Tier:
    """Put ``tier``'s options on ``pipe`` and place it on ``device``; load time only (it changes shared modules).
    Returns the tier as applied (a quantizing tier whose quantizer cannot run falls back, with a log line)."""
    if tier.quantize:
        problem = quantizer_problem(str(device), pipe.unet.dtype)
        if problem is None:
            layers = quantize_unet(pipe.unet)
            logger.info("UNet: %d Linear layers in int8 weight-only (torchao).", layers)
        else:
            fallback = tier.fallback_memory_mode or tier.memory_mode
            logger.info("UNet weights stay %s (%s): %s instead.", pipe.unet.dtype, problem, fallback)
            tier = dataclasses.replace(tier, quantize=None, memory_mode=fallback)
    if tier.vae_slicing:
        pipe.vae.enable_slicing()
    if tier.vae_tiling:
        pipe.vae.enable_tiling()
    place(pipe, tier.memory_mode, device)
    return tier


def place(pipe, memory_mode: str, device: torch.device) -> None:
    """Move ``pipe`` to ``device``, or hand its components to accelerate's offload hooks."""
    if memory_mode == "none":
        pipe.to(device)
        return
    # The ID encoder is small and is called with a dataclass accelerate's hooks cannot move: keep it resident.
    pipe._exclude_from_cpu_offload = [*getattr(pipe, "_exclude_from_cpu_offload", []), "id_encoder"]
    if memory_mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
