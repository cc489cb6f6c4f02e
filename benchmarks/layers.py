"""The attention layers alone: the package's processors against diffusers' stock ones, at SDXL's shapes.

Per UNet step, over SDXL's 70 self-attention (``attn1``) and 70 cross-attention (``attn2``) layers (10 at 640
channels, 60 at 1280), with random weights and inputs: diffusers' ``AttnProcessor2_0`` on batch 2 (plain CFG) and
batch 4 (two streams, no identity), and ours on the faithful batch 4 ``[text_u, text_c, id_u, id_c]`` as the
pipeline calls them (row slices, the per-call K/V cache): mixed self-attention at ``semantic_scale`` 1 and 1.5,
ID cross-attention on a call's later steps (K/V cached) and on its first step (identity and text K/V projected).
Cases run interleaved (each round runs every case once); each figure is the median over rounds, times the layer
count. With one torch thread (the default) the clock is the thread's CPU time, steady on a shared machine.

    python benchmarks/layers.py [--resolution 512] [--dtype bf16] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from infinite_id.method.attention import IDCall, IDCrossAttnProcessor, MixedSelfAttnProcessor  # noqa: E402
from infinite_id.method.ops import adain_mean  # noqa: E402

# SDXL's attention levels: (channels, heads, transformer blocks, latent downsampling).
SDXL_LEVELS = ((640, 10, 10, 2), (1280, 20, 60, 4))
TOKENS = 261  # identity tokens: 4 face + 257 CLIP
ROWS = dict(id_rows=slice(2, 4), text_rows=slice(0, 2), other_rows=slice(0, 2))


def _layer(channels: int, heads: int, cross: int | None, dtype) -> Attention:
    return Attention(query_dim=channels, heads=heads, dim_head=channels // heads, cross_attention_dim=cross,
                     out_bias=True).to(dtype).eval()


def _cases(channels: int, heads: int, n: int, dtype) -> dict:
    """Each case as a no-argument call, for one level's shapes."""
    self_attn, cross_attn = _layer(channels, heads, None, dtype), _layer(channels, heads, 2048, dtype)
    x4, ctx4 = torch.randn(4, n, channels, dtype=dtype), torch.randn(4, 77, 2048, dtype=dtype)
    tokens = torch.randn(2, TOKENS, 2048, dtype=dtype)
    stock, mixed = AttnProcessor2_0(), MixedSelfAttnProcessor("l.attn1.processor")
    cross = IDCrossAttnProcessor("l.attn2.processor", channels, 2048).to(dtype)
    warm: dict = {}
    call = lambda **kw: IDCall(id_tokens=tokens, **ROWS, **kw)  # noqa: E731
    cross(cross_attn, x4, ctx4, id_call=call(kv_cache=warm))  # fills the cache a call's later steps read
    return {
        "self, stock, batch 2": lambda: stock(self_attn, x4[:2]),
        "self, stock, batch 4": lambda: stock(self_attn, x4),
        "self, ours, batch 4 mixing": lambda: mixed(self_attn, x4, id_call=call()),
        "self, ours, batch 4 mixing, w 1.5": lambda: mixed(self_attn, x4, id_call=call(semantic_scale=1.5)),
        **_mixed_parts(self_attn, x4, heads),
        "cross, stock, batch 2": lambda: stock(cross_attn, x4[:2], ctx4[:2]),
        "cross, stock, batch 4": lambda: stock(cross_attn, x4, ctx4),
        "cross, ours, batch 4, later steps": lambda: cross(cross_attn, x4, ctx4, id_call=call(kv_cache=warm)),
        "cross, ours, batch 4, first step": lambda: cross(cross_attn, x4, ctx4, id_call=call(kv_cache={})),
    }


def _mixed_parts(layer: Attention, x4: torch.Tensor, heads: int) -> dict:
    """What the mixed self-attention is made of, each part alone: the q/k/v and output projections of all four
    rows, SDPA over the text rows' own keys, SDPA of the identity rows over twice the keys (their own and the
    text rows'), AdaIN-mean of the identity K/V. Their sum against the processor shows its own overhead; the two
    SDPA parts show how fast the attention core runs against the projections' matrix products."""
    q, k, v = layer.to_q(x4), layer.to_k(x4), layer.to_v(x4)
    split = lambda t: t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    k2, v2 = (split(torch.cat([t[2:], t[:2]], dim=1)) for t in (k, v))
    qh, kh, vh = split(q), split(k), split(v)
    return {
        "self, part: q/k/v projections, batch 4": lambda: (layer.to_q(x4), layer.to_k(x4), layer.to_v(x4)),
        "self, part: output projection, batch 4": lambda: layer.to_out[0](x4),
        "self, part: SDPA text rows, n keys": lambda: F.scaled_dot_product_attention(qh[:2], kh[:2], vh[:2]),
        "self, part: SDPA identity rows, 2n keys": lambda: F.scaled_dot_product_attention(qh[2:], k2, v2),
        "self, part: AdaIN-mean of identity K/V": lambda: (adain_mean(k[2:], k[:2], 1.0),
                                                           adain_mean(v[2:], v[:2], 1.0)),
    }


def layer_benchmark(resolution: int, dtype: torch.dtype, repeats: int) -> dict:
    torch.manual_seed(0)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    totals: dict[str, float] = {}
    latent = resolution // 8
    with torch.no_grad():
        for channels, heads, count, down in SDXL_LEVELS:
            cases = _cases(channels, heads, (latent // down) ** 2, dtype)
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for fn in cases.values():
                fn()  # warm-up
            for _ in range(repeats):
                for name, fn in cases.items():
                    start = clock()
                    fn()
                    samples[name].append(clock() - start)
            for name, values in samples.items():
                totals[name] = totals.get(name, 0.0) + count * statistics.median(values)
    return {"resolution": resolution, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "clock": "thread CPU" if clock is time.thread_time else "wall", "per_step_s": totals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="1: thread CPU time (robust on a shared machine)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = layer_benchmark(args.resolution, torch.bfloat16 if args.dtype == "bf16" else torch.float32, args.repeats)
    t = result["per_step_s"]
    print(f"SDXL attention layers at {args.resolution}², {args.dtype}, {result['clock']} s per step (70 layers each)")
    for kind in ("self", "cross"):
        plain = t[f"{kind}, stock, batch 2"]
        for name, value in t.items():
            if name.startswith(kind):
                print(f"  {name:42s} {value:7.3f}  x{value / plain:.2f}")
    parts = sum(value for name, value in t.items() if name.startswith("self, part:"))
    print(f"  {'self, the parts above together':42s} {parts:7.3f}  (ours mixing: "
          f"{t['self, ours, batch 4 mixing'] / parts:.3f}x their sum)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
