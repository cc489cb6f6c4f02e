"""A LoRA that acts on the identity stream only: the FaceID adapters' LoRA, inside our attention processors.

IP-Adapter-FaceID files carry a low-rank adapter on the q, k, v and out projections of *every* attention layer
(``ip_adapter.{i}.to_q_lora.down.weight`` ``[rank, in]``, ``...up.weight`` ``[out, rank]``, and so on for
``to_k_lora``, ``to_v_lora``, ``to_out_lora``; ``i`` is the layer's position in ``unet.attn_processors``). The
authors' own processors always run it: ``to_q(x) + lora_scale * up(down(x))``, no alpha (a scale of 1), on the
output projection after the text and image branches are summed. The adapter was trained with it.

Fused into the UNet it would change the text stream too. Here each processor holds the LoRA of its layer as an
:class:`IdentityLoRA` and adds the deltas to the rows of the identity stream only (``IDCall.id_rows``), at the
call's ``IDCall.lora_scale``: a low-rank add on those rows, no extra UNet pass. Everything the text stream's rows
compute stays plain SDXL, including the text stream's keys and values that the identity rows attend to in mixed
self-attention.
"""

from __future__ import annotations

import torch
from torch import nn

# (the Attention module's linear, the file's name for its LoRA), in the order the authors' processors hold them.
LORA_PARTS = (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"), ("to_out.0", "to_out_lora"))
LORA_SCALE_RANGE = (0.0, 2.0)


class LowRankDelta(nn.Module):
    """``up(down(x))``: the delta one LoRA adds to one linear layer (no bias, no alpha: IP-Adapter's layout)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in the weights' dtype and returned in the input's, as diffusers' LoRALinearLayer does.
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


class IdentityLoRA(nn.Module):
    """The LoRA of one attention layer. Its ``state_dict()`` keys are the file's keys after ``{i}.``
    (``to_q_lora.down.weight`` ...), so a file loads with a strict ``load_state_dict`` and no renaming."""

    def __init__(self, attn: nn.Module, rank: int):
        super().__init__()
        for linear_name, name in LORA_PARTS:
            linear = attn.get_submodule(linear_name)
            self.add_module(name, LowRankDelta(linear.in_features, linear.out_features, rank))

    @property
    def rank(self) -> int:
        return self.to_q_lora.down.out_features

    def delta(self, part: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, part)(x)


def row_count(rows: slice | torch.Tensor, batch: int) -> int:
    """How many of a ``batch``'s rows ``rows`` (a slice or an index tensor of distinct rows) names."""
    return len(range(batch)[rows]) if isinstance(rows, slice) else rows.numel()


def add_on_rows(base: torch.Tensor, lora: IdentityLoRA | None, part: str, x: torch.Tensor,
                rows: slice | torch.Tensor | None, scale: float) -> torch.Tensor:
    """``base`` with ``scale * lora(x)`` added on the batch ``rows`` (the identity stream) and nowhere else.

    ``base`` is the layer's plain output for every row (``linear(x)``), made for this call: a slice of rows (the
    pipeline's; one block of the batch) gets the delta in place on its view of ``base``, an index tensor through
    ``index_add``. When every row is an identity row (the adapter method) the delta is added to the whole batch.
    """
    if lora is None or rows is None or scale == 0:
        return base
    batch = x.shape[0]
    count = row_count(rows, batch)
    if count == 0:
        return base
    if count == batch:  # rows are distinct: all of them means the whole batch
        return base + scale * lora.delta(part, x)
    if isinstance(rows, slice):
        base[rows].add_(lora.delta(part, x[rows]), alpha=scale)
        return base
    return base.index_add(0, rows, lora.delta(part, x.index_select(0, rows)), alpha=scale)


def lora_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(processor name, processor) of every attention layer, in ``unet.attn_processors`` order (IP numbering)."""
    from .attention import attention_layers

    return [(name, attn.processor) for name, attn in attention_layers(unet)]


def lora_rank(unet: nn.Module) -> int | None:
    """The rank of the identity LoRA installed on this UNet, or None when there is none."""
    for _, proc in lora_layers(unet):
        lora = getattr(proc, "id_lora", None)
        if lora is not None:
            return lora.rank
    return None


def expected_lora_state(unet: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The LoRA keys (IP numbering, without the ``ip_adapter.`` prefix) a rank-``rank`` LoRA for this UNet has,
    as shape-only (meta) tensors."""
    from .attention import attention_layers

    expected = {}
    for i, (_, attn) in enumerate(attention_layers(unet)):
        for linear_name, name in LORA_PARTS:
            linear = attn.get_submodule(linear_name)
            expected[f"{i}.{name}.down.weight"] = torch.empty(rank, linear.in_features, device="meta")
            expected[f"{i}.{name}.up.weight"] = torch.empty(linear.out_features, rank, device="meta")
    return expected


def split_lora_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the LoRA keys, every other key) of an ``ip_adapter`` dict: LoRA keys are ``{i}.<part>_lora.<down|up>...``."""
    lora = {k: v for k, v in state.items() if "_lora." in k}
    return lora, {k: v for k, v in state.items() if k not in lora}


def check_lora_state(unet: nn.Module, lora: dict[str, torch.Tensor], what: str) -> int:
    """Compare a LoRA's keys with this UNet's attention layers; return its rank.

    A LoRA that does not fit is refused with one sentence naming the first mismatch in layer order (a missing,
    unexpected or mis-shaped key), so a file made for another UNet, or a broken one, never half-applies.
    """
    downs = sorted(k for k in lora if k.endswith(".down.weight"))
    if not downs:
        raise ValueError(f"The LoRA in {what} has no '.down.weight' keys, so its rank cannot be read.")
    rank = int(lora[downs[0]].shape[0])
    expected = expected_lora_state(unet, rank)
    order = {k: n for n, k in enumerate(expected)}

    def position(key: str) -> tuple[int, int, str]:
        head = key.split(".")[0]
        return (int(head) if head.isdigit() else 10**9, order.get(key, 10**9), key)

    for key in sorted(set(expected) | set(lora), key=position):
        if key not in lora:
            problem = f"it has no {key} (a rank-{rank} LoRA on this UNet needs one)"
        elif key not in expected:
            problem = f"it has {key}, which no attention layer of this UNet takes"
        elif tuple(lora[key].shape) != tuple(expected[key].shape):
            problem = f"{key} is {tuple(lora[key].shape)}, this UNet's layer needs {tuple(expected[key].shape)}"
        else:
            continue
        raise ValueError(f"The LoRA in {what} does not match this UNet's attention layers: {problem}. Use the "
                         "adapter file made for this base model.")
    return rank


def install_id_lora(unet: nn.Module, lora: dict[str, torch.Tensor], what: str = "the file") -> int:
    """Give every attention processor the LoRA of its layer (checked first; nothing changes when it does not fit).

    ``lora``: the file's LoRA keys in IP numbering (``{i}.to_q_lora.down.weight`` ...). Returns the rank.
    """
    from .attention import attention_layers

    rank = check_lora_state(unet, lora, what)
    param = next(unet.parameters())
    for i, (_, attn) in enumerate(attention_layers(unet)):
        layer = IdentityLoRA(attn, rank)
        prefix = f"{i}."
        layer.load_state_dict({k[len(prefix):]: v for k, v in lora.items() if k.startswith(prefix)})
        attn.processor.id_lora = layer.to(device=param.device, dtype=param.dtype)
    return rank


def remove_id_lora(unet: nn.Module) -> None:
    """Take any identity LoRA off the processors (loading an adapter without one must not keep the last one's)."""
    for _, proc in lora_layers(unet):
        if getattr(proc, "id_lora", None) is not None:
            proc.id_lora = None


def id_lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The installed identity LoRA in IP numbering (``{i}.to_q_lora.down.weight`` ...); empty when there is none."""
    state = {}
    for i, (_, proc) in enumerate(lora_layers(unet)):
        lora = getattr(proc, "id_lora", None)
        if lora is not None:
            state.update({f"{i}.{k}": v for k, v in lora.state_dict().items()})
    return state
