"""Identity mixing: one person between two, by blending their identity tokens."""

from __future__ import annotations

import threading

import torch

from ..method.ops import interpolate_identities
from .identity import Identity
from .request import GenerationRequest, clamped
from .runner import GenerationResult, StepCallback, _identity_meta, run


def mix(
    pipe,
    request: GenerationRequest,
    first: Identity,
    second: Identity,
    weight: float,
    *,
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    deadline: float | None = None,
) -> GenerationResult:
    """One person between two: their identity tokens blended ``(1 - weight) * first + weight * second``.

    Tokens, not raw features, are blended (the mapper is non-linear; blending its inputs would not give a
    point between the two people it maps to). The output is measured against both people.
    """
    weight = clamped(weight, 0.5, 0.0, 1.0)
    if pipe.id_encoder is None:
        raise ValueError("This engine has no identity encoder, so it cannot mix identities.")
    with torch.no_grad():
        tokens = interpolate_identities(pipe.id_encoder(first.features), pipe.id_encoder(second.features), weight)
    request = request.replace(method="infinite-id" if request.method == "text" else request.method)
    meta = {"mix": [_identity_meta(first), _identity_meta(second)], "weight": weight}
    return run(
        pipe, request, tokens, identity_meta=meta,
        references={"person A": first.reference, "person B": second.reference},
        on_step=on_step, cancel=cancel, deadline=deadline,
    )


