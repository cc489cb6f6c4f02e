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
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from .backends import SDPA
from .id_lora import IdentityLoRA, add_on_rows, row_count
from .ops import adain_mean

Rows = slice | torch.Tensor  # batch rows: a slice (a view, from the pipeline) or an index tensor (a copy)


@dataclass(frozen=True)
class IDCall:
    """Per-call, per-step inputs of the identity processors (DESIGN 2.4, 2.5).

    ``id_rows`` are the batch rows of the identity stream; ``text_rows[i]`` is the text-stream row that
    ``id_rows[i]`` mixes with (same image, same CFG polarity), or None when the batch has no text stream.
    ``id_tokens[i]`` are the identity tokens of ``id_rows[i]``. Rows not in ``id_rows`` are computed stock (no
    identity branch, no identity LoRA); ``other_rows`` lists them (None: the text rows when the two cover the batch,
    else derived on the host). Rows are Python slices from the pipeline (stream-major batches make every stream one
    block, so the processors work on views, never copy rows out, and never read a tensor on the host) or index
    tensors (any rows; each use copies them).

    ``kv_cache``: a dict owned by one call, where each cross-attention layer keeps what does not change between
    its steps: the identity keys/values (under ``tokens_key``) and the text keys/values (under ``layout_key``).
    The pipeline names both per batch layout with strings, so under ``torch.compile`` dynamo sees constant keys
    and the same dict keys at every call (no guard on a tensor's identity, no recompilation).
    """

    id_rows: Rows
    id_tokens: torch.Tensor
    text_rows: Rows | None = None
    id_scale: float = 1.0
    semantic_scale: float = 1.0
    style_strength: float = 1.0
    mixing: bool = True  # this step is inside the mixing window
    mix_layers: tuple[str, ...] | None = None  # name prefixes of self-attention layers that mix; None = all
    adain_cross: bool = False  # AdaIN-mean on the image K/V of cross-attention as well (inside the mixing window)
    lora_scale: float = 1.0  # the identity LoRA's strength on the identity rows (ignored when none is installed)
    text_branch: bool = True  # False in identity-enhanced training: cross-attention is the image branch alone
    other_rows: Rows | None = None
    kv_cache: dict | None = field(default=None, compare=False, repr=False)
    tokens_key: str = "tokens"  # names ``id_tokens`` in kv_cache: the same string for the same tokens in a call
    layout_key: str = "layout"  # names the batch layout (its prompt rows) in kv_cache, likewise

    def mixes_in(self, layer: str) -> bool:
        if self.text_rows is None or not self.mixing:
            return False
        if self.semantic_scale == 0 and self.style_strength == 0:
            return False
        return self.mix_layers is None or layer.startswith(tuple(self.mix_layers))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _rows(x: torch.Tensor | None, rows: Rows) -> torch.Tensor | None:
    # A mask with batch 1 broadcasts over every row.
    return x if x is None or x.shape[0] == 1 else x[rows]


def _add_rows(out: torch.Tensor, rows: Rows, value: torch.Tensor, alpha: float) -> None:
    """``out[rows] += alpha * value`` in place (on a view for a slice)."""
    if isinstance(rows, slice):
        out[rows].add_(value, alpha=alpha)
    else:
        out.index_add_(0, rows, value, alpha=alpha)


def _other_rows(call: IDCall, batch: int) -> Rows:
    """The rows outside the identity stream: given by the pipeline; else the text rows when the counts say they
    are the rest of the batch; else (hand-built calls only) read from the rows on the host."""
    if call.other_rows is not None:
        return call.other_rows
    guess = call.text_rows if call.text_rows is not None else slice(0, 0)
    if row_count(call.id_rows, batch) + row_count(guess, batch) == batch:
        return guess
    ids = call.id_rows
    taken = set(range(batch)[ids]) if isinstance(ids, slice) else set(ids.tolist())
    device = None if isinstance(ids, slice) else ids.device
    return torch.tensor([r for r in range(batch) if r not in taken], dtype=torch.long, device=device)


