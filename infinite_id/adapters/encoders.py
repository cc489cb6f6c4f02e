"""Public identity adapters as Infinite-ID identity encoders (DESIGN 1.3): what each one is and what it needs.

No Infinite-ID weights are public, so the identity branch can run on three public image-cross-attention adapters,
converted on load (``convert.load_adapter``): their projection model becomes an ID encoder with the surface of
``InfiniteIDEncoder`` (``kind``, ``needs_face``, ``needs_clip``, ``clip_layer``, ``num_tokens``, ``dtype``,
``device``, ``forward(IdentityFeatures)``, ``null_tokens(batch)``), and their per-layer ``to_k_ip``/``to_v_ip``
weights go into our ID cross-attention processors. Every size is inferred from the file, so the same code loads
the SDXL files and the tiny ones the tests synthesize.

Each encoder keeps the adapter's projection model as ``self.image_proj``, whose ``state_dict()`` keys are exactly
the keys of the file's ``image_proj`` dict: loading is a strict ``load_state_dict`` with no renaming.

The null identity (for classifier-free guidance) is what each adapter's own code feeds its unconditional rows:
IP-Adapter-Plus and -FaceID-Plus run the CLIP image encoder on an all-zero pixel tensor (``torch.zeros_like`` of
the preprocessed image) and use a zero ArcFace embedding; InstantID uses a zero ArcFace embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..method.id_encoder import IdentityFeatures
from .resampler import DIM_HEAD, FacePerceiverResampler, Resampler

FACE_DIM = 512  # ArcFace embeddings (insightface buffalo_l and antelopev2 alike)


def _dim(state: dict[str, torch.Tensor], key: str, axis: int, what: str) -> int:
    """One dimension of one tensor of a state dict, or a ValueError naming the key that should be there."""
    if key not in state:
        raise ValueError(f"{what}: the image_proj weights have no '{key}', so their sizes cannot be read.")
    return int(state[key].shape[axis])


def _depth(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def _heads(width: int, what: str) -> int:
    if width % DIM_HEAD:
        raise ValueError(f"{what}: attention width {width} is not a multiple of the {DIM_HEAD}-d heads.")
    return width // DIM_HEAD


class PublicEncoder(nn.Module):
    """What the converted adapters share: dtype/device, the cached null CLIP features, the token surface."""

    kind = "public"
    title = "public adapter"
    needs_face = True
    needs_clip = True
    clip_layer = -2  # IP-Adapter-Plus and FaceID-Plus read the penultimate CLIP hidden state
    clip_channel_order = "rgb"  # the order the reference usage hands the crop to CLIP in (docs/weights.md)
    face_pack: str | None = "buffalo_l"  # the insightface pack whose embedding space the adapter was trained in
    image_proj: nn.Module

    def __init__(self, clip_dim: int = 0, clip_tokens: int = 257):
        super().__init__()
        self.clip_dim = clip_dim
        # Non-persistent: the null CLIP features come from the image encoder at load time, never from a file.
        self.register_buffer("null_clip", torch.zeros(1, clip_tokens, max(clip_dim, 1)), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.image_proj.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.image_proj.parameters()).device

    @property
    def cross_attention_dim(self) -> int:
        raise NotImplementedError

    @torch.no_grad()
    def set_null_clip_from(self, image_encoder: nn.Module, device: torch.device | None = None) -> None:
        """Cache the CLIP features of an all-zero pixel tensor: the adapter's unconditional image (see module doc).

        ``device``: where the encoder runs (the pipeline's execution device under CPU offload)."""
        if not self.needs_clip:
            return
        size = image_encoder.config.image_size
        device = device or next(image_encoder.parameters()).device
        pixels = torch.zeros(1, 3, size, size, device=device, dtype=image_encoder.dtype)
        hidden = image_encoder(pixels, output_hidden_states=True).hidden_states[self.clip_layer]
        if hidden.shape[-1] != self.clip_dim:
            raise ValueError(
                f"The {self.title} adapter reads {self.clip_dim}-d CLIP features, but the image encoder gives "
                f"{hidden.shape[-1]}-d ones. It needs the CLIP ViT-H/14 image encoder (h94/IP-Adapter models/image_encoder)."
            )
        self.null_clip = hidden.to(device=self.null_clip.device, dtype=self.null_clip.dtype)

    def _clip(self, features: IdentityFeatures) -> torch.Tensor:
        if features.clip is None:
            raise ValueError(f"The {self.title} adapter needs the CLIP features of the face crop.")
        clip = features.clip.to(self.device, self.dtype)
        if clip.ndim != 3 or clip.shape[-1] != self.clip_dim:
            raise ValueError(f"CLIP features must be [batch, tokens, {self.clip_dim}], got {tuple(clip.shape)}.")
        return clip

    def _face(self, features: IdentityFeatures) -> torch.Tensor:
        if features.face is None:
            raise ValueError(f"The {self.title} adapter needs the ArcFace embedding of the face.")
        face = features.face.to(self.device, self.dtype)
        if face.ndim != 2 or face.shape[-1] != FACE_DIM:
            raise ValueError(f"ArcFace embeddings must be [batch, {FACE_DIM}], got {tuple(face.shape)}.")
        return face

    def null_features(self, batch: int = 1) -> IdentityFeatures:
        face = torch.zeros(batch, FACE_DIM, device=self.device, dtype=self.dtype) if self.needs_face else None
        clip = self.null_clip.to(self.device, self.dtype).expand(batch, -1, -1) if self.needs_clip else None
        return IdentityFeatures(face=face, clip=clip)

    def null_tokens(self, batch: int = 1) -> torch.Tensor:
        """The adapter's own unconditional embedding (see the module docstring)."""
        return self(self.null_features(batch))


# --- IP-Adapter-FaceID-PlusV2 -----------------------------------------------------------------------------------


class FaceIDPlusProjection(nn.Module):
    """IP-Adapter-FaceID-Plus's ``ProjModelFaceIdPlus``: ArcFace -> ``num_tokens`` tokens (MLP + LayerNorm), then a
    perceiver in which those tokens read the CLIP hidden states of the aligned face. V2 adds the shortcut
    ``tokens + s_scale * perceiver(tokens)``, so ``s_scale`` weighs the CLIP (face structure) part."""

    def __init__(self, face_dim: int, hidden_dim: int, clip_dim: int, cross_attention_dim: int, num_tokens: int,
                 depth: int, ff_mult: int):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, cross_attention_dim
        self.proj = nn.Sequential(
            nn.Linear(face_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, cross_attention_dim * num_tokens)
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            cross_attention_dim, depth, _heads(cross_attention_dim, "FaceID-Plus perceiver"), clip_dim,
            cross_attention_dim, ff_mult,
        )

    def forward(self, face: torch.Tensor, clip: torch.Tensor, shortcut: bool, s_scale: float) -> torch.Tensor:
        tokens = self.norm(self.proj(face).reshape(face.shape[0], self.num_tokens, self.dim))
        out = self.perceiver_resampler(tokens, clip)
        return tokens + s_scale * out if shortcut else out


class FaceIDPlusEncoder(PublicEncoder):
    """IP-Adapter-FaceID-PlusV2 SDXL (h94/IP-Adapter-FaceID ``ip-adapter-faceid-plusv2_sdxl.bin``).

    Inputs: the L2-normed buffalo_l ArcFace embedding and the penultimate CLIP ViT-H/14 hidden states of the
    aligned 224 px face crop. 4 tokens. ``s_scale``: weight of the CLIP (structure) branch in V2's shortcut; the
    authors' SDXL default is shortcut on, ``s_scale=1.0``. ``forward(features, s_scale=...)`` overrides it for one
    computation (pass the tokens as ``id_embeds``), so no per-call value is ever stored on the module.
    """

    kind = "faceid-plusv2"
    title = "IP-Adapter-FaceID-PlusV2"
    # The authors' usage reads the photo with cv2.imread and hands the aligned crop to CLIPImageProcessor as it is
    # (BGR); diffusers' FaceID-Plus example does the same. docs/weights.md has the evidence.
    clip_channel_order = "bgr"

    def __init__(self, face_dim: int = FACE_DIM, hidden_dim: int = 1024, clip_dim: int = 1280,
                 cross_attention_dim: int = 2048, num_tokens: int = 4, depth: int = 4, ff_mult: int = 4,
                 clip_tokens: int = 257, shortcut: bool = True, s_scale: float = 1.0):
        super().__init__(clip_dim, clip_tokens)
        self.image_proj = FaceIDPlusProjection(face_dim, hidden_dim, clip_dim, cross_attention_dim, num_tokens, depth,
                                               ff_mult)
        self.shortcut, self.s_scale = shortcut, float(s_scale)

    @classmethod
    def config_from_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, int]:
        what = "IP-Adapter-FaceID-Plus"
        cross = _dim(state, "norm.weight", 0, what)
        ff_hidden = _dim(state, "perceiver_resampler.layers.0.1.1.weight", 0, what)
        return {
            "face_dim": _dim(state, "proj.0.weight", 1, what),
            "hidden_dim": _dim(state, "proj.0.weight", 0, what),
            "clip_dim": _dim(state, "perceiver_resampler.proj_in.weight", 1, what),
            "cross_attention_dim": cross,
            "num_tokens": _dim(state, "proj.2.weight", 0, what) // cross,
            "depth": _depth(state, "perceiver_resampler.layers."),
            "ff_mult": ff_hidden // cross,
        }

    @property
    def num_tokens(self) -> int:
        return self.image_proj.num_tokens

    @property
    def cross_attention_dim(self) -> int:
        return self.image_proj.dim

    def forward(self, features: IdentityFeatures, s_scale: float | None = None) -> torch.Tensor:
        scale = self.s_scale if s_scale is None else float(s_scale)
        return self.image_proj(self._face(features), self._clip(features), self.shortcut, scale)


