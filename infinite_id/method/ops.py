"""Pure tensor functions of the method: AdaIN-mean and identity averaging / mixing."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def adain_mean(x: torch.Tensor, y: torch.Tensor, strength: float = 1.0, dim: int = -2,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Shift the per-channel mean of ``x`` towards that of ``y``: ``x + strength * (mean(y) - mean(x))``.

    Means are taken over the token axis ``dim`` (default: the second last, as in ``[batch, tokens, channels]``).
    Only the mean moves; the centred values of ``x`` (and so its variance) are left alone, which is what keeps
    identity while style comes across (full AdaIN also matches the variance and costs identity).

    ``out``: a tensor of ``x``'s shape (e.g. the first part of a concatenation buffer) to write the result into,
    instead of a new tensor; it is returned. The means are ``sum / n``: on CPU, ``mean()`` of a bf16 tensor first
    copies all of it to fp32 (2.4x the time of ``sum``, which accumulates in fp32 without the copy); the values are
    the same for power-of-two token counts and within bf16 rounding otherwise.
    """
    if strength == 0:
        if out is None:
            return x
        out.copy_(x)
        return out
    shift = y.sum(dim=dim, keepdim=True) / y.shape[dim] - x.sum(dim=dim, keepdim=True) / x.shape[dim]
    if out is None:
        return torch.add(x, shift, alpha=strength)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and shift.requires_grad):
        # dynamo cannot trace ``out=`` into a strided view (inductor fuses this instead), nor can autograd.
        out.copy_(torch.add(x, shift, alpha=strength))
    else:
        torch.add(x, shift, alpha=strength, out=out)  # eager inference: one pass, no temporary
    return out


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
