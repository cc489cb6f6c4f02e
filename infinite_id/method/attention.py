"""Attention processors of Infinite-ID: ID cross-attention and mixed self-attention.

The processors are installed once on the UNet and stay there. They hold only their own weights
(``to_k_ip``/``to_v_ip``, and ``id_lora`` when the adapter carries a LoRA: see ``id_lora``) and their layer name.
Everything that belongs to one call (knobs, the current step, which batch rows form which stream, the identity
tokens) arrives as an :class:`IDCall` through the UNet's ``cross_attention_kwargs``, so two requests sharing a
pipeline cannot leak into each other. Without an ``IDCall`` every processor computes exactly what diffusers' stock
SDPA processor computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from .backends import SDPA
from .id_lora import IdentityLoRA, add_on_rows
from .ops import adain_mean


@dataclass(frozen=True)
class IDCall:
    """Per-call, per-step inputs of the identity processors (DESIGN 2.4, 2.5).

    ``id_rows`` are the batch rows of the identity stream; ``text_rows[i]`` is the text-stream row that
    ``id_rows[i]`` mixes with (same image, same CFG polarity), or None when the batch has no text stream.
    ``id_tokens[i]`` are the identity tokens of ``id_rows[i]``. Rows not in ``id_rows`` are computed stock (no
    identity branch, no identity LoRA);
    ``other_rows`` lists them (the pipeline knows them; None: derived here, at the cost of a host sync).
    ``ip_cache``: a dict owned by one call, in which each layer keeps its identity keys/values once projected
    (the tokens do not change between steps, so projecting them every step would be wasted work).
    """

    id_rows: torch.Tensor
    id_tokens: torch.Tensor
    text_rows: torch.Tensor | None = None
    id_scale: float = 1.0
    semantic_scale: float = 1.0
    style_strength: float = 1.0
    mixing: bool = True  # this step is inside the mixing window
    mix_layers: tuple[str, ...] | None = None  # name prefixes of self-attention layers that mix; None = all
    adain_cross: bool = False  # AdaIN-mean on the image K/V of cross-attention as well (inside the mixing window)
    lora_scale: float = 1.0  # the identity LoRA's strength on the identity rows (ignored when none is installed)
    text_branch: bool = True  # False in identity-enhanced training: cross-attention is the image branch alone
    other_rows: torch.Tensor | None = None
    ip_cache: dict | None = field(default=None, compare=False, repr=False)

    def mixes_in(self, layer: str) -> bool:
        if self.text_rows is None or not self.mixing:
            return False
        if self.semantic_scale == 0 and self.style_strength == 0:
            return False
        return self.mix_layers is None or layer.startswith(tuple(self.mix_layers))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              backend=SDPA) -> torch.Tensor:
    """Scaled dot-product attention on ``[batch, heads, tokens, head_dim]``; ``bias`` is added to the logits.

    ``backend`` (``method.backends``) is chosen once when the pipeline is built and travels with the processors;
    nothing is looked up per call."""
    return backend(q, k, v, bias)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _rows(x: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    # A mask with batch 1 broadcasts over every row.
    return x if x is None or x.shape[0] == 1 else x.index_select(0, rows)


class _Processor(nn.Module):
    """The parts of diffusers' AttnProcessor2_0 around the attention itself, shared by both processors.

    ``backend``: the attention kernel (``method.backends``), set when the processors are installed or the pipeline
    is loaded, the same for every call; a class default so processors built without ``__init__`` have one too.
    ``id_lora``: the identity LoRA of the loaded adapter, if it carries one (``id_lora``)."""

    backend = SDPA
    id_lora: IdentityLoRA | None

    def __init__(self, name: str, backend=None):
        super().__init__()
        self.name = name
        if backend is not None:
            self.backend = backend
        self.register_module("id_lora", None)  # an IdentityLoRA when the loaded adapter carries one

    def _lora_rows(self, id_call: IDCall | None) -> tuple[torch.Tensor | None, float]:
        """The rows the identity LoRA acts on and its scale: (None, 0) when it does not act in this call."""
        if id_call is None or self.id_lora is None or id_call.lora_scale == 0:
            return None, 0.0
        return id_call.id_rows, id_call.lora_scale

    def _project(self, attn: Attention, part: str, x: torch.Tensor, id_call: IDCall | None) -> torch.Tensor:
        """``attn.<linear>(x)`` for every row, plus the identity LoRA's delta on the identity rows."""
        linear = {"to_q_lora": attn.to_q, "to_k_lora": attn.to_k, "to_v_lora": attn.to_v}[part]
        rows, scale = self._lora_rows(id_call)
        return add_on_rows(linear(x), self.id_lora, part, x, rows, scale)

    @staticmethod
    def _enter(attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = hidden_states.shape
        if hidden_states.ndim == 4:
            b, c, h, w = shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, residual, shape

    def _leave(self, attn: Attention, out: torch.Tensor, residual: torch.Tensor, shape: torch.Size,
               id_call: IDCall | None = None) -> torch.Tensor:
        # The output LoRA acts on the summed branches, before dropout, as in the authors' FaceID processors.
        rows, scale = self._lora_rows(id_call)
        out = attn.to_out[1](add_on_rows(attn.to_out[0](out), self.id_lora, "to_out_lora", out, rows, scale))
        if len(shape) == 4:
            out = out.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _mask(attn: Attention, attention_mask, source_len: int, batch: int):
        if attention_mask is None:
            return None
        mask = attn.prepare_attention_mask(attention_mask, source_len, batch)
        return mask.view(batch, attn.heads, -1, mask.shape[-1])

    @staticmethod
    def _qk_norm(attn: Attention, q: torch.Tensor, k: torch.Tensor):
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return q, k


class MixedSelfAttnProcessor(_Processor):
    """Self-attention (``attn1``). ID-stream rows attend to ``[K_id ; K_t]``, ``[V_id ; V_t]``.

    ``K_t, V_t`` come from the paired text-stream row of the same layer and step. ``semantic_scale`` w enters as a
    logit bias ``log(w)`` on the text-stream keys (w = 0 drops them: no mixing). ``style_strength`` is the amount
    of AdaIN-mean applied to the ID stream's keys and values towards the text stream's before concatenation. The
    identity LoRA (if any) acts on the ID rows' q, k, v and output only: ``K_t, V_t`` stay the text stream's own.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, id_call=None):
        hidden_states, residual, shape = self._enter(attn, hidden_states, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch = hidden_states.shape[0]
        mask = self._mask(attn, attention_mask, context.shape[1], batch)
        q = self._project(attn, "to_q_lora", hidden_states, id_call)
        k = self._project(attn, "to_k_lora", context, id_call)
        v = self._project(attn, "to_v_lora", context, id_call)

        if id_call is None or not id_call.mixes_in(self.name):
            qh, kh = self._qk_norm(attn, _heads(q, attn.heads), _heads(k, attn.heads))
            out = self.backend(qh, kh, _heads(v, attn.heads), mask)
            return self._leave(attn, _merge(out), residual, shape, id_call)

        ids, texts = id_call.id_rows, id_call.text_rows
        others = id_call.other_rows if id_call.other_rows is not None else _complement(ids, batch)
        out = torch.empty_like(q)
        if others.numel():
            # Every row outside the identity stream is plain attention, as diffusers computes it.
            qh, kh = self._qk_norm(attn, _heads(q[others], attn.heads), _heads(k[others], attn.heads))
            rows_out = self.backend(qh, kh, _heads(v[others], attn.heads), _rows(mask, others))
            out = out.index_copy(0, others, _merge(rows_out))

        k_id, v_id, k_t, v_t = k[ids], v[ids], k[texts], v[texts]
        if id_call.style_strength:
            k_id = adain_mean(k_id, k_t, id_call.style_strength)
            v_id = adain_mean(v_id, v_t, id_call.style_strength)
        bias = None
        if id_call.semantic_scale > 0:
            n_id = k_id.shape[1]
            k_id, v_id = torch.cat([k_id, k_t], dim=1), torch.cat([v_id, v_t], dim=1)
            if id_call.semantic_scale != 1:
                bias = torch.zeros(1, 1, 1, k_id.shape[1], dtype=q.dtype, device=q.device)
                bias[..., n_id:] = math.log(id_call.semantic_scale)
        id_mask = _rows(mask, ids)
        if id_mask is not None:
            text_mask = _rows(mask, texts)
            id_mask = torch.cat([id_mask, text_mask], dim=-1) if k_id.shape[1] > id_mask.shape[-1] else id_mask
            bias = id_mask if bias is None else id_mask + bias
        qh, kh = self._qk_norm(attn, _heads(q[ids], attn.heads), _heads(k_id, attn.heads))
        id_out = self.backend(qh, kh, _heads(v_id, attn.heads), bias)
        out = out.index_copy(0, ids, _merge(id_out))
        return self._leave(attn, out, residual, shape, id_call)


class IDCrossAttnProcessor(_Processor):
    """Cross-attention (``attn2``): ``Attn(Q, K_text, V_text) + id_scale * Attn(Q, K_id, V_id)`` on ID rows.

    ``to_k_ip``/``to_v_ip`` project identity tokens into this layer's keys and values (IP-Adapter layout).
    With ``id_call.text_branch`` False (training), the text branch is not computed at all: the output is the
    image branch alone, so the prompt cannot influence it. The identity LoRA (if any) acts on the ID rows' q, text
    k/v and output (not on ``to_k_ip``/``to_v_ip``), as in the authors' FaceID processors. ``adain_cross`` moves the
    image K/V means towards the same row's text K/V, inside the mixing window of a two-stream call only.
    """

    def __init__(self, name: str, hidden_size: int, cross_attention_dim: int, backend=None):
        super().__init__(name, backend)
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, id_call=None):
        hidden_states, residual, shape = self._enter(attn, hidden_states, temb)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        q = self._project(attn, "to_q_lora", hidden_states, id_call)
        text_branch = id_call is None or id_call.text_branch

        if text_branch:
            mask = self._mask(attn, attention_mask, context.shape[1], batch)
            k = self._project(attn, "to_k_lora", context, id_call)
            v = self._project(attn, "to_v_lora", context, id_call)
            qh, kh = self._qk_norm(attn, _heads(q, attn.heads), _heads(k, attn.heads))
            out = _merge(self.backend(qh, kh, _heads(v, attn.heads), mask))
            if id_call is None or id_call.id_scale == 0:
                return self._leave(attn, out, residual, shape, id_call)
        else:
            rows = id_call.id_rows
            if rows.numel() != batch or not torch.equal(rows.sort().values.cpu(), torch.arange(batch)):
                raise ValueError("With the text branch off (training mode) every batch row must be an identity row.")
            out = torch.zeros_like(q)

        ids = id_call.id_rows
        ip_k, ip_v = self._identity_kv(id_call, q.dtype)
        if id_call.adain_cross and text_branch and id_call.mixing and id_call.text_rows is not None:
            ip_k = adain_mean(ip_k, k[ids], id_call.style_strength)
            ip_v = adain_mean(ip_v, v[ids], id_call.style_strength)
        qh = _heads(q[ids], attn.heads)
        qh, kh = self._qk_norm(attn, qh, _heads(ip_k, attn.heads))
        image = _merge(self.backend(qh, kh, _heads(ip_v, attn.heads)))
        scale = id_call.id_scale if text_branch else 1.0
        out = out.index_add(0, ids, image, alpha=scale)
        return self._leave(attn, out, residual, shape, id_call)

    def _identity_kv(self, id_call: IDCall, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cache = id_call.ip_cache
        # id() only when there is a cache: torch.compile runs without one (models.loading.compile_unet) because
        # dynamo guards on the identity of the tokens, which would recompile the UNet at every call.
        key = None if cache is None else (self.name, id(id_call.id_tokens))
        if key is not None and key in cache:
            return cache[key]
        tokens = id_call.id_tokens.to(dtype)
        kv = self.to_k_ip(tokens), self.to_v_ip(tokens)
        if key is not None:
            cache[key] = kv
        return kv


def _complement(rows: torch.Tensor, batch: int) -> torch.Tensor:
    keep = torch.ones(batch, dtype=torch.bool, device=rows.device)
    keep[rows] = False
    return keep.nonzero().flatten()


def attention_layers(unet: nn.Module) -> list[tuple[str, Attention]]:
    """The UNet's attention modules in ``unet.attn_processors`` order (processor name, module)."""
    return [(f"{name}.processor", m) for name, m in unet.named_modules() if isinstance(m, Attention)]


def install_id_processors(unet: nn.Module, cross_attention_dim: int | None = None, backend=None) -> None:
    """Give every ``attn1`` a mixed self-attention processor and every ``attn2`` an ID cross-attention one.

    Done once when a pipeline is built; processors that are already ours are kept with their weights (and their
    backend, unless ``backend`` is given: ``method.backends``, default SDPA).
    """
    cross_dim = cross_attention_dim or unet.config.cross_attention_dim
    param = next(unet.parameters())
    processors = {}
    for name, module in attention_layers(unet):
        current = module.processor
        if name.endswith("attn2.processor") and module.is_cross_attention:
            if isinstance(current, IDCrossAttnProcessor):
                processors[name] = current
            else:
                proc = IDCrossAttnProcessor(name, module.to_k.out_features, cross_dim)
                processors[name] = proc.to(device=param.device, dtype=param.dtype)
        else:
            processors[name] = current if isinstance(current, MixedSelfAttnProcessor) else MixedSelfAttnProcessor(name)
    unet.set_attn_processor(processors)
    if backend is not None:
        set_attention_backend(unet, backend)


def set_attention_backend(unet: nn.Module, backend) -> int:
    """Load time only: every Infinite-ID processor of ``unet`` computes attention with ``backend`` from now on.
    Returns how many processors were set."""
    processors = [p for p in unet.attn_processors.values() if isinstance(p, _Processor)]
    for proc in processors:
        proc.backend = backend
    return len(processors)


def id_adapter_layers(unet: nn.Module) -> dict[int, IDCrossAttnProcessor]:
    """ID cross-attention processors keyed by IP-Adapter numbering (position in ``unet.attn_processors``)."""
    layers = {i: p for i, p in enumerate(unet.attn_processors.values()) if isinstance(p, IDCrossAttnProcessor)}
    if not layers:
        raise ValueError("This UNet has no identity cross-attention layers; call install_id_processors(unet) first.")
    return layers


def check_installed(unet: nn.Module) -> None:
    """Fail clearly when something (e.g. enable_xformers_memory_efficient_attention) replaced our processors."""
    wrong = [n for n, p in unet.attn_processors.items() if not isinstance(p, MixedSelfAttnProcessor | IDCrossAttnProcessor)]
    if wrong:
        raise RuntimeError(
            f"{len(wrong)} attention processors of the UNet are not Infinite-ID's (first: {wrong[0]}); something "
            "replaced them after the pipeline was built. Rebuild the pipeline instead of calling set_attn_processor."
        )


def layer_names(unet: nn.Module, kind: str = "attn1") -> Sequence[str]:
    return [n for n in unet.attn_processors if n.endswith(f"{kind}.processor")]
