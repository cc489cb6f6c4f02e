"""Pure tensor functions of the method: AdaIN-mean and identity averaging / mixing."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def adain_mean(x: torch.Tensor, y: torch.Tensor, strength: float = 1.0, dim: int = -2) -> torch.Tensor:
    """Shift the per-channel mean of ``x`` towards that of ``y``: ``x + strength * (mean(y) - mean(x))``.

    Means are taken over the token axis ``dim`` (default: the second last, as in ``[batch, tokens, channels]``).
    Only the mean moves; the centred values of ``x`` (and so its variance) are left alone, which is what keeps
    identity while style comes across (full AdaIN also matches the variance and costs identity).
    """
    if strength == 0:
        return x
    shift = y.mean(dim=dim, keepdim=True) - x.mean(dim=dim, keepdim=True)
    return x + strength * shift


def average_identity(embeddings: Sequence[torch.Tensor] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Average several photos of the *same* person into one feature.

    ArcFace embeddings live on the unit sphere, so the mean is renormalised (``normalize=True``); CLIP hidden
    states are averaged as they are (``normalize=False``).
    """
    stacked = torch.stack(list(embeddings)) if not isinstance(embeddings, torch.Tensor) else embeddings
    if stacked.shape[0] == 0:
        raise ValueError("average_identity needs at least one embedding.")
    mean = stacked.float().mean(dim=0)
    if normalize:
        norm = mean.norm(dim=-1, keepdim=True)
        if bool((norm < 1e-6).any()):
            raise ValueError("These face embeddings cancel out; the photos do not look like one person.")
        mean = mean / norm
    return mean.to(stacked.dtype)


def interpolate_identities(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Blend two *different* people's identity tokens: ``(1 - weight) * a + weight * b``."""
    if a.shape != b.shape:
        raise ValueError(f"Identity tokens to blend must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"The blend weight must be between 0 and 1, got {weight}.")
    return torch.lerp(a, b, weight)


def stack_identities(tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """Put several people into one image: concatenate their identity tokens along the token axis."""
    tokens = list(tokens)
    if not tokens:
        raise ValueError("stack_identities needs at least one identity.")
    return torch.cat(tokens, dim=-2)
