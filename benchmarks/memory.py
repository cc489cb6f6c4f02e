"""Peak GPU memory of each VRAM tier (``infinite_id/models/tiers.py``), estimated without a GPU.

Method (written down in benchmarks/README.md, "VRAM tiers"):

1. **Weights**: every component of SDXL is built from its published config on the meta device (shapes only, no
   memory) and its parameter bytes are counted in the run dtype; int8 weight-only counts each ``nn.Linear`` weight
   at one byte plus one fp16 scale per output row (torchao's per-row layout), everything else unchanged.
2. **Activations**: one eager UNet step of each batch layout, one VAE decode, the prompt encoding and the CLIP
   image tower run on the meta device under a dispatch mode that counts the bytes of every storage an op creates
   and releases them when the last tensor using them dies: the allocator's live bytes, op by op, and their peak.
   Attention is counted as the fused kernels run it on a GPU (output and log-sum-exp, no score matrix): on the
   meta device torch would take its math path and hold the whole score matrix.
3. **Tiers**: the peak of each phase (text encoders, CLIP tower, denoising, decode) is the weights resident in it
   plus its activations: all weights without offload; the phase's own model plus the resident ID encoder with
   model offload (accelerate moves the previous model out before the next one in); the largest single layer with
   sequential offload.
4. **Calibration**: the same count for the measured H200 run (all weights resident, plain SDXL and the faithful
   call) is printed beside its measured allocator peaks, so the estimate's error is visible.

Not counted: the CUDA context and cuDNN/cuBLAS workspaces (outside the allocator's "allocated" figure, and what
``FREE_SHARE`` in tiers.py leaves room for), the allocator's rounding and fragmentation.

    python benchmarks/memory.py [--resolution 1024] [--dtype fp16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GB = 1e9


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create while the mode is on, live and at their peak.

    A storage counts from the op that creates it until the last tensor viewing it dies (weak-reference
    finalisers); outputs that share a storage with an input (views, in-place ops) add nothing.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list] = {}  # storage id -> [tensor count, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = _key(t)
            if key in inputs and key not in self._refs:
                continue  # a view or in-place result of something made outside (weights, inputs)
            if key not in self._refs:
                nbytes = t.untyped_storage().nbytes()
                self._refs[key] = [0, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self._refs[key][0] += 1
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def extra(self, nbytes: int) -> None:
        """A transient buffer a fused kernel allocates and frees inside one op (counted at its peak only)."""
        self.peak = max(self.peak, self.live + nbytes)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class FusedAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` as a GPU's fused kernels run it: an output, and a float32 log-sum-exp per
    query row while the kernel runs; no score matrix."""

    def __init__(self, counter: LiveBytes):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, v = args[0], args[2]
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))  # counted by LiveBytes
            self.counter.extra(q.numel() // q.shape[-1] * 4)  # beside the output while the kernel runs
            return out
        return func(*args, **kwargs)


def peak_activation_bytes(fn, retained: list | None = None) -> int:
    """Peak live bytes created by ``fn()`` (run under no_grad, on meta tensors); ``retained`` gets the bytes still
    alive afterwards (what ``fn`` left in caches it was given)."""
    counter = LiveBytes()
    with torch.no_grad(), FusedAttention(counter), counter:
        result = fn()
        del result
    if retained is not None:
        retained.append(counter.live)
    return counter.peak


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _int8_params(module: torch.nn.Module) -> int:
    """torchao int8 weight-only: Linear weights at 1 byte plus a 2-byte scale per output row; the rest as is."""
    total = 0
    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() + m.weight.shape[0] * 2 + (0 if m.bias is None else _params_of([m.bias]))
        else:
            total += _params_of(own)
    return total


def _params_of(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


# ----------------------------------------------------------------------------------------------- SDXL on meta


def measure(resolution: int = 1024, dtype: torch.dtype = torch.float16) -> dict:
    """Weights per component and activation peaks per phase, in bytes (see the module docstring)."""
    import speed
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from infinite_id.method.attention import IDCall, install_id_processors
    from infinite_id.method.id_encoder import InfiniteIDEncoder

    meta = torch.device("meta")
    with speed.constructing(meta, dtype):
        unet = UNet2DConditionModel(**speed.SDXL_UNET)
        unet_bytes = _params(unet)
        install_id_processors(unet)
        vae = AutoencoderKL(**speed.SDXL_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**speed.CLIP_L_TEXT, vocab_size=49408))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**speed.BIGG_TEXT, vocab_size=49408))
        tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**speed.VIT_H_IMAGE))
        id_encoder = InfiniteIDEncoder()
    weights = {"unet": unet_bytes, "id_kv": _params(unet) - unet_bytes, "unet_int8": _int8_params(unet),
               "text_encoder": _params(te1), "text_encoder_2": _params(te2), "vae": _params(vae),
               "clip_tower": _params(tower), "id_encoder": _params(id_encoder),
               "largest_layer": max(_params_of(m.parameters(recurse=False)) for m in unet.modules())}
    latent = resolution // 8

    def step(batch: int, mixing: bool):
        with torch.device(meta):
            sample = torch.randn(batch, 4, latent, latent, dtype=dtype)
            added = {"text_embeds": torch.randn(batch, 1280, dtype=dtype), "time_ids": torch.randn(batch, 6, dtype=dtype)}
            context = torch.randn(batch, 77, 2048, dtype=dtype)
            call = None
            if mixing:  # the faithful layout [text_u, text_c, id_u, id_c], with the per-call K/V cache
                call = IDCall(id_rows=slice(2, 4), text_rows=slice(0, 2), other_rows=slice(0, 2),
                              id_tokens=torch.randn(2, 261, 2048, dtype=dtype), kv_cache={})
        kwargs = {"encoder_hidden_states": context, "added_cond_kwargs": added}
        if call is not None:
            kwargs["cross_attention_kwargs"] = {"id_call": call}
        inputs = sample.nbytes + context.nbytes + (0 if call is None else call.id_tokens.nbytes)
        return inputs + peak_activation_bytes(lambda: unet(sample, torch.tensor(500.0, device=meta), **kwargs), kept)

    kept: list[int] = []

    with torch.device(meta):
        latents = torch.randn(1, 4, latent, latent, dtype=dtype)
        ids = torch.zeros(2, 77, dtype=torch.long)
        pixels = torch.randn(1, 3, 224, 224, dtype=dtype)
    activations = {
        "unet_plain": step(2, mixing=False),
        "unet_faithful": step(4, mixing=True),
        "identity_kv_cache": kept[-1],  # the per-call K/V cache (identity and text), alive through the decode
        "decode": peak_activation_bytes(lambda: vae.decode(latents, return_dict=False)),
        "text_encoder": peak_activation_bytes(lambda: te1(ids, output_hidden_states=True)),
        "text_encoder_2": peak_activation_bytes(lambda: te2(ids, output_hidden_states=True)),
        "clip_tower": peak_activation_bytes(lambda: tower(pixels, output_hidden_states=True)),
    }
    return {"resolution": resolution, "dtype": str(dtype).removeprefix("torch."), "weights": weights,
            "activations": activations}


