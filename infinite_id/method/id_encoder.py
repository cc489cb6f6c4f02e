"""The ID encoder (DESIGN 2.1): ArcFace and CLIP features of the aligned face -> identity tokens.

``c_id = concat(FaceMapper(arcface), CLIPMapper(clip_hidden_states))`` along the token axis. Mapper shapes are
not published; ours are constructor arguments with SDXL-sized defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class IdentityFeatures:
    """Raw features of one identity (or a batch of them) before any mapper.

    ``face``: ``[B, face_dim]`` L2-normed ArcFace embeddings; ``clip``: ``[B, tokens, clip_dim]`` hidden states of
    the CLIP image tower on the aligned face crop. Either may be None when the encoder does not use it. Computing
    these once per photo and passing them as ``id_embeds`` skips face analysis and CLIP on later calls.
    ``face_norm``: optional ``[B]`` norms of the raw (un-normalized) ArcFace embeddings, for encoders trained on raw
    embeddings (InstantID's adapter); None when the face stack did not record them.
    """

    face: torch.Tensor | None = None
    clip: torch.Tensor | None = None
    face_norm: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return (self.face if self.face is not None else self.clip).shape[0]

    def to(self, device=None, dtype=None) -> IdentityFeatures:
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return IdentityFeatures(move(self.face), move(self.clip), move(self.face_norm))


class FaceMapper(nn.Module):
    """ArcFace embedding -> ``num_tokens`` tokens: MLP ``face_dim -> hidden -> GELU -> num_tokens * dim`` + LayerNorm."""

    def __init__(self, face_dim: int = 512, hidden_dim: int = 1024, cross_attention_dim: int = 2048, num_tokens: int = 4):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, cross_attention_dim
        self.proj = nn.Sequential(
            nn.Linear(face_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_tokens * cross_attention_dim)
        )
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(face).reshape(face.shape[0], self.num_tokens, self.dim))


class CLIPMapper(nn.Module):
    """CLIP hidden states ``[B, T, clip_dim]`` -> ``[B, T, dim]``: per-token Linear + LayerNorm."""

    def __init__(self, clip_dim: int = 1280, cross_attention_dim: int = 2048):
        super().__init__()
        self.proj = nn.Linear(clip_dim, cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(clip))


class InfiniteIDEncoder(nn.Module):
    """The native ID encoder: FaceMapper tokens followed by CLIPMapper tokens.

    Every identity encoder in this package (native or converted public adapter) has the same surface:
    ``needs_face``, ``needs_clip``, ``clip_layer`` (which CLIP hidden state it reads), ``clip_channel_order``
    (the order its CLIP crop is read in), ``num_tokens``, ``forward(features) -> [B, num_tokens,
    cross_attention_dim]`` and ``null_tokens(batch)``.
    """

    kind = "infinite-id"
    needs_face = True
    needs_clip = True
    clip_layer = -1  # last hidden state (DESIGN 2.1)
    clip_channel_order = "rgb"  # training/data.py reads the crop as RGB, so native checkpoints are trained on RGB

    def __init__(
        self,
        face_dim: int = 512,
        clip_dim: int = 1280,
        clip_tokens: int = 257,
        cross_attention_dim: int = 2048,
        face_tokens: int = 4,
        face_hidden_dim: int = 1024,
    ):
        super().__init__()
        self.face_dim, self.clip_dim, self.clip_tokens = face_dim, clip_dim, clip_tokens
        self.cross_attention_dim = cross_attention_dim
        self.face_mapper = FaceMapper(face_dim, face_hidden_dim, cross_attention_dim, face_tokens)
        self.clip_mapper = CLIPMapper(clip_dim, cross_attention_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.face_mapper.proj[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.face_mapper.proj[0].weight.device

    @property
    def num_tokens(self) -> int:
        return self.face_mapper.num_tokens + self.clip_tokens

    def config_dict(self) -> dict[str, int]:
        """The constructor arguments, recorded in checkpoint metadata so a checkpoint rebuilds its encoder."""
        return {
            "face_dim": self.face_dim,
            "clip_dim": self.clip_dim,
            "clip_tokens": self.clip_tokens,
            "cross_attention_dim": self.cross_attention_dim,
            "face_tokens": self.face_mapper.num_tokens,
            "face_hidden_dim": self.face_mapper.proj[0].out_features,
        }

    def forward(self, features: IdentityFeatures) -> torch.Tensor:
        if features.face is None or features.clip is None:
            raise ValueError("The Infinite-ID encoder needs both the ArcFace embedding and the CLIP features of the face.")
        face = features.face.to(self.device, self.dtype)
        clip = features.clip.to(self.device, self.dtype)
        if clip.shape[1:] != (self.clip_tokens, self.clip_dim):
            raise ValueError(f"CLIP features must be [batch, {self.clip_tokens}, {self.clip_dim}], got {tuple(clip.shape)}.")
        return torch.cat([self.face_mapper(face), self.clip_mapper(clip)], dim=1)

    def null_features(self, batch: int = 1) -> IdentityFeatures:
        zeros = lambda *s: torch.zeros(batch, *s, device=self.device, dtype=self.dtype)  # noqa: E731
        return IdentityFeatures(face=zeros(self.face_dim), clip=zeros(self.clip_tokens, self.clip_dim))

    def null_tokens(self, batch: int = 1) -> torch.Tensor:
        """The null identity used for classifier-free guidance: the mappers' output for zero features."""
        return self(self.null_features(batch))
