"""Prototype of faster Infinite-ID attention processors, for measurement only (not used by the package).

Same maths as ``infinite_id.method.attention``; three changes, each aimed at a cost the benchmark found:

1. **Row slices instead of index tensors.** The pipeline's batch layout is regular, so each stream's rows are a
   Python ``slice`` (``[text_u, id_u, text_c, id_c]`` -> text ``0::2``, id ``1::2``). Slicing gives views:
   no ``index_select`` copies of q/k/v, no out-of-place ``index_copy``/``index_add`` of the whole output, and no
   ``nonzero()`` (``_complement``), which is a device->host sync per layer on CUDA and a graph break under
   ``torch.compile``. Each part's attention output is written once, transposed, into one ``[b, n, h, d]`` buffer,
   which is the copy stock ``_merge`` makes anyway.
2. **AdaIN-mean written straight into the concatenated K/V buffer** (``torch.add(..., out=buf[:, :n])``) instead
   of building the shifted keys and then concatenating them (one copy fewer per K and per V), with the means as
   ``sum / n``: on CPU ``mean()`` of a bf16 tensor first copies the whole tensor to fp32.
3. **Identity K/V projected once per call, not once per step.** ``to_k_ip``/``to_v_ip`` of the 261 identity
   tokens do not change across steps; at 512 px they are ~11% of a plain CFG step's FLOPs (70 layers x 2 rows x
   261 tokens x 2048 -> C). Cached per call, keyed by the token tensor.
4. **On CPU, identity keys padded to a multiple of 16** (261 -> 272) with a -inf bias on the padding: torch's
   CPU flash-attention kernel runs 2.6-3.7x slower on 261 keys than on 272 (bf16, measured here). Not on CUDA,
   where a mask would move SDPA off the flash kernel.
5. (Optional, ``patched(text_kv=True)``.) **Text K/V once per call**: the prompt embeddings do not change across
   steps either, so every cross-attention's ``to_k``/``to_v`` of the 77 text tokens can be computed once. Plain
   SDXL could do the same (diffusers does not), so it is kept apart from 1-4 in the figures.

In the package the slices and the cache would travel in ``IDCall`` (built by the pipeline from ``_Layout``,
which knows the rows without reading any tensor); here :func:`patched` swaps the pipeline's ``IDCall`` for
:class:`FastIDCall`, which derives them from the index tensors once per step (one host read per step).
Anything the fast path does not cover (attention masks, q/k norms, ``adain_cross``, training mode, irregular
rows) falls back to the package's processor, so outputs stay correct.

``python benchmarks/attention_proto.py`` times single SDXL attention layers (stock / package / prototype) at the
shapes of a 512 px (or ``--resolution``) image and checks the prototype against the package's processors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import infinite_id.method.pipeline as pipeline_module  # noqa: E402
from infinite_id.method.attention import (  # noqa: E402
    IDCall,
    IDCrossAttnProcessor,
    MixedSelfAttnProcessor,
    _heads,
)

# ----------------------------------------------------------------------------------------------- per-call inputs


def _as_slice(rows: list[int]) -> slice | None:
    """``rows`` as a slice when they form an increasing arithmetic progression, else None."""
    if not rows:
        return None
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    if step <= 0 or any(b - a != step for a, b in zip(rows, rows[1:])):
        return None
    return slice(rows[0], rows[-1] + 1, step)


# Per-call K/V caches: one entry per input tensor that stays the same for a whole call and batch layout (the
# identity tokens; the prompt embeddings). The entry holds the tensor itself, so its id() cannot be reused while
# the entry lives; a few entries cover the calls in flight.
_IP_CACHE: OrderedDict[int, tuple[torch.Tensor, dict]] = OrderedDict()
_IP_CACHE_SIZE = 8
# Option 5 (off unless patched(text_kv=True)): the text K/V of every cross-attention computed once per call.
_TEXT_KV = {"on": False}


def _ip_cache_for(tensor: torch.Tensor) -> dict:
    entry = _IP_CACHE.get(id(tensor))
    if entry is None or entry[0] is not tensor:
        entry = (tensor, {})
        _IP_CACHE[id(tensor)] = entry
        while len(_IP_CACHE) > _IP_CACHE_SIZE:
            _IP_CACHE.popitem(last=False)
    return entry[1]


@dataclasses.dataclass(frozen=True)
class FastIDCall(IDCall):
    """IDCall plus the row slices and the per-call identity K/V cache (derived once per step from the indices)."""

    id_slice: slice | None = None
    text_slice: slice | None = None
    other_slice: slice | None = None
    batch_rows: int = 0
    ip_cache: dict | None = None

    @classmethod
    def build(cls, **kwargs) -> FastIDCall:
        call = cls(**kwargs)
        ids = call.id_rows.tolist()
        texts = call.text_rows.tolist() if call.text_rows is not None else []
        batch = len(ids) + len(texts)  # the pipeline's batches hold the ID rows and (when mixing) the text rows
        others = sorted(set(range(batch)) - set(ids))
        extra = {
            "id_slice": _as_slice(ids),
            "text_slice": _as_slice(texts),
            "other_slice": _as_slice(others),
            "batch_rows": batch,
            "ip_cache": _ip_cache_for(call.id_tokens),
        }
        for key, value in extra.items():
            object.__setattr__(call, key, value)
        return call


@contextlib.contextmanager
def patched(text_kv: bool = False):
    """Within the block, InfiniteIDPipeline builds FastIDCall objects (benchmark use only; not thread-safe).
    ``text_kv``: also compute each cross-attention's text K/V once per call (option 5)."""
    original = pipeline_module.IDCall
    pipeline_module.IDCall = FastIDCall.build
    _TEXT_KV["on"] = text_kv
    try:
        yield
    finally:
        pipeline_module.IDCall = original
        _TEXT_KV["on"] = False
        _IP_CACHE.clear()


