"""Public identity adapters checked against a UNet and converted on load (DESIGN 1.3, 5).

IP-Adapter-FaceID-PlusV2, IP-Adapter-Plus-Face and InstantID's adapter (their encoders: ``encoders``) load with the
native format's strictness (``method.checkpoint``), plus checks that name the usual wrong files: an adapter of
another kind than asked for, an SD 1.5 adapter on SDXL, a truncated download. ``load_adapter`` takes either.
"""

from __future__ import annotations

import inspect
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..method.attention import IDCrossAttnProcessor, id_adapter_layers
from ..method.checkpoint import FORMAT, check_state_dict, load_checkpoint
from ..method.id_lora import check_lora_state, expected_lora_state, install_id_lora, remove_id_lora, split_lora_state
from .encoders import adapter_info, build_encoder, detect_kind

logger = logging.getLogger(__name__)

# Context width and cross-attention layer count of the base models an adapter file may have been made for.
KNOWN_UNETS = {(16, 768): "Stable Diffusion 1.5", (16, 1024): "Stable Diffusion 2.x", (70, 2048): "SDXL"}


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a ``.safetensors`` or torch pickle (``.bin``/``.pt``) file, flattened to dotted keys.

    The public ``.bin`` adapters hold ``{"image_proj": {...}, "ip_adapter": {...}}``; their ``.safetensors``
    versions hold the same tensors as flat ``image_proj.*`` / ``ip_adapter.*`` keys. Both read the same here.
    Pickles are read with ``weights_only=True``: a checkpoint can never run code.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # only the legacy (non-zip) format cannot be memory-mapped
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile) as exc:
        raise ValueError(f"{path.name} is not a readable checkpoint (truncated or corrupt?): {exc}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"{path.name} holds a {type(loaded).__name__}, not a dict of tensors.")
    return _flatten(loaded, path.name), {}


def _flatten(tree: dict, what: str, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, what, name + "."))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
        else:
            raise ValueError(f"{what}: '{name}' is a {type(value).__name__}, not a tensor.")
    return flat


def split_adapter_state(flat: dict[str, torch.Tensor], what: str) -> tuple[dict, dict]:
    """``image_proj`` and ``ip_adapter`` sub-dicts of a flattened adapter file, with their prefixes removed."""
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    other = []
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head in parts and rest:
            parts[head][rest] = value
        else:
            other.append(key)
    if not parts["image_proj"] or not parts["ip_adapter"]:
        absent = " and ".join(f"{p}.*" for p in parts if not parts[p])
        raise ValueError(f"{what} has no {absent} keys, so it is not an IP-Adapter-style identity adapter.")
    if other:
        raise ValueError(f"{what} has {len(other)} keys outside image_proj/ip_adapter, e.g. {', '.join(other[:4])}.")
    return parts["image_proj"], parts["ip_adapter"]


def expected_layer_state(unet, lora_rank: int | None = None) -> dict[str, torch.Tensor]:
    """The ``ip_adapter`` keys this UNet takes, as shape-only (meta) tensors, in IP-Adapter numbering.

    Every ID cross-attention layer ``i`` has ``{i}.to_k_ip.weight`` / ``{i}.to_v_ip.weight``. IP-Adapter-FaceID
    files also hold a LoRA (rank ``lora_rank``) on q, k, v and out of *every* attention layer: ``{i}.to_q_lora.down``
    ``[rank, in]`` and ``{i}.to_q_lora.up`` ``[out, rank]``, and so on.
    """
    expected = {}
    for i, proc in enumerate(unet.attn_processors.values()):
        if isinstance(proc, IDCrossAttnProcessor):
            for name in ("to_k_ip", "to_v_ip"):
                expected[f"{i}.{name}.weight"] = torch.empty(getattr(proc, name).weight.shape, device="meta")
    return {**expected, **(expected_lora_state(unet, lora_rank) if lora_rank else {})}