# The H200 run's allocator peak of a plain call above its start (speed.py, 1024², fp16): 2.55 GB, against this
# count's 1.61 GB for the same call (its peak is the VAE decode). The gap (kernel workspaces, e.g. cuDNN's for
# the 1024² convolutions, which the caching allocator holds) is added to every phase of every tier.
MEASURED_PLAIN_ABOVE_START = 2.554e9


def margin(m: dict) -> int:
    a = m["activations"]
    return max(0, int(MEASURED_PLAIN_ABOVE_START - max(a["unet_plain"], a["decode"])))


def tier_peaks(m: dict, memory_mode: str, int8: bool, clip: bool = True) -> dict:
    """Peak allocated bytes per phase of one faithful call under a tier's placement (``clip``: the adapter reads
    CLIP features, as the default FaceID-PlusV2 does, so the ViT-H tower is part of the pipeline), calibration
    margin included."""
    w, a, extra = m["weights"], m["activations"], margin(m)
    a = {k: v + extra for k, v in a.items()}
    unet = (w["unet_int8"] if int8 else w["unet"] + w["id_kv"])
    models = {"text": (w["text_encoder_2"], a["text_encoder_2"]), "denoise": (unet, a["unet_faithful"]),
              "decode": (w["vae"], a["decode"] - extra + a["identity_kv_cache"])}
    if clip:
        models["clip"] = (w["clip_tower"], a["clip_tower"])
    if memory_mode == "none":
        resident = unet + w["text_encoder"] + w["text_encoder_2"] + w["vae"] + w["id_encoder"]
        resident += w["clip_tower"] if clip else 0
        return {phase: resident + act for phase, (_, act) in models.items()}
    if memory_mode == "model":
        return {phase: w["id_encoder"] + own + act for phase, (own, act) in models.items()}
    return {phase: w["id_encoder"] + w["largest_layer"] + act for phase, (_, act) in models.items()}


def report(m: dict) -> str:
    from infinite_id.models import tiers

    w, a = m["weights"], m["activations"]
    lines = [f"SDXL at {m['resolution']}², {m['dtype']}: weights (GB) " + ", ".join(
        f"{k} {v / GB:.2f}" for k, v in w.items()), "activation peaks (GB) " + ", ".join(
        f"{k} {v / GB:.2f}" for k, v in a.items()), ""]
    bench = w["unet"] + w["id_kv"] + w["text_encoder"] + w["text_encoder_2"] + w["vae"] + w["id_encoder"]
    lines += ["Calibration against the H200 run (speed.py: every weight resident, no CLIP tower):",
              f"- weights: estimated {bench / GB:.2f} GB, measured 7.44 GB",
              f"- plain call above start: estimated {max(a['unet_plain'], a['decode']) / GB:.2f} GB, measured 2.55 GB",
              f"- faithful call above start: estimated {max(a['unet_faithful'], a['decode'] + a['identity_kv_cache']) / GB:.2f}"
              " GB, measured 2.77 GB",
              f"- margin added to every phase below: {margin(m) / GB:.2f} GB (measured - estimated, plain call)", "",
              "| tier | options | text | CLIP | denoise | decode | peak (GB) | goal |", "|" + " --- |" * 8]
    goals = {"12": 12 * 1024**3 / GB, "8": 8.0, "6": 6.0}
    for name, tier in tiers.TIERS.items():
        for quant in ([True, False] if tier.quantize else [False]):
            mode = tier.memory_mode if quant or not tier.quantize else tier.fallback_memory_mode
            peaks = tier_peaks(m, mode, quant)
            peak = max(peaks.values())
            goal = goals.get(name)
            verdict = "-" if goal is None else f"<= {goal:.1f}: {'met' if peak / GB <= goal else 'NOT met'}"
            label = tiers.describe(tier) if quant or not tier.quantize else f"fallback: {mode} offload, fp16 UNet"
            lines.append(f"| {name} | {label} | {peaks['text'] / GB:.2f} | {peaks['clip'] / GB:.2f} | "
                         f"{peaks['denoise'] / GB:.2f} | {peaks['decode'] / GB:.2f} | **{peak / GB:.2f}** | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    result = measure(args.resolution, dtype)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