def _covers_batch(rows: Rows, batch: int) -> bool:
    if isinstance(rows, slice):
        return range(batch)[rows] == range(batch)
    return rows.numel() == batch and torch.equal(rows.sort().values.cpu(), torch.arange(batch))


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

    def _lora_rows(self, id_call: IDCall | None) -> tuple[Rows | None, float]:
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

    def _attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias=None) -> torch.Tensor:
        """Attention of ``[b, n, C]`` projections through the backend: ``[b, heads, n, d]``."""
        qh, kh = self._qk_norm(attn, _heads(q, attn.heads), _heads(k, attn.heads))
        return self.backend(qh, kh, _heads(v, attn.heads), bias)


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
        batch, n, _ = hidden_states.shape
        mask = self._mask(attn, attention_mask, context.shape[1], batch)
        q = self._project(attn, "to_q_lora", hidden_states, id_call)
        k = self._project(attn, "to_k_lora", context, id_call)
        v = self._project(attn, "to_v_lora", context, id_call)

        if id_call is None or not id_call.mixes_in(self.name):
            return self._leave(attn, _merge(self._attend(attn, q, k, v, mask)), residual, shape, id_call)

        ids, texts, others = id_call.id_rows, id_call.text_rows, _other_rows(id_call, batch)
        # Each part's output is written once, transposed, into [b, n, heads, d]: the copy _merge makes anyway.
        out = q.new_empty(batch, n, attn.heads, q.shape[-1] // attn.heads)
        if row_count(others, batch):
            # Every row outside the identity stream is plain attention, as diffusers computes it.
            out[others] = self._attend(attn, q[others], k[others], v[others], _rows(mask, others)).transpose(1, 2)
        id_mask = _rows(mask, ids)
        if id_mask is not None and id_call.semantic_scale > 0:
            id_mask = torch.cat([id_mask, _rows(mask, texts)], dim=-1)
        mixed = self._mixed(attn, q[ids], (k[ids], v[ids]), (k[texts], v[texts]), id_mask, id_call)
        out[ids] = mixed.transpose(1, 2)
        return self._leave(attn, out.view(batch, n, -1), residual, shape, id_call)

    def _mixed(self, attn: Attention, q: torch.Tensor, own: tuple, text: tuple, mask, call: IDCall) -> torch.Tensor:
        """Attention of the identity rows ``q`` ``[P, n, C]`` over their own keys/values (``own``, AdaIN-shifted
        towards ``text``'s means) and, with weight ``w = semantic_scale``, the text rows' (``text``): ``[P, h, n, d]``.
        """
        w, strength = call.semantic_scale, call.style_strength
        if w > 0 and mask is None and getattr(self.backend, "merges_two_calls", False):
            # Two bias-free calls merged through their log-sum-exp (xformers): no concatenation, no bias tensor.
            k_id, v_id = (adain_mean(x, t, strength) for x, t in zip(own, text))
            qh, k1 = self._qk_norm(attn, _heads(q, attn.heads), _heads(k_id, attn.heads))
            k2 = _heads(text[0], attn.heads)
            k2 = k2 if attn.norm_k is None else attn.norm_k(k2)
            v1, v2 = _heads(v_id, attn.heads), _heads(text[1], attn.heads)
            return self.backend.mixed(qh, k1, v1, k2, v2, math.log(w))
        n_own = own[0].shape[1]
        kv = []
        for x, t in zip(own, text):
            if w == 0:  # the text keys are dropped entirely: no mixing, AdaIN-mean only
                kv.append(adain_mean(x, t, strength))
                continue
            # [AdaIN_m(x, t) ; t] on the token axis, AdaIN written straight into the concatenation buffer.
            buf = x.new_empty(x.shape[0], n_own + t.shape[1], x.shape[2])
            adain_mean(x, t, strength, out=buf[:, :n_own])
            buf[:, n_own:] = t
            kv.append(buf)
        bias = None
        if w > 0 and w != 1:
            bias = torch.zeros(1, 1, 1, kv[0].shape[1], dtype=q.dtype, device=q.device)
            bias[..., n_own:] = math.log(w)
        if mask is not None:
            bias = mask if bias is None else mask + bias
        return self._attend(attn, q, kv[0], kv[1], bias)


class IDCrossAttnProcessor(_Processor):
    """Cross-attention (``attn2``): ``Attn(Q, K_text, V_text) + id_scale * Attn(Q, K_id, V_id)`` on ID rows.

    ``to_k_ip``/``to_v_ip`` project identity tokens into this layer's keys and values (IP-Adapter layout).
    With ``id_call.text_branch`` False (training), the text branch is not computed at all: the output is the
    image branch alone, so the prompt cannot influence it. The identity LoRA (if any) acts on the ID rows' q, text
    k/v and output (not on ``to_k_ip``/``to_v_ip``), as in the authors' FaceID processors. ``adain_cross`` moves the
    image K/V means towards the same row's text K/V, inside the mixing window of a two-stream call only.
    Both key/value pairs are the same at every step of a call: with ``id_call.kv_cache`` each is projected once.
    """

    def __init__(self, name: str, hidden_size: int, cross_attention_dim: int, backend=None):
        super().__init__(name, backend)
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, id_call=None):
        hidden_states, residual, shape = self._enter(attn, hidden_states, temb)
        batch, n, _ = hidden_states.shape
        q = self._project(attn, "to_q_lora", hidden_states, id_call)
        text_branch = id_call is None or id_call.text_branch

        if text_branch:
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            mask = self._mask(attn, attention_mask, context.shape[1], batch)
            k, v = self.text_kv(attn, hidden_states, encoder_hidden_states, id_call)
            text = self._attend(attn, q, k, v, mask)
            if id_call is None or id_call.id_scale == 0:
                return self._leave(attn, _merge(text), residual, shape, id_call)
            out = text.transpose(1, 2).contiguous()  # [b, n, heads, d]: the image branch is added in place
        else:
            if not _covers_batch(id_call.id_rows, batch):
                raise ValueError("With the text branch off (training mode) every batch row must be an identity row.")
            out = q.new_zeros(batch, n, attn.heads, q.shape[-1] // attn.heads)

        ids = id_call.id_rows
        ip_k, ip_v, ip_bias = self.identity_kv(id_call, q.dtype)
        if id_call.adain_cross and text_branch and id_call.mixing and id_call.text_rows is not None:
            tokens = id_call.id_tokens.shape[1]
            ip_k, ip_v = (_adain_padded(x, t[ids], tokens, id_call.style_strength) for x, t in ((ip_k, k), (ip_v, v)))
        image = self._attend(attn, q[ids], ip_k, ip_v, ip_bias)
        _add_rows(out, ids, image.transpose(1, 2), id_call.id_scale if text_branch else 1.0)
        return self._leave(attn, out.view(batch, n, -1), residual, shape, id_call)

    def text_kv(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                id_call: IDCall | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The text branch's keys and values ``[b, tokens, C]`` (identity LoRA on the identity rows), from the
        call's cache when it has them (the prompt rows of a layout do not change between steps)."""
        cache = None if id_call is None or encoder_hidden_states is None else id_call.kv_cache
        key = (self.name, "text", id_call.layout_key) if cache is not None else None
        if key is not None and key in cache:
            return cache[key]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        kv = self._project(attn, "to_k_lora", context, id_call), self._project(attn, "to_v_lora", context, id_call)
        return _stored(cache, key, kv)

    def identity_kv(self, id_call: IDCall, dtype: torch.dtype):
        """(keys, values, bias) of the identity tokens, ``[P, tokens, C]`` each, projected once per call.

        Where the backend wants a key multiple (CPU: 16), the tokens are padded with zero keys/values and ``bias``
        puts -inf on the padding (exactly the same softmax); else ``bias`` is None."""
        cache = id_call.kv_cache
        key = (self.name, "identity", id_call.tokens_key) if cache is not None else None
        if key is not None and key in cache:
            return cache[key]
        tokens = id_call.id_tokens.to(dtype)
        k, v, bias = self.to_k_ip(tokens), self.to_v_ip(tokens), None
        multiple = getattr(self.backend, "key_multiple", None)
        pad = -k.shape[1] % multiple(k.device) if multiple is not None else 0
        if pad:
            k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
            bias = torch.zeros(1, 1, 1, k.shape[1], dtype=k.dtype, device=k.device)
            bias[..., -pad:] = float("-inf")
        return _stored(cache, key, (k, v, bias))


def _stored(cache: dict | None, key, value):
    # Under torch.compile the cache is filled before the graph runs (fill_kv_cache): a store from inside the graph
    # would change the dict's keys between steps and recompile.
    if key is not None and not torch.compiler.is_compiling():
        cache[key] = value
    return value


def _adain_padded(x: torch.Tensor, target: torch.Tensor, tokens: int, strength: float) -> torch.Tensor:
    """AdaIN-mean of the first ``tokens`` tokens of ``x`` (the rest is zero padding, masked out) towards
    ``target``, into a new buffer whose padding stays zero."""
    if x.shape[1] == tokens:
        return adain_mean(x, target, strength)
    buf = x.new_zeros(x.shape)
    adain_mean(x[:, :tokens], target, strength, out=buf[:, :tokens])
    return buf


def fill_kv_cache(unet: nn.Module, id_call: IDCall | None, encoder_hidden_states: torch.Tensor | None) -> None:
    """Project every cross-attention layer's identity keys/values (and text keys/values) into ``id_call.kv_cache``
    now, outside any graph: what a compiled UNet's pre-hook does (``models.loading.compile_unet``), so the graph
    always finds the cache full and is the same graph at every step and call of a batch layout.

    The text keys/values are filled only when the UNet hands ``encoder_hidden_states`` to its attention layers
    unchanged (no ``encoder_hid_proj``); otherwise the compiled layers compute them in the graph, every step."""
    if id_call is None or id_call.kv_cache is None:
        return
    text = id_call.text_branch and encoder_hidden_states is not None and getattr(unet, "encoder_hid_proj", 0) is None
    dtype = encoder_hidden_states.dtype if encoder_hidden_states is not None else unet.dtype  # the processors' q's
    for _, attn in attention_layers(unet):
        proc = attn.processor
        if isinstance(proc, IDCrossAttnProcessor):
            proc.identity_kv(id_call, dtype)
            if text:
                proc.text_kv(attn, encoder_hidden_states, encoder_hidden_states, id_call)


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