def check_adapter_layers(unet, ip_adapter: dict[str, torch.Tensor], what: str) -> int | None:
    """Strictly compare a file's ``ip_adapter`` dict with this UNet. Returns the LoRA rank (None: no LoRA).

    A file made for another base model fails first with a sentence saying so (layer count and context width).
    """
    file_layers = sorted({int(k.split(".")[0]) for k in ip_adapter
                          if k.endswith(".to_k_ip.weight") and k.split(".")[0].isdigit()})
    contexts = sorted({int(ip_adapter[f"{i}.to_k_ip.weight"].shape[1]) for i in file_layers})
    ours = id_adapter_layers(unet)
    our_context = next(iter(ours.values())).to_k_ip.in_features
    if len(file_layers) != len(ours) or contexts != [our_context]:
        theirs = " or ".join(map(str, contexts)) or "no"
        guess = KNOWN_UNETS.get((len(file_layers), contexts[0] if len(contexts) == 1 else 0))
        mine = KNOWN_UNETS.get((len(ours), our_context))
        raise ValueError(
            f"{what} is made for a UNet with {len(file_layers)} cross-attention layers and {theirs}-d context"
            f"{f' ({guess})' if guess else ''}, but this one has {len(ours)} layers with {our_context}-d context"
            f"{f' ({mine})' if mine else ''}. Use the version of the adapter made for this base model."
        )
    lora, layers = split_lora_state(ip_adapter)
    check_state_dict(expected_layer_state(unet), layers, f"{what} (ip_adapter)")
    return check_lora_state(unet, lora, what) if lora else None


def _native_metadata(path: Path) -> dict[str, str] | None:
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path.name} is not a readable checkpoint (truncated or corrupt?): {exc}") from exc
    return metadata if metadata.get("format") == FORMAT else None


@dataclass
class ConvertedAdapter:
    """A public adapter checked against a UNet and converted, not yet installed: the encoder (weights loaded), the
    file's ``ip_adapter`` dict (per-layer K/V, maybe a LoRA) and the LoRA rank (None: the file has no LoRA)."""

    kind: str
    encoder: nn.Module
    ip_adapter: dict[str, torch.Tensor]
    lora_rank: int | None


def convert_adapter(unet, flat: dict[str, torch.Tensor], what: str, kind: str | None = None, **options) -> ConvertedAdapter:
    """Check a public adapter's tensors (flattened, see ``read_state_dict``) against ``unet`` and build its encoder.

    Raises a ValueError naming the problem: another kind of adapter than ``kind``, a file made for another base
    model, missing/unexpected/mis-shaped keys. ``options`` go to the encoder (``s_scale``, ``embedding_norm``) when
    it takes them. Changes nothing outside the returned object.
    """
    wanted = adapter_info(kind).name if kind else None
    image_proj, ip_adapter = split_adapter_state(flat, what)
    found, evidence = detect_kind(image_proj, what)
    if wanted and found != wanted:
        raise ValueError(
            f"{what} is an {adapter_info(found).title} checkpoint ({evidence}), not {adapter_info(wanted).title} "
            f"as asked. Choose adapter '{found}' or give the {adapter_info(wanted).title} file."
        )
    rank = check_adapter_layers(unet, ip_adapter, what)
    encoder_cls = adapter_info(found).encoder
    accepted = inspect.signature(encoder_cls).parameters
    encoder = build_encoder(found, image_proj, **{k: v for k, v in options.items() if k in accepted and v is not None})
    check_state_dict(encoder.image_proj.state_dict(), image_proj, f"{what} (image_proj)")
    cross = next(iter(id_adapter_layers(unet).values())).to_k_ip.in_features
    if encoder.cross_attention_dim != cross:
        raise ValueError(f"{what} makes {encoder.cross_attention_dim}-d identity tokens; this UNet takes {cross}-d.")
    encoder.image_proj.load_state_dict(image_proj)
    return ConvertedAdapter(found, encoder, ip_adapter, rank)