class _ResamplerEncoder(PublicEncoder):
    """A public encoder whose projection is a single ``Resampler`` named ``image_proj``."""

    @property
    def num_tokens(self) -> int:
        return self.image_proj.latents.shape[1]

    @property
    def cross_attention_dim(self) -> int:
        return self.image_proj.proj_out.out_features


# --- IP-Adapter-Plus-Face ---------------------------------------------------------------------------------------


class PlusFaceEncoder(_ResamplerEncoder):
    """IP-Adapter-Plus-Face SDXL (h94/IP-Adapter ``sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors``).

    CLIP only: a 16-query resampler over the penultimate CLIP ViT-H/14 hidden states of a face crop. No ArcFace,
    so no identity embedding at all (a face detector only makes the crop): the weakest identity of the three.
    """

    kind = "plus-face"
    title = "IP-Adapter-Plus-Face"
    needs_face = False
    face_pack = None  # any detector can make the crop; none is needed for an already cropped face

    def __init__(self, clip_dim: int = 1280, dim: int = 1280, num_queries: int = 16, cross_attention_dim: int = 2048,
                 depth: int = 4, ff_mult: int = 4, clip_tokens: int = 257):
        super().__init__(clip_dim, clip_tokens)
        self.image_proj = Resampler(dim, depth, _heads(dim, self.title), num_queries, clip_dim, cross_attention_dim,
                                    ff_mult)

    @classmethod
    def config_from_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, int]:
        return _resampler_config(state, "IP-Adapter-Plus-Face", input_name="clip_dim")

    def forward(self, features: IdentityFeatures) -> torch.Tensor:
        return self.image_proj(self._clip(features))


