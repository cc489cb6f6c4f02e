"""Device and dtype policy, in one place: no other module names an accelerator.

* CUDA: fp16 (with the fp16-fix VAE); bf16 when asked for and the GPU supports it.
* MPS: fp16 with the fp16-fix VAE (bf16 support on MPS depends on the macOS version).
* CPU: bf16 when the CPU computes it natively (AVX512-BF16 / AMX on x86, the BF16 extension on ARM), else fp32.
  fp16 on CPU is slow and partly unsupported, so a request for it falls back to the CPU default.

Requests come from arguments, else ``INFINITE_ID_DEVICE`` / ``INFINITE_ID_DTYPE``, else the rules above.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ACCELERATOR = "cuda"  # the only place this name is written
DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


@dataclass(frozen=True)
class DevicePlan:
    """Where the model runs and in which precision; ``reason`` says why, for the start-up log."""

    device: torch.device
    dtype: torch.dtype
    reason: str

    @property
    def needs_fixed_vae(self) -> bool:
        """The original SDXL VAE overflows in fp16; the fp16-fix VAE does not."""
        return self.dtype == torch.float16

    @property
    def is_accelerator(self) -> bool:
        return self.device.type != "cpu"


def accelerator_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (otherwise bf16 is emulated and slower than fp32)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = set(cpuinfo.read_text(errors="ignore").replace("\t", " ").split())
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return True  # Apple M2 and later have BF16; M1 emulates it, still no slower than fp32 in torch
    return False


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """The requested device, else ``INFINITE_ID_DEVICE``, else the accelerator, else MPS, else CPU."""
    requested = requested if requested is not None else (os.environ.get("INFINITE_ID_DEVICE") or None)
    if requested is not None and str(requested) != "auto":
        device = torch.device(requested)
        if device.type == ACCELERATOR and not accelerator_available():
            raise ValueError(f"Device {requested!r} was asked for, but no CUDA GPU is available here.")
        if device.type == "mps" and not mps_available():
            raise ValueError("Device 'mps' was asked for, but MPS is not available here.")
        return device
    if accelerator_available():
        return torch.device(ACCELERATOR)
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {value!r}; use one of fp16, bf16, fp32 (or auto).")
    return DTYPES[key]


def pick_dtype(device: torch.device, requested: str | torch.dtype | None = None) -> tuple[torch.dtype, str]:
    """The dtype for ``device`` under the policy above, and the reason."""
    asked = parse_dtype(requested if requested is not None else (os.environ.get("INFINITE_ID_DTYPE") or None))
    if device.type == ACCELERATOR:
        if asked == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return torch.float16, "bf16 was asked for but this GPU does not support it: fp16"
        if asked is not None:
            return asked, f"{_name(asked)} as asked"
        return torch.float16, "GPU: fp16 with the fp16-fix VAE"
    if device.type == "mps":
        if asked is not None and asked != torch.bfloat16:
            return asked, f"{_name(asked)} as asked"
        return torch.float16, "MPS: fp16 with the fp16-fix VAE"
    native = cpu_has_native_bf16()
    default = torch.bfloat16 if native else torch.float32
    if asked == torch.float16:
        return default, f"fp16 is not supported well on CPU: {_name(default)}"
    if asked is not None:
        return asked, f"{_name(asked)} as asked"
    return default, "CPU with native bf16: bf16" if native else "CPU without native bf16: fp32"


def plan(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> DevicePlan:
    """Resolve device and dtype together (arguments, then environment, then the policy)."""
    chosen = pick_device(device)
    chosen_dtype, reason = pick_dtype(chosen, dtype)
    return DevicePlan(chosen, chosen_dtype, f"{chosen.type}: {reason}")


def empty_cache(device: torch.device) -> None:
    """Release cached accelerator memory (after an out-of-memory error, for example)."""
    if device.type == ACCELERATOR:
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def free_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of the accelerator ``device`` now, or None where that cannot be known (CPU, MPS)."""
    if device.type != ACCELERATOR or not accelerator_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def accelerator_name(device: torch.device) -> str:
    """The accelerator's product name (for logs and benchmark tables); the device itself elsewhere."""
    if device.type == ACCELERATOR and accelerator_available():
        return torch.cuda.get_device_name(device)
    return str(device)


def _name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
