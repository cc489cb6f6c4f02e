"""Perceiver resamplers of the public identity adapters (IP-Adapter-Plus, IP-Adapter-FaceID-Plus, InstantID).

Written here from the published architecture (the Flamingo perceiver resampler as IP-Adapter uses it) so the
projection code is ours and readable. Module and parameter names are chosen so that our ``state_dict()`` keys are
*exactly* the keys of the published ``image_proj`` dicts: a public file loads with a strict ``load_state_dict`` and
no renaming table. The layout is::

    layers.{i}.0   PerceiverAttention: norm1, norm2, to_q, to_kv, to_out
    layers.{i}.1   FeedForward: 0 LayerNorm, 1 Linear(dim, dim*mult), 2 GELU, 3 Linear(dim*mult, dim)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DIM_HEAD = 64  # every published resampler uses 64-d heads; the head count follows from the width


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Pre-norm MLP without biases (the indices 0/1/3 are the published key names)."""
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class PerceiverAttention(nn.Module):
    """Latents attend to ``[features ; latents]`` (keys and values from both, queries from the latents)."""

    def __init__(self, dim: int, dim_head: int = DIM_HEAD, heads: int = 8):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)  # features
        self.norm2 = nn.LayerNorm(dim)  # latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        # The original scales q and k by dim_head**-0.25 each and takes the softmax in fp32: the same function as
        # SDPA's 1/sqrt(dim_head), whose fused kernels are also stable in half precision.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _PerceiverStack(nn.Module):
    """``proj_in`` -> ``depth`` x (attention + feed-forward, both residual) -> ``proj_out`` -> ``norm_out``."""

    def __init__(self, dim: int, depth: int, heads: int, embedding_dim: int, output_dim: int, ff_mult: int):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, DIM_HEAD, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    def resample(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(features)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class Resampler(_PerceiverStack):
    """IP-Adapter-Plus / InstantID resampler: ``num_queries`` learned latents read the input tokens.

    Input ``[B, T, embedding_dim]`` (CLIP hidden states, or one ArcFace embedding as a single token), output
    ``[B, num_queries, output_dim]``.
    """

    def __init__(
        self, dim: int = 1280, depth: int = 4, heads: int = 20, num_queries: int = 16, embedding_dim: int = 1280,
        output_dim: int = 2048, ff_mult: int = 4,
    ):
        super().__init__(dim, depth, heads, embedding_dim, output_dim, ff_mult)
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.resample(self.latents.expand(features.shape[0], -1, -1), features)


class FacePerceiverResampler(_PerceiverStack):
    """IP-Adapter-FaceID-Plus resampler: the latents are not learned but given (the ArcFace tokens)."""

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.resample(latents, features)