# ----------------------------------------------------------------------------------------------- processors

CPU_KEY_MULTIPLE = 16


def _plain(attn: Attention) -> bool:
    # The fast paths cover SDXL's attention layers: no q/k norm, no spatial norm, no residual inside attention.
    return attn.norm_q is None and attn.norm_k is None and attn.spatial_norm is None and not attn.residual_connection


class FastMixedSelfAttnProcessor(MixedSelfAttnProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, id_call=None):
        fast = (
            isinstance(id_call, FastIDCall) and id_call.mixes_in(self.name) and attention_mask is None
            and encoder_hidden_states is None and _plain(attn) and hidden_states.ndim == 3
            and id_call.id_slice is not None and id_call.text_slice is not None
            and hidden_states.shape[0] == id_call.batch_rows
        )
        if not fast:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, id_call)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch, n, _ = hidden_states.shape
        heads = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        out = q.new_empty(batch, n, heads, q.shape[-1] // heads)  # [b, n, h, d]: parts land here transposed

        ids, texts, others = id_call.id_slice, id_call.text_slice, id_call.other_slice
        if others is not None:
            # Rows outside the identity stream: plain attention on views of q/k/v.
            part = self.backend(_heads(q[others], heads), _heads(k[others], heads), _heads(v[others], heads))
            out[others] = part.transpose(1, 2)

        k_mix, v_mix = self._mixed_kv(k[ids], k[texts], id_call), self._mixed_kv(v[ids], v[texts], id_call)
        bias = None
        if id_call.semantic_scale > 0 and id_call.semantic_scale != 1:
            bias = torch.zeros(1, 1, 1, k_mix.shape[1], dtype=q.dtype, device=q.device)
            bias[..., n:] = math.log(id_call.semantic_scale)
        part = self.backend(_heads(q[ids], heads), _heads(k_mix, heads), _heads(v_mix, heads), bias)
        out[ids] = part.transpose(1, 2)
        return self._leave(attn, out.view(batch, n, -1), hidden_states, hidden_states.shape)

    @staticmethod
    def _mixed_kv(own: torch.Tensor, text: torch.Tensor, call: IDCall) -> torch.Tensor:
        """``[AdaIN_m(own, text) ; text]`` on the token axis, built in one buffer (text dropped when w = 0)."""
        n = own.shape[1]
        width = 2 * n if call.semantic_scale > 0 else n
        buf = own.new_empty(own.shape[0], width, own.shape[2])
        if call.style_strength:
            # sum / n, not mean(): on CPU, mean() of a bf16 tensor first copies all of it to fp32 (about 10% of
            # this processor's time at 512 px); sum() accumulates in fp32 without the copy.
            shift = (text.sum(dim=1, keepdim=True) - own.sum(dim=1, keepdim=True)) / n
            if torch.compiler.is_compiling():
                buf[:, :n] = own + call.style_strength * shift  # inductor fuses this; dynamo cannot trace ``out=``
            else:
                torch.add(own, shift, alpha=call.style_strength, out=buf[:, :n])  # eager: one pass, no temporary
        else:
            buf[:, :n] = own
        if width > n:
            buf[:, n:] = text
        return buf


class FastIDCrossAttnProcessor(IDCrossAttnProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, id_call=None):
        fast = (
            isinstance(id_call, FastIDCall) and id_call.text_branch and not id_call.adain_cross
            and id_call.id_slice is not None and attention_mask is None and encoder_hidden_states is not None
            and not attn.norm_cross and _plain(attn) and hidden_states.ndim == 3
            and hidden_states.shape[0] == id_call.batch_rows
        )
        if not fast:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, id_call)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch, n, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k, v = self._text_kv(attn, encoder_hidden_states)
        out = self.backend(_heads(q, heads), _heads(k, heads), _heads(v, heads)).transpose(1, 2).contiguous()
        if id_call.id_scale:
            ip_k, ip_v, bias = self._ip_kv(id_call, q.dtype)
            image = self.backend(_heads(q[id_call.id_slice], heads), _heads(ip_k, heads), _heads(ip_v, heads), bias)
            out[id_call.id_slice].add_(image.transpose(1, 2), alpha=id_call.id_scale)  # in place, on a view
        return self._leave(attn, out.view(batch, n, -1), hidden_states, hidden_states.shape)

    def _text_kv(self, attn: Attention, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not _TEXT_KV["on"] or torch.compiler.is_compiling():
            return attn.to_k(context), attn.to_v(context)
        cache = _ip_cache_for(context)  # the pipeline passes the same prompt tensor at every step of a layout
        if self.name not in cache:
            cache[self.name] = (attn.to_k(context), attn.to_v(context))
        return cache[self.name]

    def _ip_kv(self, call: FastIDCall, dtype: torch.dtype):
        """The identity keys/values of this layer, projected once per call; on CPU padded to a multiple of 16
        tokens with a -inf bias on the padding (the CPU flash kernel is ~3x slower on 261 keys than on 272)."""
        cached = call.ip_cache.get(self.name)
        if cached is None:
            tokens = call.id_tokens.to(dtype)
            k, v, bias = self.to_k_ip(tokens), self.to_v_ip(tokens), None
            pad = -k.shape[1] % CPU_KEY_MULTIPLE if k.device.type == "cpu" else 0
            if pad:
                k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
                bias = torch.zeros(1, 1, 1, k.shape[1], dtype=k.dtype, device=k.device)
                bias[..., -pad:] = float("-inf")
            cached = call.ip_cache[self.name] = (k, v, bias)
        return cached


def install_fast_processors(unet, backend=None) -> dict:
    """Swap the package's processors for the prototype's, sharing their weights (and the attention backend, or
    ``backend`` when given). Returns the previous ones."""
    previous = dict(unet.attn_processors)
    fast = {}
    for name, proc in previous.items():
        if isinstance(proc, IDCrossAttnProcessor):
            new = FastIDCrossAttnProcessor.__new__(FastIDCrossAttnProcessor)
            torch.nn.Module.__init__(new)
            new.name, new.to_k_ip, new.to_v_ip = proc.name, proc.to_k_ip, proc.to_v_ip
            new.id_lora = proc.id_lora  # shared too (None unless an adapter brought a LoRA)
        elif isinstance(proc, MixedSelfAttnProcessor):
            new = FastMixedSelfAttnProcessor(proc.name)
        else:
            new = proc
        if new is not proc:
            new.backend = backend or proc.backend
        fast[name] = new
    unet.set_attn_processor(fast)
    return previous


# ----------------------------------------------------------------------------------------------- layer benchmark

# SDXL's attention layers: (channels, heads, how many transformer blocks, latent downsampling of their level).
SDXL_LEVELS = ((640, 10, 10, 2), (1280, 20, 60, 4))
TOKENS = 261  # identity tokens: 4 face + 257 CLIP


def _layer(channels: int, heads: int, cross: int | None, dtype) -> Attention:
    return Attention(query_dim=channels, heads=heads, dim_head=channels // heads, cross_attention_dim=cross,
                     out_bias=True).to(dtype).eval()


def _time(fn, repeats: int) -> list[float]:
    # With one torch thread all the work runs on this thread: its CPU time is the work, whatever else the (shared)
    # machine runs meanwhile. With more threads, wall time.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def _cases(channels, heads, dtype, self_attn, cross_attn, x4, ctx4, tokens, rows, texts) -> dict:
    """The processors to compare on one layer, each as a no-argument call."""
    stock = AttnProcessor2_0()
    naive_self, fast_self = MixedSelfAttnProcessor("l.attn1"), FastMixedSelfAttnProcessor("l.attn1")
    naive_cross = IDCrossAttnProcessor("l.attn2", channels, 2048).to(dtype)
    fast_cross = FastIDCrossAttnProcessor("l.attn2", channels, 2048).to(dtype)
    fast_cross.load_state_dict(naive_cross.state_dict())
    kwargs = dict(id_rows=rows, id_tokens=tokens, text_rows=texts)
    call = IDCall(**kwargs)
    _IP_CACHE.clear()
    fast_call = FastIDCall.build(**kwargs)
    return {
        "self stock b2": lambda: stock(self_attn, x4[:2]),
        "self stock b4": lambda: stock(self_attn, x4),
        "self package b4 mixed": lambda: naive_self(self_attn, x4, id_call=call),
        "self proto b4 mixed": lambda: fast_self(self_attn, x4, id_call=fast_call),
        "cross stock b2": lambda: stock(cross_attn, x4[:2], ctx4[:2]),
        "cross stock b4": lambda: stock(cross_attn, x4, ctx4),
        "cross package b4 id": lambda: naive_cross(cross_attn, x4, ctx4, id_call=call),
        "cross proto b4 id": lambda: fast_cross(cross_attn, x4, ctx4, id_call=fast_call),
        "cross proto+text-kv b4 id": lambda: _with_text_kv(fast_cross, cross_attn, x4, ctx4, fast_call),
    }


def _with_text_kv(processor, attn, x, context, call):
    _TEXT_KV["on"] = True
    try:
        return processor(attn, x, context, id_call=call)
    finally:
        _TEXT_KV["on"] = False


def layer_benchmark(resolution: int, dtype: torch.dtype, repeats: int) -> dict:
    """Per-step attention time over SDXL's 70 self- and 70 cross-attention layers, by processor, interleaved."""
    torch.manual_seed(0)
    latent = resolution // 8
    rows = torch.tensor([1, 3])
    texts = torch.tensor([0, 2])
    totals: dict[str, float] = {}
    errors: dict[str, float] = {}
    for channels, heads, count, down in SDXL_LEVELS:
        n = (latent // down) ** 2
        self_attn, cross_attn = _layer(channels, heads, None, dtype), _layer(channels, heads, 2048, dtype)
        x4 = torch.randn(4, n, channels, dtype=dtype)
        ctx4 = torch.randn(4, 77, 2048, dtype=dtype)
        tokens = torch.randn(2, TOKENS, 2048, dtype=dtype)
        cases = _cases(channels, heads, dtype, self_attn, cross_attn, x4, ctx4, tokens, rows, texts)
        with torch.no_grad():
            errors[f"self {channels}"] = (cases["self proto b4 mixed"]() - cases["self package b4 mixed"]()).abs().max().item()
            errors[f"cross {channels}"] = (cases["cross proto b4 id"]() - cases["cross package b4 id"]()).abs().max().item()
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(repeats):  # interleaved: each round runs every case once
                for name, fn in cases.items():
                    samples[name] += _time(fn, 1)
        for name, values in samples.items():
            totals[name] = totals.get(name, 0.0) + count * statistics.median(values)
    return {"resolution": resolution, "dtype": str(dtype), "per_step_s": totals, "max_abs_diff_vs_package": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="1: thread CPU time (robust on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    result = layer_benchmark(args.resolution, dtype, args.repeats)
    clock = "thread CPU" if args.threads == 1 else "wall"
    print(f"SDXL attention layers at {args.resolution} px, {args.dtype}, {clock} seconds per step (70 layers each)")
    for name, value in result["per_step_s"].items():
        print(f"  {name:24s} {value:8.3f}")
    print("max |prototype - package|:", {k: f"{v:.2e}" for k, v in result["max_abs_diff_vs_package"].items()})


if __name__ == "__main__":
    main()
