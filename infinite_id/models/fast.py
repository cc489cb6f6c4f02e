"""Fast mode: a step-distilled LoRA on the UNet, the scheduler it was distilled for, and the defaults it implies.

The LoRA is fused into the UNet, so both streams (text and identity) run the distilled model: the method's
identities (DESIGN 2.5) still hold because both streams share one UNet. The app and the CLI read the defaults
(steps, guidance) from ``sampling_defaults(mode)`` so the sliders start where the mode works.

* ``hyper-sd`` (default fast mode): ByteDance Hyper-SDXL 8-step **CFG-preserving** LoRA, DDIM with trailing
  timesteps, 8 steps, guidance 5 (the authors recommend 5 to 8). It keeps classifier-free guidance, so negative
  prompts and the null identity still act: the closest to the full method.
* ``lightning``: ByteDance SDXL-Lightning 8-step LoRA, Euler with trailing timesteps, 8 steps, no CFG (guidance 1
  here, i.e. 0 in diffusers' convention). Faster per step (batch 2 instead of 4) but the negative prompt and the
  null identity do nothing.

LCM-LoRA is deliberately not offered: LCMScheduler injects fresh noise at every step from a generator the
pipeline does not pass to ``scheduler.step``, so a seed would no longer fix the image and the two streams would
not share their noise.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import DDIMScheduler, EulerDiscreteScheduler


@dataclass(frozen=True)
class SamplingDefaults:
    """What a sampling mode implies for the call arguments (DESIGN 2.5 sliders start here)."""

    name: str
    num_inference_steps: int
    guidance_scale: float
    note: str = ""


# The paper's sampling: DDIM, 30 steps, CFG 5.0.
STANDARD = SamplingDefaults("standard", 30, 5.0, "DDIM, 30 steps, CFG 5 (the paper's sampling)")


@dataclass(frozen=True)
class FastMode:
    name: str
    repo_id: str
    filename: str
    scheduler: str  # "ddim-trailing" | "euler-trailing"
    lora_scale: float
    defaults: SamplingDefaults
    licence: str


FAST_MODES: dict[str, FastMode] = {
    "hyper-sd": FastMode(
        "hyper-sd", "ByteDance/Hyper-SD", "Hyper-SDXL-8steps-CFG-lora.safetensors", "ddim-trailing", 1.0,
        SamplingDefaults("hyper-sd", 8, 5.0, "Hyper-SDXL 8-step CFG LoRA, DDIM trailing"), "OpenRAIL++-M",
    ),
    "lightning": FastMode(
        "lightning", "ByteDance/SDXL-Lightning", "sdxl_lightning_8step_lora.safetensors", "euler-trailing", 1.0,
        SamplingDefaults("lightning", 8, 1.0, "SDXL-Lightning 8-step LoRA, Euler trailing, no CFG"), "OpenRAIL++-M",
    ),
}
DEFAULT_FAST_MODE = "hyper-sd"


def fast_mode(name: str | None) -> FastMode | None:
    """The fast mode called ``name`` (None, "", "off" or "none": no fast mode; "on": the default one)."""
    if name is None or str(name).lower() in ("", "off", "none", "false", "0"):
        return None
    key = DEFAULT_FAST_MODE if str(name).lower() in ("on", "true", "1", "fast") else str(name).lower()
    if key not in FAST_MODES:
        raise ValueError(f"Unknown fast mode {name!r}; choose one of {', '.join(FAST_MODES)} (or off).")
    return FAST_MODES[key]


def sampling_defaults(name: str | None = None) -> SamplingDefaults:
    mode = fast_mode(name)
    return STANDARD if mode is None else mode.defaults


def scheduler_for(mode: FastMode | None, base_config):
    """The scheduler a mode needs, built from the base model's scheduler config (betas and so on)."""
    if mode is None:
        return DDIMScheduler.from_config(base_config)  # the paper samples with DDIM
    if mode.scheduler == "ddim-trailing":
        return DDIMScheduler.from_config(base_config, timestep_spacing="trailing")
    if mode.scheduler == "euler-trailing":
        return EulerDiscreteScheduler.from_config(base_config, timestep_spacing="trailing")
    raise ValueError(f"Unknown scheduler {mode.scheduler!r}")


def apply_fast_mode(pipe, mode: FastMode | str, lora) -> SamplingDefaults:
    """Fuse the mode's LoRA (a path or a state dict) into ``pipe``'s UNet and set its scheduler.

    Load-time only: it changes shared modules, so never call it while the pipeline serves requests.
    """
    from ..adapters.lora import apply_unet_lora

    chosen = fast_mode(mode) if isinstance(mode, str) else mode
    if chosen is None:
        raise ValueError("apply_fast_mode needs a fast mode; got none.")
    apply_unet_lora(pipe, lora, f"fast-{chosen.name}", chosen.lora_scale)
    pipe.scheduler = scheduler_for(chosen, pipe.scheduler.config)
    return chosen.defaults