# --- InstantID --------------------------------------------------------------------------------------------------


class InstantIDEncoder(_ResamplerEncoder):
    """InstantID's face adapter (InstantX/InstantID ``ip-adapter.bin``), without IdentityNet.

    Input: the antelopev2 (glintr100) ArcFace embedding as one token, through a 16-query resampler. InstantID feeds
    insightface's *raw* embedding (``face.embedding``, not ``normed_embedding``). Our features carry the unit
    vector, so it is scaled back by ``features.face_norm`` when the face stack provides the raw norm, else by
    ``embedding_norm`` (a typical ArcFace feature norm; an approximation: the resampler's first LayerNorm removes
    most, not all, of the scale). Embeddings that are not unit vectors are used as they are.
    """

    kind = "instantid"
    title = "InstantID face adapter"
    needs_clip = False
    clip_layer = -1  # unused
    face_pack = "antelopev2"

    def __init__(self, face_dim: int = FACE_DIM, dim: int = 1280, num_queries: int = 16,
                 cross_attention_dim: int = 2048, depth: int = 4, ff_mult: int = 4, embedding_norm: float = 22.0):
        super().__init__(0, 1)
        self.image_proj = Resampler(dim, depth, _heads(dim, self.title), num_queries, face_dim, cross_attention_dim,
                                    ff_mult)
        self.embedding_norm = float(embedding_norm)

    @classmethod
    def config_from_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, int]:
        return _resampler_config(state, "InstantID", input_name="face_dim")

    def forward(self, features: IdentityFeatures) -> torch.Tensor:
        face = self._face(features)
        unit = (face.float().norm(dim=-1, keepdim=True) - 1).abs() < 1e-2
        if features.face_norm is not None:
            scale = features.face_norm.to(self.device, self.dtype).reshape(-1, 1)
        else:
            scale = torch.full((face.shape[0], 1), self.embedding_norm, device=self.device, dtype=self.dtype)
        face = torch.where(unit, face * scale, face)  # zeros (the null identity) stay zeros
        return self.image_proj(face[:, None, :])


