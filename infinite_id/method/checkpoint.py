"""The native Infinite-ID checkpoint format (DESIGN 5), saved and loaded strictly.

One safetensors file. Keys: ``image_proj.*`` (the ID encoder's state dict) and ``ip_adapter.{i}.to_k_ip.weight`` /
``ip_adapter.{i}.to_v_ip.weight`` where ``i`` is the layer's position in ``unet.attn_processors`` (the numbering
IP-Adapter files and diffusers' loader use). Optionally an identity-stream LoRA in IP-Adapter-FaceID's key layout:
``ip_adapter.{i}.to_{q,k,v,out}_lora.{down,up}.weight`` on every attention layer ``i``, announced by the metadata
``lora_rank`` (see ``id_lora``). Metadata: format name and version, encoder kind and its constructor arguments,
token counts, the LoRA rank when there is one, and the base model the identity branch was trained on.

Public identity adapters are converted on load by ``infinite_id.adapters.convert`` with the same strictness.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .attention import id_adapter_layers
from .id_encoder import InfiniteIDEncoder
from .id_lora import expected_lora_state, id_lora_state_dict, install_id_lora, lora_rank, remove_id_lora

FORMAT = "infinite-id"
FORMAT_VERSION = "1"
DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


def identity_state_dict(unet, encoder, lora: bool = True) -> dict[str, torch.Tensor]:
    """The identity branch of a pipeline as native checkpoint keys (with its identity LoRA when ``lora`` and one
    is installed)."""
    state = {f"image_proj.{k}": v for k, v in encoder.state_dict().items()}
    for i, proc in id_adapter_layers(unet).items():
        state[f"ip_adapter.{i}.to_k_ip.weight"] = proc.to_k_ip.weight
        state[f"ip_adapter.{i}.to_v_ip.weight"] = proc.to_v_ip.weight
    if lora:
        state.update({f"ip_adapter.{k}": v for k, v in id_lora_state_dict(unet).items()})
    return state


def save_checkpoint(pipe, path: str | Path, base_model: str = DEFAULT_BASE_MODEL, extra: dict | None = None) -> Path:
    """Write the pipeline's identity branch (encoder + per-layer image K/V) as one native safetensors file."""
    encoder = pipe.id_encoder
    if not isinstance(encoder, InfiniteIDEncoder):
        raise ValueError(f"Only native Infinite-ID encoders are saved in this format, not {type(encoder).__name__}.")
    state = {k: v.detach().contiguous().cpu() for k, v in identity_state_dict(pipe.unet, encoder).items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder_kind": encoder.kind,
        "encoder_config": json.dumps(encoder.config_dict(), sort_keys=True),
        "num_tokens": str(encoder.num_tokens),
        "face_tokens": str(encoder.face_mapper.num_tokens),
        "clip_tokens": str(encoder.clip_tokens),
        **({"lora_rank": str(lora_rank(pipe.unet))} if lora_rank(pipe.unet) else {}),
        "base_model": base_model,
        **{k: str(v) for k, v in (extra or {}).items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)  # never leave a half-written checkpoint under the real name
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a native checkpoint, or a ValueError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path.name} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path.name} is not a native Infinite-ID checkpoint (metadata format={metadata.get('format')!r}); "
            "public adapters are loaded with their own converters."
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path.name} has format version {metadata.get('format_version')!r}; this code reads {FORMAT_VERSION}.")
    return state, metadata


def encoder_from_metadata(metadata: dict[str, str]) -> InfiniteIDEncoder:
    try:
        config = json.loads(metadata["encoder_config"])
        return InfiniteIDEncoder(**config)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"The checkpoint's encoder_config metadata is missing or invalid: {exc}") from exc


def check_state_dict(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    """Strict comparison: every missing, unexpected or mis-shaped key is named in one ValueError."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(got))
        if got[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise ValueError(f"{what} does not match this model. " + "; ".join(problems) + ".")


def load_checkpoint(pipe, path: str | Path) -> dict[str, str]:
    """Load a native checkpoint into ``pipe`` (building its ID encoder from the metadata), strictly.

    Returns the checkpoint's metadata. Nothing in the pipeline changes unless every key matches.
    """
    state, metadata = read_checkpoint(path)
    encoder = encoder_from_metadata(metadata)
    rank = _metadata_rank(metadata)
    expected = identity_state_dict(pipe.unet, encoder, lora=False)
    if rank:
        expected.update({f"ip_adapter.{k}": v for k, v in expected_lora_state(pipe.unet, rank).items()})
    check_state_dict(expected, state, Path(path).name)
    encoder.load_state_dict({k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")})
    param = next(pipe.unet.parameters())
    for i, proc in id_adapter_layers(pipe.unet).items():
        proc.to_k_ip.weight.data.copy_(state[f"ip_adapter.{i}.to_k_ip.weight"])
        proc.to_v_ip.weight.data.copy_(state[f"ip_adapter.{i}.to_v_ip.weight"])
    if rank:
        prefix = "ip_adapter."
        install_id_lora(pipe.unet, {k[len(prefix):]: v for k, v in state.items() if "_lora." in k}, Path(path).name)
    else:
        remove_id_lora(pipe.unet)
    pipe.register_modules(id_encoder=encoder.to(device=param.device, dtype=param.dtype))
    return metadata


def _metadata_rank(metadata: dict[str, str]) -> int | None:
    value = metadata.get("lora_rank")
    if value in (None, ""):
        return None
    if not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"The checkpoint's lora_rank metadata must be a positive whole number, got {value!r}.")
    return int(value)