def load_adapter(
    pipe,
    path: str | Path,
    kind: str | None = None,
    *,
    s_scale: float | None = None,
    embedding_norm: float | None = None,
    null_clip: bool = True,
) -> dict[str, str]:
    """Load an identity adapter file into ``pipe``: a native checkpoint or a public adapter, converted.

    ``kind``: the adapter the file must be (``adapters.ADAPTERS`` names), or None to detect it. ``s_scale``:
    FaceID-PlusV2's structure weight; ``embedding_norm``: InstantID's ArcFace scale (see ``InstantIDEncoder``).
    The LoRA that IP-Adapter-FaceID files carry goes into the attention processors and acts on the identity
    stream only, at each call's ``lora_scale`` (``method.id_lora``); an adapter without one removes any LoRA a
    previous adapter left. ``null_clip``: compute the null identity's CLIP features now (one image-encoder pass);
    ``load_pipeline`` passes False and calls ``pipe.id_encoder.set_null_clip_from(pipe.image_encoder)`` once the
    model is on its device.

    Every check runs before anything changes: a file that fails leaves the pipeline as it was. Returns a summary
    (kind, title, file name, token count, LoRA state) for logs and the UI.
    """
    path = Path(path)
    what = path.name
    wanted = adapter_info(kind).name if kind else None
    if _native_metadata(path) is not None or wanted == "infinite-id":
        if wanted not in (None, "infinite-id"):
            raise ValueError(f"{what} is a native Infinite-ID checkpoint, not {adapter_info(wanted).title}.")
        metadata = load_checkpoint(pipe, path)
        rank = metadata.get("lora_rank")
        return {"kind": "infinite-id", "title": adapter_info("infinite-id").title, "file": what,
                "num_tokens": metadata.get("num_tokens", ""), "lora": _lora_text(int(rank) if rank else None)}

    converted = convert_adapter(pipe.unet, read_state_dict(path)[0], what, wanted, s_scale=s_scale,
                                embedding_norm=embedding_norm)
    encoder = converted.encoder
    if encoder.needs_clip:
        image_encoder = getattr(pipe, "image_encoder", None)
        if image_encoder is None:
            raise ValueError(f"{encoder.title} needs the CLIP ViT-H/14 image encoder; the pipeline has none loaded.")
        width = image_encoder.config.hidden_size
        if width != encoder.clip_dim:
            raise ValueError(
                f"{what} reads {encoder.clip_dim}-d CLIP features, but the image encoder gives {width}-d ones. It "
                "needs the CLIP ViT-H/14 image encoder (h94/IP-Adapter models/image_encoder)."
            )
        if null_clip:
            encoder.set_null_clip_from(image_encoder)

    # Every check passed: now change the pipeline.
    param = next(pipe.unet.parameters())
    for i, proc in id_adapter_layers(pipe.unet).items():
        proc.to_k_ip.weight.data.copy_(converted.ip_adapter[f"{i}.to_k_ip.weight"])
        proc.to_v_ip.weight.data.copy_(converted.ip_adapter[f"{i}.to_v_ip.weight"])
    pipe.register_modules(id_encoder=encoder.to(device=param.device, dtype=param.dtype).eval())
    if converted.lora_rank is None:
        remove_id_lora(pipe.unet)
        if converted.kind == "faceid-plusv2":
            logger.warning("%s has no LoRA keys, so lora_scale is ignored: the identity stream runs without the LoRA "
                           "the FaceID adapters were trained with (expect a weaker likeness).", what)
    else:
        install_id_lora(pipe.unet, split_lora_state(converted.ip_adapter)[0], what)
    return {"kind": converted.kind, "title": encoder.title, "file": what, "num_tokens": str(encoder.num_tokens),
            "lora": _lora_text(converted.lora_rank)}


def _lora_text(rank: int | None) -> str:
    return "none" if rank is None else f"rank {rank}, identity stream only"