def _resampler_config(state: dict[str, torch.Tensor], what: str, input_name: str) -> dict[str, int]:
    dim = _dim(state, "latents", 2, what)
    return {
        input_name: _dim(state, "proj_in.weight", 1, what),
        "dim": dim,
        "num_queries": _dim(state, "latents", 1, what),
        "cross_attention_dim": _dim(state, "proj_out.weight", 0, what),
        "depth": _depth(state, "layers."),
        "ff_mult": _dim(state, "layers.0.1.1.weight", 0, what) // dim,
    }


# --- the registry -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterInfo:
    """Where a public adapter lives and what it needs. ``face_pack``: the insightface pack it needs (None: a
    detector only for the crop, buffalo_l by default); ``needs_clip``: whether the CLIP ViT-H/14 encoder is loaded."""

    name: str
    title: str
    repo_id: str | None
    filename: str | None
    encoder: type[nn.Module] | None
    face_pack: str | None
    needs_clip: bool
    licence: str
    tokens: int


ADAPTERS: dict[str, AdapterInfo] = {
    "faceid-plusv2": AdapterInfo(
        "faceid-plusv2", FaceIDPlusEncoder.title, "h94/IP-Adapter-FaceID", "ip-adapter-faceid-plusv2_sdxl.bin",
        FaceIDPlusEncoder, "buffalo_l", True,
        "non-commercial research only (trained on insightface embeddings; the model card says so)", 4,
    ),
    "plus-face": AdapterInfo(
        "plus-face", PlusFaceEncoder.title, "h94/IP-Adapter", "sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
        PlusFaceEncoder, None, True, "Apache-2.0 (the face detector used for the crop has its own licence)", 16,
    ),
    "instantid": AdapterInfo(
        "instantid", InstantIDEncoder.title, "InstantX/InstantID", "ip-adapter.bin", InstantIDEncoder,
        "antelopev2", False, "Apache-2.0 weights; needs antelopev2, which is non-commercial research only", 16,
    ),
    "infinite-id": AdapterInfo(
        "infinite-id", "Infinite-ID native checkpoint", None, None, None, "buffalo_l", True,
        "whatever its trainer chose; trained on insightface embeddings", 0,
    ),
}
DEFAULT_ADAPTER = "faceid-plusv2"
ALIASES = {"faceid": "faceid-plusv2", "faceid-plus": "faceid-plusv2", "plusface": "plus-face",
           "instant-id": "instantid", "native": "infinite-id"}


def adapter_info(name: str) -> AdapterInfo:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in ADAPTERS:
        raise ValueError(f"Unknown identity adapter {name!r}; choose one of {', '.join(ADAPTERS)}.")
    return ADAPTERS[key]


def detect_kind(image_proj: dict[str, torch.Tensor], what: str) -> tuple[str, str]:
    """Which public adapter an ``image_proj`` dict belongs to, and the evidence, from its key names and sizes.

    Other IP-Adapter variants are named in the error so a user knows what they gave instead of an identity adapter.
    """
    keys = set(image_proj)
    if "perceiver_resampler.proj_in.weight" in keys:
        return "faceid-plusv2", "its image_proj has an ArcFace MLP and perceiver_resampler.*"
    if "latents" in keys and "proj_in.weight" in keys:
        width = image_proj["proj_in.weight"].shape[1]
        if width == FACE_DIM:
            return "instantid", f"its resampler reads {FACE_DIM}-d ArcFace embeddings"
        return "plus-face", f"its resampler reads {width}-d CLIP hidden states"
    if "norm.weight" in keys and "proj.0.weight" in keys:
        raise ValueError(f"{what} is an IP-Adapter-FaceID (v1, ArcFace only) checkpoint, which is not supported; "
                         "use ip-adapter-faceid-plusv2_sdxl.bin.")
    if "proj.weight" in keys or "proj.3.weight" in keys:
        raise ValueError(f"{what} is a plain IP-Adapter (image prompt) checkpoint, not an identity adapter; use one of "
                         f"{', '.join(a for a in ADAPTERS if a != 'infinite-id')}.")
    shown = ", ".join(sorted(keys)[:6]) or "no keys"
    raise ValueError(f"{what} is not a known identity adapter: its image_proj keys are {shown}.")


def build_encoder(kind: str, image_proj: dict[str, torch.Tensor], **options) -> PublicEncoder:
    """The encoder for ``kind`` sized from the file's ``image_proj`` dict (``options`` e.g. ``s_scale``)."""
    cls = adapter_info(kind).encoder
    if cls is None:
        raise ValueError(f"{kind} checkpoints are not converted; load them with method.checkpoint.load_checkpoint.")
    return cls(**cls.config_from_state_dict(image_proj), **options)
