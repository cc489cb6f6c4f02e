"""Speed and memory of Infinite-ID against plain SDXL, on the real SDXL architecture with random weights.

Nothing is downloaded: the SDXL base UNet, the SDXL VAE and both text encoders are built from their published
configs (written out below) with random weights, so every timing is that of the real model. The tokenizers are
the repo's tiny fixture (its vocabulary size goes into the text configs); prompts are padded to 77 tokens either
way, so the text encoders do the same work as with the real vocabulary (which only changes an embedding lookup).
The identity is a precomputed random token tensor ``[1, 261, 2048]`` passed as ``id_embeds``: face analysis and
the CLIP image tower run once per photo, not per step (``--id-encoder`` times the mappers and the ViT-H tower).

Modes (``--modes``, comma separated):
  plain               diffusers' own StableDiffusionXLPipeline, its default AttnProcessor2_0, CFG (batch 2)
  infinite-id         faithful: batch [text_u, id_u, text_c, id_c], mixed attention on every step
  infinite-id-window  mix_window (0, 0.5) + return_text_images=False: the text stream leaves after the window
  infinite-id-app     faithful, text stream not returned (return_text_images=False): the app's Generate default,
                      which shows the picture without the person only when asked; one decode instead of two
  infinite-id-cfg0.8  faithful with CFG truncation at 80% of the steps (changes the image slightly)
  adapter             one stream, text + identity cross-attention (the IP-Adapter baseline)
  text                our pipeline with method="text" (plain SDXL through our processors)
  infinite-id-lora    faithful, with a rank-``--lora-rank`` identity LoRA (the FaceID files' 128) on the identity
                      rows (lora_scale 1); every other mode of ours runs with lora_scale 0 (no LoRA work at all)
  adapter-lora        the adapter with that LoRA (all rows are identity rows)
  MODE+no-text-cache  MODE with the text keys/values of cross-attention projected at every step (the package
                      projects them once per call, which diffusers does not do for plain SDXL: this mode shows
                      what that cache is worth); the identity keys/values stay cached

Every mode shares one set of weights; each pipeline has its own UNet module tree over them (with its own
processors), so nothing is swapped between calls. Timed rounds are interleaved (ABAB...): each round runs every
mode once, so machine noise hits all modes alike, and each ratio is the median over rounds of (mode / plain of
the same round). Per-step time is the UNet forward alone (hooks around it, device-synchronised); end-to-end is
the whole pipeline call (prompt encoding, steps, decode). On a CPU with ``--threads 1`` the thread CPU time is
reported beside wall time (steadier on a shared machine). Peak memory: on CUDA the allocator's peak during the
call (total, and above what was allocated before it); on CPU the process RSS sampled every 5 ms during the call,
minus the RSS before it (the process-wide ru_maxrss is reported as well, and ``--isolate`` runs each mode in its
own process when that matters). ``--flops`` counts each batch layout's FLOPs on the meta device (exact, free).

Examples:
  python benchmarks/speed.py --quick                                   # tiny components, seconds
  python benchmarks/speed.py --device cpu --dtype bf16 --resolution 512 --steps 2 --repeats 2 --threads 1 \\
      --warmup-steps 1 --skip-vae --modes plain,infinite-id,infinite-id-window --flops
  python benchmarks/speed.py --device cuda --dtype fp16 --resolution 1024 --steps 30   # see benchmarks/gpu.sh
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
sys.path.insert(0, str(ROOT / "benchmarks"))

import diffusers  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

import infinite_id.method.attention as id_attention  # noqa: E402
from infinite_id import testing  # noqa: E402
from infinite_id.method import backends  # noqa: E402
from infinite_id.method.id_encoder import IdentityFeatures, InfiniteIDEncoder  # noqa: E402
from infinite_id.method.pipeline import InfiniteIDPipeline  # noqa: E402
from infinite_id.models import fast as fast_modes  # noqa: E402
from infinite_id.models import tiers  # noqa: E402
from infinite_id.models.loading import compile_unet  # noqa: E402

# ----------------------------------------------------------------------------------------------- the model

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (defaults of UNet2DConditionModel left out).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # diffusers' name for the head *count* here: 64 channels per head
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + 1280 pooled text
    norm_num_groups=32,
    norm_eps=1e-5,
)
# The SDXL VAE (madebyollin/sdxl-vae-fp16-fix has the same architecture and force_upcast=False: it decodes in fp16).
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=False,
)
# text_encoder: OpenAI CLIP ViT-L/14 text tower; text_encoder_2: OpenCLIP ViT-bigG/14 text tower with projection.
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5)
BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5)
# The identity adapters' CLIP image tower (OpenCLIP ViT-H/14), for --id-encoder.
VIT_H_IMAGE = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                   image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)

PROMPT = "a photo of a woman wearing a yellow sweater in Times Square, detailed, 35mm"
NEGATIVE = "blurry, lowres, deformed"

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    pipeline: str  # "plain" (diffusers' SDXL pipeline) or "ours"
    kwargs: dict
    note: str
    text_cache: bool = True  # False: the text K/V of cross-attention projected at every step (+no-text-cache)


BASE_MODES = {
    "plain": Mode("plain", "plain", {}, "diffusers StableDiffusionXLPipeline, AttnProcessor2_0"),
    "infinite-id": Mode("infinite-id", "ours", {"method": "infinite-id"}, "faithful 4-row batch, mixing every step"),
    "infinite-id-window": Mode(
        "infinite-id-window", "ours",
        {"method": "infinite-id", "mix_window": (0.0, 0.5), "return_text_images": False},
        "window (0, 0.5), text stream dropped after it",
    ),
    "infinite-id-app": Mode("infinite-id-app", "ours", {"method": "infinite-id", "return_text_images": False},
                            "faithful, mixing every step, text stream not decoded (the app's default)"),
    "infinite-id-cfg0.8": Mode("infinite-id-cfg0.8", "ours", {"method": "infinite-id", "cfg_cutoff": 0.8},
                               "faithful + CFG truncation at 0.8"),
    "adapter": Mode("adapter", "ours", {"method": "adapter"}, "one stream, text + identity cross-attention"),
    "text": Mode("text", "ours", {"method": "text"}, "our pipeline, method='text'"),
    "infinite-id-lora": Mode("infinite-id-lora", "ours", {"method": "infinite-id", "lora_scale": 1.0},
                             "faithful + identity LoRA on the identity rows"),
    "adapter-lora": Mode("adapter-lora", "ours", {"method": "adapter", "lora_scale": 1.0},
                         "adapter + identity LoRA"),
}
LORA_PAIRS = (("infinite-id-lora", "infinite-id"), ("adapter-lora", "adapter"))  # (with the LoRA, without)
DEFAULT_MODES = "plain,infinite-id,infinite-id-window,infinite-id-cfg0.8,adapter,text"


def parse_mode(name: str) -> Mode:
    base, _, suffix = name.partition("+")
    if base not in BASE_MODES or suffix not in ("", "no-text-cache") or (suffix and BASE_MODES[base].pipeline != "ours"):
        raise SystemExit(f"Unknown mode {name!r}; choose from {', '.join(BASE_MODES)} (ours may end in "
                         "+no-text-cache).")
    mode = BASE_MODES[base]
    if not suffix:
        return mode
    return dataclasses.replace(mode, name=name, text_cache=False, note=mode.note + ", text K/V every step")


@contextlib.contextmanager
def constructing(device: torch.device, dtype: torch.dtype):
    """Build modules directly on ``device`` in ``dtype``: no fp32 copy of 2.6B parameters ever exists."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


@dataclasses.dataclass
class Engine:
    unet: torch.nn.Module
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    id_encoder: InfiniteIDEncoder
    id_tokens: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    tiny: bool


def build_engine(device: torch.device, dtype: torch.dtype, tiny: bool, seed: int = 0) -> Engine:
    """The SDXL components with seeded random weights (``tiny``: the repo's tiny test components instead)."""
    torch.manual_seed(seed)
    vocab = len(testing.tiny_tokenizer())
    ids = dict(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    with constructing(device, dtype):
        if tiny:
            unet, vae, id_encoder = testing.tiny_unet(), testing.tiny_vae(), testing.tiny_id_encoder()
            text_encoder = CLIPTextModel(testing._text_config(vocab))
            text_encoder_2 = CLIPTextModelWithProjection(testing._text_config(vocab))
        else:
            unet = UNet2DConditionModel(**SDXL_UNET)
            vae = AutoencoderKL(**SDXL_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **ids))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**BIGG_TEXT, **ids))
            id_encoder = InfiniteIDEncoder()  # SDXL sizes: 4 face + 257 CLIP tokens of 2048
    for module in (unet, vae, text_encoder, text_encoder_2, id_encoder):
        module.eval().requires_grad_(False)
        if any(p.dtype != dtype or p.device.type != device.type for p in module.parameters()):
            module.to(device=device, dtype=dtype)  # only if something was built elsewhere (diffusers warns on to())
    tokens = torch.randn(1, id_encoder.num_tokens, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(seed))
    return Engine(unet, vae, text_encoder, text_encoder_2, id_encoder, tokens.to(device, dtype), device, dtype, tiny)


def parameter_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


# ----------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_time_counts(device: torch.device) -> bool:
    """On a CPU with one torch thread, all compute runs on the calling thread: its CPU time is the work done,
    whatever else the machine runs meanwhile (wall time on a shared machine is not)."""
    return device.type == "cpu" and torch.get_num_threads() == 1


class UNetTimer:
    """Times every UNet forward (device-synchronised hooks) and keeps the first call's inputs per batch size.
    ``calls``: (batch, wall seconds, thread CPU seconds) per forward."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device):
        self.device = device
        self.calls: list[tuple[int, float, float]] = []
        self.captured: dict[tuple[int, bool], tuple[tuple, dict]] = {}
        self.capture = False
        self._start = self._cpu = 0.0
        self._handles = []
        for module in modules:
            self._handles += [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                              module.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        synchronize(self.device)
        if self.capture:
            call = (kwargs.get("cross_attention_kwargs") or {}).get("id_call")
            key = (args[0].shape[0], bool(call is not None and call.text_rows is not None and call.mixing))
            self.captured.setdefault(key, (args, dict(kwargs)))
        self._start, self._cpu = time.perf_counter(), time.thread_time()

    def _post(self, module, args, output):
        synchronize(self.device)
        self.calls.append((args[0].shape[0], time.perf_counter() - self._start, time.thread_time() - self._cpu))

    def reset(self) -> None:
        self.calls = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or RSS sampled by a thread on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.peak = self.before = 0
        self._stop = threading.Event()

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self._process = psutil.Process()
            self.before = self.peak = self._process.memory_info().rss
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._process.memory_info().rss)
        return False


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``module`` (no weight memory).

    Each processor set lives on its own copy for good: swapping processors on one UNet would mutate its module
    dicts, which invalidates torch.compile's guards (a recompile at every switch).
    """
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def key_of(mode: Mode) -> str:
    return "plain" if mode.pipeline == "plain" else "ours" if mode.text_cache else "ours-no-text-cache"


def _text_kv_every_step(module, args, kwargs):
    """UNet pre-hook of the +no-text-cache modes: drop the call's cached text K/V before every step, so each
    cross-attention projects them again (the identity K/V stay cached). Keys are the package's ``(layer, "text",
    layout)``."""
    call = (kwargs.get("cross_attention_kwargs") or {}).get("id_call")
    if call is not None and call.kv_cache is not None:
        for key in [k for k in call.kv_cache if k[1] == "text"]:
            del call.kv_cache[key]


class Bench:
    """The pipelines of the modes over one set of weights: diffusers' SDXL pipeline on a UNet copy with stock
    processors, ours on the UNet with our processors, and (for +no-text-cache modes) ours on a copy of that tree
    whose pre-hook empties the text part of the per-call K/V cache before every step."""

    def __init__(self, engine: Engine, args: argparse.Namespace, modes: list[Mode], backend=backends.SDPA):
        self.engine, self.args, self.modes = engine, args, modes
        self.quantized = 0
        device = torch.device(args.device)
        scheduler = fast_modes.scheduler_for(fast_modes.fast_mode(args.fast), testing.tiny_scheduler().config)
        parts = dict(vae=engine.vae, text_encoder=engine.text_encoder, text_encoder_2=engine.text_encoder_2,
                     tokenizer=testing.tiny_tokenizer(), tokenizer_2=testing.tiny_tokenizer())
        needed = {key_of(m) for m in modes}
        self.pipes: dict[str, object] = {}
        if "plain" in needed:
            unet = shared_copy(engine.unet) if needed - {"plain"} else engine.unet
            unet.set_attn_processor(backends.stock_processor(backend))  # plain SDXL on the same kernel as ours
            self.pipes["plain"] = StableDiffusionXLPipeline(**parts, unet=unet, scheduler=scheduler,
                                                            add_watermarker=False)
        if needed - {"plain"}:
            # The constructor adds the identity K/V projections (341M parameters at SDXL size): build them in place.
            with constructing(engine.unet.device, engine.dtype):
                self.pipes["ours"] = InfiniteIDPipeline(**parts, unet=engine.unet, scheduler=scheduler,
                                                        id_encoder=engine.id_encoder)
            id_attention.set_attention_backend(engine.unet, backend)
        if any(m.kwargs.get("lora_scale") for m in modes):
            self.lora_params = install_identity_lora(engine.unet, args.lora_rank, engine.dtype)
        if "ours-no-text-cache" in needed:
            if args.compile != "off" or args.quantize != "off":
                raise SystemExit("+no-text-cache modes run eager and unquantized only.")
            unet = shared_copy(engine.unet)  # our processors with their weights (and any LoRA), shared
            unet.register_forward_pre_hook(_text_kv_every_step, with_kwargs=True)
            self.pipes["ours-no-text-cache"] = InfiniteIDPipeline(**parts, unet=unet, scheduler=scheduler,
                                                                  id_encoder=engine.id_encoder)
            if "ours" not in needed:
                del self.pipes["ours"]
        for pipe in self.pipes.values():
            pipe.set_progress_bar_config(disable=True)
        if args.quantize != "off":
            # After the pipelines exist: our identity K/V projections are UNet Linear layers too (shared weights).
            self.quantized = tiers.quantize_unet(engine.unet)
        self._place()
        self.eager_unets = {key: pipe.unet for key, pipe in self.pipes.items()}
        if args.compile != "off":
            for key, pipe in self.pipes.items():
                if key == "plain" and args.compile_skip_plain:
                    continue  # the baseline stays stock diffusers, uncompiled
                compile_unet(pipe, args.compile, backend=args.compile_backend)
        self.timer = UNetTimer([pipe.unet for pipe in self.pipes.values()], device)

    def _place(self) -> None:
        memory = self.args.memory
        for pipe in self.pipes.values():
            if self.args.vae_slicing:
                pipe.vae.enable_slicing()
            if self.args.vae_tiling:
                pipe.vae.enable_tiling()
            if memory == "none":
                continue
            # As infinite_id.models.loading does: the small ID encoder is called with a dataclass accelerate cannot move.
            pipe._exclude_from_cpu_offload = [*getattr(pipe, "_exclude_from_cpu_offload", []), "id_encoder"]
            if memory == "model":
                pipe.enable_model_cpu_offload(device=self.args.device)
            else:
                pipe.enable_sequential_cpu_offload(device=self.args.device)

    def call(self, mode: Mode, steps: int) -> dict:
        """One pipeline call of ``mode``: its UNet calls, end-to-end time and peak memory."""
        args = self.args
        pipe = self.pipes[key_of(mode)]
        kwargs = dict(
            prompt=PROMPT, negative_prompt=NEGATIVE, height=args.resolution, width=args.resolution,
            num_inference_steps=steps, guidance_scale=args.guidance, generator=torch.Generator().manual_seed(0),
            output_type="latent" if args.skip_vae else "pil",
        )
        if mode.pipeline == "ours":
            # lora_scale 0 unless the mode asks for the LoRA: the processors then skip its work entirely.
            kwargs.update(id_embeds=self.engine.id_tokens, **{"lora_scale": 0.0, **mode.kwargs})
        self.timer.reset()
        device = self.timer.device
        error = None
        with PeakMemory(device) as memory:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                pipe(**kwargs)
            except FloatingPointError as exc:
                # Our pipeline refuses NaN/inf images (random weights could overflow fp16); diffusers' returns them.
                # The time up to the refusal is the same work, so it is kept, and the row is flagged.
                error = str(exc)
            synchronize(device)
            e2e, e2e_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        calls = list(self.timer.calls)
        steps = max(len(calls), 1)
        unet_total, unet_cpu = sum(c[1] for c in calls), sum(c[2] for c in calls)
        sample = {"e2e_s": e2e, "unet_s": unet_total, "unet_step_s": unet_total / steps,
                  "unet_calls": [round(c[1], 4) for c in calls], "unet_batches": [c[0] for c in calls],
                  "peak_bytes": memory.peak, "peak_above_start_bytes": memory.peak - memory.before, "error": error}
        if cpu_time_counts(device):
            sample.update(e2e_cpu_s=e2e_cpu, unet_cpu_s=unet_cpu, unet_step_cpu_s=unet_cpu / steps,
                          unet_calls_cpu=[round(c[2], 4) for c in calls])
        return sample


def install_identity_lora(unet: torch.nn.Module, rank: int, dtype: torch.dtype) -> int:
    """A random rank-``rank`` identity LoRA on every attention processor of ``unet`` (what an IP-Adapter-FaceID
    file brings: 128 at SDXL size). Returns its parameter count."""
    from infinite_id.method.id_lora import IdentityLoRA

    count = 0
    with constructing(next(unet.parameters()).device, dtype):
        for _, attn in id_attention.attention_layers(unet):
            attn.processor.id_lora = IdentityLoRA(attn, rank).requires_grad_(False)
            count += sum(p.numel() for p in attn.processor.id_lora.parameters())
    return count


def count_lora_flops(resolution: int, rank: int) -> dict:
    """UNet TFLOP per step with and without a rank-``rank`` identity LoRA, through the package's own processors on
    the meta device (exact): the faithful layout (LoRA on 2 of 4 rows) and the adapter's (on 2 of 2 rows)."""
    from torch.utils.flop_counter import FlopCounterMode

    dtype, latent = torch.bfloat16, resolution // 8
    with constructing(torch.device("meta"), dtype):
        unet = UNet2DConditionModel(**SDXL_UNET)
        id_attention.install_id_processors(unet)
    install_identity_lora(unet, rank, dtype)
    result = {}
    # The pipeline's stream-major rows: [text_u, text_c, id_u, id_c] and the adapter's [id_u, id_c].
    for name, batch, ids, texts in (("faithful (batch 4)", 4, slice(2, 4), slice(0, 2)),
                                    ("adapter (batch 2)", 2, slice(0, 2), None)):
        with torch.device("meta"):
            args = (torch.randn(batch, 4, latent, latent, dtype=dtype), torch.tensor(500.0))
            kwargs = {"encoder_hidden_states": torch.randn(batch, 77, 2048, dtype=dtype),
                      "added_cond_kwargs": {"text_embeds": torch.randn(batch, 1280, dtype=dtype),
                                            "time_ids": torch.randn(batch, 6, dtype=dtype)}}
            tokens = torch.randn(2, 261, 2048, dtype=dtype)
        flops = {}
        for scale in (0.0, 1.0):
            call = id_attention.IDCall(id_rows=ids, id_tokens=tokens, text_rows=texts,
                                       other_rows=texts if texts is not None else slice(0, 0), lora_scale=scale)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                unet(*args, **kwargs, cross_attention_kwargs={"id_call": call})
            flops[scale] = counter.get_total_flops() / 1e12
        result[name] = {"tflop_without": round(flops[0.0], 3), "tflop_with": round(flops[1.0], 3),
                        "ratio": round(flops[1.0] / flops[0.0], 4)}
    return result


def explain_graph_breaks(bench: Bench, modes: list[Mode]) -> dict:
    """torch._dynamo.explain on the exact UNet inputs of each mode (captured from a 2-step call)."""
    report = {}
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    bench.timer.capture = True
    for mode in modes:
        bench.timer.captured = {}
        bench.call(mode, steps=2)
        for (batch, mixing), (args, kwargs) in bench.timer.captured.items():
            torch._dynamo.reset()
            # Explain the eager UNet's forward: the timing hooks would otherwise be traced (and break graphs). The
            # captured IDCall's K/V cache was filled by that call, as compile_unet fills it before each step.
            result = torch._dynamo.explain(bench.eager_unets[key_of(mode)].forward)(*args, **kwargs)
            reasons = sorted({f"{r.reason.splitlines()[0][:120]} @ {_where(r)}" for r in result.break_reasons})
            report[f"{mode.name} batch {batch}{' mixing' if mixing else ''}"] = {
                "graphs": result.graph_count, "graph_breaks": result.graph_break_count, "reasons": reasons}
    bench.timer.capture = False
    torch._dynamo.reset()
    return report


def _where(reason) -> str:
    frame = reason.user_stack[-1] if reason.user_stack else None
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" if frame else "?"


def time_id_encoder(engine: Engine, with_tower: bool) -> dict:
    """Per-photo cost: the ID encoder's mappers on raw features, and (``with_tower``) the CLIP ViT-H image tower."""
    encoder, device, dtype = engine.id_encoder, engine.device, engine.dtype
    features = IdentityFeatures(face=torch.randn(1, encoder.face_dim, device=device, dtype=dtype),
                                clip=torch.randn(1, encoder.clip_tokens, encoder.clip_dim, device=device, dtype=dtype))
    result = {}
    with torch.no_grad():
        result["mappers_s"] = _best_of(lambda: encoder(features), device)
        if with_tower and not engine.tiny:
            with constructing(device, dtype):
                tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H_IMAGE)).eval()
            pixels = torch.randn(1, 3, 224, 224, device=device, dtype=dtype)
            result["clip_vit_h_s"] = _best_of(lambda: tower(pixels, output_hidden_states=True), device)
            del tower
    return result


def time_vae_decode(engine: Engine, resolution: int) -> float:
    """One decode of one image (what --skip-vae leaves out of each call), for the projections in the table."""
    latents = torch.randn(1, 4, resolution // 8, resolution // 8, device=engine.device, dtype=engine.dtype)
    with torch.no_grad():
        synchronize(engine.device)
        start = time.perf_counter()
        engine.vae.decode(latents / engine.vae.config.scaling_factor, return_dict=False)
        synchronize(engine.device)
    return time.perf_counter() - start


def _best_of(fn, device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def count_flops(resolution: int, steps: int = 30, skip_vae: bool = False) -> dict:
    """UNet TFLOP per step of each batch layout, counted on the meta device (no compute, no memory, exact).

    Ours runs through the package's processors with the pipeline's row slices and a per-call K/V cache: the first
    step of a call projects the identity and text keys/values, later steps read them. The middle count (text K/V
    dropped from the cache) is the ``+no-text-cache`` modes' later steps. On meta tensors no keys are padded (the
    CPU's padding adds 11 of 272 identity keys to the image branch's attention: not counted).
    """
    from torch.utils.flop_counter import FlopCounterMode

    dtype, latent = torch.bfloat16, resolution // 8
    with constructing(torch.device("meta"), dtype):
        unet = UNet2DConditionModel(**SDXL_UNET)
        stock = shared_copy(unet)
        stock.set_attn_processor(AttnProcessor2_0())
        id_attention.install_id_processors(unet)
        tokens = torch.randn(2, 261, 2048, dtype=dtype)

    def inputs(batch: int) -> tuple[tuple, dict]:
        with torch.device("meta"):
            added = {"text_embeds": torch.randn(batch, 1280, dtype=dtype), "time_ids": torch.randn(batch, 6, dtype=dtype)}
            return ((torch.randn(batch, 4, latent, latent, dtype=dtype), torch.tensor(500.0)),
                    {"encoder_hidden_states": torch.randn(batch, 77, 2048, dtype=dtype), "added_cond_kwargs": added})

    def tflop(module, args, kwargs) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(*args, **kwargs)
        return counter.get_total_flops() / 1e12

    layouts = {"faithful (batch 4, mixing)": (4, dict(id_rows=slice(2, 4), text_rows=slice(0, 2),
                                                      other_rows=slice(0, 2))),
               "identity stream only (batch 2: adapter, after the window)": (2, dict(id_rows=slice(0, 2),
                                                                                     other_rows=slice(0, 0)))}
    result = {"plain CFG (batch 2)": tflop(stock, *inputs(2)), "two streams, no identity (batch 4)": tflop(stock, *inputs(4))}
    for name, (batch, rows) in layouts.items():
        args, kwargs = inputs(batch)
        cache: dict = {}
        kwargs["cross_attention_kwargs"] = {"id_call": id_attention.IDCall(id_tokens=tokens, kv_cache=cache, **rows)}
        result[f"{name}: first step of a call (projects identity and text K/V)"] = tflop(unet, args, kwargs)
        for key in [k for k in cache if k[1] == "text"]:
            del cache[key]
        result[f"{name}: identity K/V cached, text K/V every step"] = tflop(unet, args, kwargs)
        result[f"{name}: later steps (identity and text K/V cached)"] = tflop(unet, args, kwargs)
    # What plain SDXL would save with the same text K/V cache (diffusers does not have one): the text K/V
    # projections scale with the rows, so half the faithful batch-4 layout's saving.
    faithful = "faithful (batch 4, mixing)"
    saving = (result[f"{faithful}: identity K/V cached, text K/V every step"]
              - result[f"{faithful}: later steps (identity and text K/V cached)"])
    result["plain CFG (batch 2), if it cached its text K/V (derived)"] = result["plain CFG (batch 2)"] - saving / 2
    plain = result["plain CFG (batch 2)"]
    table = {name: {"tflop": round(v, 3), "x_plain": round(v / plain, 3)} for name, v in result.items()}
    first, later = (result[f"faithful (batch 4, mixing): {k}"] for k in (
        "first step of a call (projects identity and text K/V)", "later steps (identity and text K/V cached)"))
    table[f"faithful, mean step of a {steps}-step call"] = {
        "tflop": round((first + (steps - 1) * later) / steps, 3),
        "x_plain": round((first + (steps - 1) * later) / steps / plain, 3)}

    # Per image, 30 steps: prompt encoding (both encoders, prompt and negative prompt) + steps + decodes.
    with constructing(torch.device("meta"), dtype):
        vae = AutoencoderKL(**SDXL_VAE)
        encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, vocab_size=49408)),
                    CLIPTextModelWithProjection(CLIPTextConfig(**BIGG_TEXT, vocab_size=49408))]
        ids = torch.zeros(2, 77, dtype=torch.long)
        decode = tflop(vae.decode, (torch.randn(1, 4, latent, latent, dtype=dtype),), {})
        prompts = sum(tflop(encoder, (ids,), {"output_hidden_states": True}) for encoder in encoders)
    table["per image, 30 steps"] = per_image_flops(result, prompts, decode, 30)
    if steps != 30 or skip_vae:  # also the run's own calls, as timed (without the decode with --skip-vae)
        label = f"per image, {steps} steps{', no decode' if skip_vae else ''}"
        table[label] = per_image_flops(result, prompts, 0.0 if skip_vae else decode, steps)
    table["vae decode (one image)"] = {"tflop": round(decode, 3), "x_plain": round(decode / plain, 3)}
    table["prompt encoding (both encoders, 2 prompts)"] = {"tflop": round(prompts, 3),
                                                            "x_plain": round(prompts / plain, 3)}
    return table


def per_image_flops(step: dict, prompts: float, decode: float, steps: int) -> dict:
    """TFLOP per image of a ``steps``-step call (prompt encoding, steps, decodes) from ``count_flops``' per-step
    counts: plain, faithful (both images decoded, or only the identity stream's as the app asks by default) and the
    window mode (0, 0.5) with the text-stream skip, whose
    identity-only layout projects its text K/V at its first step and finds the identity K/V cached."""
    faithful, alone = "faithful (batch 4, mixing)", "identity stream only (batch 2: adapter, after the window)"
    first, cached, later = ("first step of a call (projects identity and text K/V)",
                            "identity K/V cached, text K/V every step", "later steps (identity and text K/V cached)")
    mixing = -(-steps // 2)  # steps i < steps / 2
    plain, plain_cached = step["plain CFG (batch 2)"], step["plain CFG (batch 2), if it cached its text K/V (derived)"]
    totals = {
        "plain": prompts + steps * plain + decode,
        "plain, if it cached its text K/V (derived)": prompts + plain + (steps - 1) * plain_cached + decode,
        "faithful": prompts + step[f"{faithful}: {first}"] + (steps - 1) * step[f"{faithful}: {later}"] + 2 * decode,
        "faithful, the app's call (text stream not decoded)": (
            prompts + step[f"{faithful}: {first}"] + (steps - 1) * step[f"{faithful}: {later}"] + decode),
        "faithful, text K/V every step": (prompts + step[f"{faithful}: {first}"]
                                          + (steps - 1) * step[f"{faithful}: {cached}"] + 2 * decode),
        "window (0, 0.5) + text-stream skip": (
            prompts + step[f"{faithful}: {first}"] + (mixing - 1) * step[f"{faithful}: {later}"] + decode
            + (step[f"{alone}: {cached}"] + (steps - mixing - 1) * step[f"{alone}: {later}"] if steps > mixing else 0)),
    }
    return {name: {"tflop": round(v, 2), "x_plain": round(v / totals["plain"], 3)} for name, v in totals.items()}


# ----------------------------------------------------------------------------------------------- running


def run(args: argparse.Namespace, modes: list[Mode]) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    # One kernel for plain SDXL and ours, chosen as load_pipeline chooses it (auto: xformers only if it runs here).
    backend = backends.resolve_backend(args.attention, device, dtype)
    # Built on the device even for the offload modes (random init is fast there); enabling offload moves it out.
    start = time.perf_counter()
    engine = build_engine(device, dtype, tiny=args.quick)
    build_s = time.perf_counter() - start
    if args.channels_last:
        engine.unet.to(memory_format=torch.channels_last)
    bench = Bench(engine, args, modes, backend)
    info = {"build_s": round(build_s, 1), "attention_used": backend.name,
            **({"quantized_linear_layers": bench.quantized} if bench.quantized else {}),
            "weights_gb": round(parameter_bytes(engine.unet, engine.vae, engine.text_encoder,
                                                engine.text_encoder_2, engine.id_encoder) / 1e9, 2)}
    if args.explain:
        info["graph_breaks"] = explain_graph_breaks(bench, modes)

    # Warm-up (one-off kernel selection, compilation): every mode once, with enough steps to see each batch layout.
    warmup = {}
    for mode in modes if args.warmup_steps else []:
        sample = bench.call(mode, args.warmup_steps)
        warmup[mode.name] = round(sample["e2e_s"], 2)
    rounds: list[dict[str, dict]] = []
    for _ in range(args.repeats):
        rounds.append({mode.name: bench.call(mode, args.steps) for mode in modes})
    info["warmup_e2e_s"] = warmup
    reports = {key: pipe.compile_report for key, pipe in bench.pipes.items() if hasattr(pipe, "compile_report")}
    if reports:
        # Compilation happens in each layout's first call (the warm-up): reported apart from the timed rounds.
        info["compile_first_call_s"] = reports
    if getattr(bench, "lora_params", None):
        info["identity_lora"] = {"rank": args.lora_rank, "parameters_m": round(bench.lora_params / 1e6, 1)}
    if args.skip_vae and not args.quick:
        info["vae_decode_s"] = time_vae_decode(engine, args.resolution)
    if args.id_encoder:
        info["id_encoder"] = time_id_encoder(engine, with_tower=True)
    bench.timer.remove()
    info["ru_maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"rounds": rounds, "info": info}


def decodes(mode: Mode) -> int:
    """Images the VAE decodes per call: the faithful two-stream call also returns the text stream's image."""
    two = mode.kwargs.get("method") == "infinite-id" and mode.kwargs.get("return_text_images", True)
    return 2 if two else 1


def summarise(rounds: list[dict[str, dict]], modes: list[Mode], info: dict, project_steps: int = 30) -> dict:
    """Medians over rounds; ratios are the median over rounds of (mode / plain of the same round).

    With the decode skipped and timed once (``info["vae_decode_s"]``), each mode also gets a projected time per
    image at ``project_steps`` steps with its decodes: other work + steps x UNet time per step + decodes x decode.
    """
    summary = {}
    vae = info.get("vae_decode_s")
    for mode in modes:
        samples = [r[mode.name] for r in rounds if mode.name in r]
        entry = {
            "note": mode.note,
            "unet_step_s": statistics.median(s["unet_step_s"] for s in samples),
            "unet_s": statistics.median(s["unet_s"] for s in samples),
            "e2e_s": statistics.median(s["e2e_s"] for s in samples),
            "unet_batches": samples[0]["unet_batches"],
            "peak_bytes": max(s["peak_bytes"] for s in samples),
            "peak_above_start_bytes": max(s["peak_above_start_bytes"] for s in samples),
            "samples": samples,
            "errors": sorted({s["error"] for s in samples if s.get("error")}),
        }
        if vae is not None:
            entry["projected_s"] = (entry["e2e_s"] - entry["unet_s"] + project_steps * entry["unet_step_s"]
                                    + decodes(mode) * vae)
        cpu = all("unet_step_cpu_s" in s for s in samples)
        if cpu:
            entry["unet_step_cpu_s"] = statistics.median(s["unet_step_cpu_s"] for s in samples)
            entry["e2e_cpu_s"] = statistics.median(s["e2e_cpu_s"] for s in samples)
        paired = [r for r in rounds if "plain" in r and mode.name in r]
        if paired:
            entry["step_vs_plain"] = _paired_ratio(paired, mode.name, "unet_step_s")
            entry["e2e_vs_plain"] = _paired_ratio(paired, mode.name, "e2e_s")
            if cpu and all("unet_step_cpu_s" in r["plain"] for r in paired):
                entry["step_vs_plain_cpu"] = _paired_ratio(paired, mode.name, "unet_step_cpu_s")
                entry["e2e_vs_plain_cpu"] = _paired_ratio(paired, mode.name, "e2e_cpu_s")
            # Steps after the first of each call (ours projects its identity and text K/V at the first): what
            # every step but one of a long call costs. Only when both modes ran one batch layout throughout.
            for key, calls in (("later_steps_vs_plain", "unet_calls"), ("later_steps_vs_plain_cpu", "unet_calls_cpu")):
                if all(len(set(r[n]["unet_batches"])) == 1 and len(r[n].get(calls, ())) > 1
                       for r in paired for n in (mode.name, "plain")):
                    entry[key] = statistics.median(_mean(r[mode.name][calls][1:]) / _mean(r["plain"][calls][1:])
                                                   for r in paired)
        summary[mode.name] = entry
    if vae is not None and "plain" in summary:
        for entry in summary.values():
            entry["projected_vs_plain"] = entry["projected_s"] / summary["plain"]["projected_s"]
    return summary


def _mean(values) -> float:
    return sum(values) / len(values)


def _paired_ratio(rounds: list[dict[str, dict]], name: str, key: str, base: str = "plain") -> float:
    """Median over rounds of (mode / ``base`` of the same round)."""
    return statistics.median(r[name][key] / r[base][key] for r in rounds)


def lora_costs(rounds: list[dict[str, dict]]) -> dict:
    """What the identity LoRA costs: per step and per image, (mode with it / the same mode without it), the median
    over rounds of the pair in the same round; in thread CPU time where measured."""
    costs = {}
    for with_lora, without in LORA_PAIRS:
        paired = [r for r in rounds if with_lora in r and without in r]
        if not paired:
            continue
        entry = {"step": _paired_ratio(paired, with_lora, "unet_step_s", without),
                 "image": _paired_ratio(paired, with_lora, "e2e_s", without),
                 "per_round_step": [round(r[with_lora]["unet_step_s"] / r[without]["unet_step_s"], 4) for r in paired]}
        if all("unet_step_cpu_s" in r[with_lora] and "unet_step_cpu_s" in r[without] for r in paired):
            entry["step_cpu"] = _paired_ratio(paired, with_lora, "unet_step_cpu_s", without)
            entry["image_cpu"] = _paired_ratio(paired, with_lora, "e2e_cpu_s", without)
            entry["per_round_step_cpu"] = [round(r[with_lora]["unet_step_cpu_s"] / r[without]["unet_step_cpu_s"], 4)
                                           for r in paired]
        costs[f"{with_lora} / {without}"] = entry
    return costs


def run_isolated(args: argparse.Namespace, modes: list[Mode]) -> dict:
    """Each mode in its own process (honest process-wide memory; required by the offload modes). Not interleaved."""
    rounds: list[dict[str, dict]] = [{} for _ in range(args.repeats)]
    infos = {}
    for mode in modes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "mode.json"
            child = [sys.executable, str(Path(__file__).resolve()), *_child_argv(args), "--modes", mode.name,
                     "--json", str(out), "--no-results", "--child"]
            subprocess.run(child, check=True)
            data = json.loads(out.read_text())
        for i, sample in enumerate(data["raw_rounds"]):
            rounds[i][mode.name] = sample[mode.name]
        infos[mode.name] = data["info"]
    return {"rounds": rounds, "info": {"per_mode": infos}}


def _child_argv(args: argparse.Namespace) -> list[str]:
    skip = {"modes", "json", "results", "no_results", "isolate", "child"}
    argv = []
    for key, value in vars(args).items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


# ----------------------------------------------------------------------------------------------- reporting


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def _verdict(entry: dict, key: str, bar: float) -> str:
    """``wall`` (and ``CPU time`` where measured) ratio against ``bar``."""
    parts = []
    for label, k in (("wall", key), ("CPU time", key + "_cpu")):
        if k in entry:
            parts.append(f"{label} **{entry[k]:.3f}** ({'met' if entry[k] <= bar else 'not met'})")
    return ", ".join(parts)


# Issue 15's speed goals (ratios to plain SDXL of the same run): on a CPU (512² bf16, CPU time) the faithful
# per-step ratio and the window mode's end-to-end ratio; on a GPU (1024², 30 steps) both end to end.
GOALS = {"cpu": {"infinite-id": ("step_vs_plain", 2.05), "infinite-id-window": ("e2e_vs_plain", 1.55)},
         "gpu": {"infinite-id": ("e2e_vs_plain", 1.40), "infinite-id-window": ("e2e_vs_plain", 1.20)},
         "gpu-fast": {"infinite-id": ("e2e_vs_plain", 1.50)}}


def bars(summary: dict, skip_vae: bool, device: str = "cpu", fast: str = "off") -> list[str]:
    """Issue 15's goals, where the modes they concern were measured (and the same figures of their variants)."""
    goals = GOALS["cpu" if device == "cpu" else "gpu" if fast == "off" else "gpu-fast"]
    decode = ", VAE decode skipped" if skip_vae else ""
    lines = []
    for base, (key, goal) in goals.items():
        for name in (base, f"{base}+no-text-cache", f"{base}-app"):  # -app: as the app calls it
            if name not in summary or key not in summary[name]:
                continue
            what = "per-step" if key == "step_vs_plain" else f"end-to-end{decode}"
            line = f"{what} ratio, {name} / plain, goal <= {goal}: {_verdict(summary[name], key, goal)}"
            later = summary[name].get("later_steps_vs_plain_cpu", summary[name].get("later_steps_vs_plain"))
            if key == "step_vs_plain" and later is not None:
                line += (f"; steps after a call's first (its K/V cache full; "
                         f"{'CPU time' if 'later_steps_vs_plain_cpu' in summary[name] else 'wall'}): {later:.3f}")
            if "projected_vs_plain" in summary[name] and key == "e2e_vs_plain":
                line += f"; projected to 30 steps with the decode (wall): {summary[name]['projected_vs_plain']:.3f}"
            lines.append(line)
    return lines


def markdown(result: dict) -> str:
    s, summary = result["settings"], result["summary"]
    gb = 1e9
    mem = "peak GPU alloc GB (above start)" if s["device"].startswith("cuda") else "peak RSS GB (above start)"
    lines = [
        f"### {result['date']}: {s['device_name']}, {s['dtype']}, {s['resolution']}², {s['steps']} steps",
        "",
        f"- command: `{result['command']}`",
        f"- versions: torch {result['versions']['torch']}, diffusers {result['versions']['diffusers']}, "
        f"transformers {result['versions']['transformers']}, python {result['versions']['python']}",
        f"- model: {'TINY test components (sanity run, not SDXL)' if s['quick'] else 'SDXL base architecture, random weights'}"
        f"; guidance {s['guidance']}; VAE decode {'skipped' if s['skip_vae'] else 'included'}; attention {s['attention']}"
        f"{' (used: ' + result['info']['attention_used'] + ')' if 'attention_used' in result['info'] else ''}; "
        f"compile {s['compile']}; channels_last {s['channels_last']}; memory {s['memory']}"
        f"{'; VAE slicing' if s['vae_slicing'] else ''}{'; VAE tiling' if s['vae_tiling'] else ''}"
        f"{'; fast mode ' + s['fast'] if s['fast'] != 'off' else ''}",
        f"- {s['repeats']} timed rounds{' interleaved' if not s['isolate'] else ' (modes in separate processes)'}, "
        f"warm-up {s['warmup_steps']} steps per mode; load average before/after: {s['load_before']} / {s['load_after']}",
        "",
    ]
    cpu = all("unet_step_cpu_s" in e for e in summary.values())
    head = "| mode | UNet batch per step | UNet s/step | step × plain | s/image | image × plain |"
    head += " UNet CPU-s/step | step × plain (CPU time) | image × plain (CPU time) |" if cpu else ""
    lines += [f"{head} {mem} |", "|" + " --- |" * (head.count("|"))]
    fmt = lambda e, key: f"{e[key]:.3f}" if key in e else "-"  # noqa: E731
    for name, e in summary.items():
        row = (f"| {name} | {_batches(e['unet_batches'])} | {e['unet_step_s']:.3f} | {fmt(e, 'step_vs_plain')} | "
               f"{e['e2e_s']:.2f} | {fmt(e, 'e2e_vs_plain')} |")
        if cpu:
            row += f" {e['unet_step_cpu_s']:.3f} | {fmt(e, 'step_vs_plain_cpu')} | {fmt(e, 'e2e_vs_plain_cpu')} |"
        lines.append(f"{row} {e['peak_bytes'] / gb:.2f} ({e['peak_above_start_bytes'] / gb:.2f}) |")
    lines.append("")
    lines += [f"- {line}" for line in bars(summary, s["skip_vae"], s["device"], s["fast"])]
    for pair, c in result.get("lora_costs", {}).items():
        cpu = (f"; CPU time: step **{c['step_cpu']:.3f}**, image {c['image_cpu']:.3f} (per round "
               f"{', '.join(f'{x:.3f}' for x in c['per_round_step_cpu'])})") if "step_cpu" in c else ""
        lines.append(f"- identity LoRA cost, {pair}: wall step {c['step']:.3f}, image {c['image']:.3f}{cpu}")
    lines += [f"- {name}: ERROR {'; '.join(e['errors'])}" for name, e in summary.items() if e.get("errors")]
    info = result["info"]
    if "vae_decode_s" in info:
        projected = ", ".join(f"{k} {v['projected_s']:.1f} s ({v['projected_vs_plain']:.3f})"
                              for k, v in summary.items() if "projected_vs_plain" in v)
        lines.append(f"- one VAE decode: {info['vae_decode_s']:.2f} s; projected s/image at 30 steps with decode "
                     f"(x plain): {projected}")
    if "flops" in info:
        flops = dict(info["flops"])
        per_image = {k: flops.pop(k) for k in list(flops) if k.startswith("per image, ")}
        lines.append(f"- TFLOP per UNet step at {s['resolution']}² (counted on the meta device; x plain CFG step): "
                     + "; ".join(f"{name} {v['tflop']:.2f} ({v['x_plain']:.3f})" for name, v in flops.items()))
        for label, table in per_image.items():
            what = label.removesuffix(", no decode") + (" (prompt encoding included, no decode" if "no decode" in label
                                                        else " (prompt encoding and decodes included")
            lines.append(f"- TFLOP {what}; x plain): "
                         + "; ".join(f"{name} {v['tflop']:.1f} ({v['x_plain']:.3f})" for name, v in table.items()))
    if "compile_first_call_s" in info:
        lines.append(f"- torch.compile ({s['compile']}, backend {s.get('compile_backend', 'inductor')}"
                     f"{', plain left uncompiled' if s.get('compile_skip_plain') else ''}): first call of each batch "
                     "layout, compilation + one step, not in the timed rounds: " + "; ".join(
                         f"{pipe}: {layout} {sec:.1f} s" for pipe, layouts in info["compile_first_call_s"].items()
                         for layout, sec in layouts.items()))
    if "quantized_linear_layers" in info:
        lines.append(f"- UNet int8 weight-only (torchao): {info['quantized_linear_layers']} Linear layers")
    if "identity_lora" in info:
        lines.append(f"- identity LoRA: rank {info['identity_lora']['rank']}, "
                     f"{info['identity_lora']['parameters_m']} M parameters (random)")
    if "lora_flops" in info:
        lines.append("- identity LoRA, TFLOP per UNet step without -> with (ratio; package processors, meta device): "
                     + "; ".join(f"{k} {v['tflop_without']:.3f} -> {v['tflop_with']:.3f} ({v['ratio']:.4f})"
                                 for k, v in info["lora_flops"].items()))
    if "id_encoder" in info:
        lines.append("- per photo (not per step): " + ", ".join(f"{k} {v:.4f} s" for k, v in info["id_encoder"].items()))
    if "graph_breaks" in info:
        for key, g in info["graph_breaks"].items():
            why = "; ".join(g["reasons"][:3])
            lines.append(f"- dynamo explain, {key}: {g['graphs']} graphs, {g['graph_breaks']} graph breaks"
                         f"{' (' + why + ')' if why else ''}")
    if "per_mode" in info:  # --isolate: one process per mode
        lines.append("- per process (one per mode): " + ", ".join(
            f"{name} weights {i['weights_gb']} GB, ru_maxrss {i['ru_maxrss_gb']:.2f} GB"
            for name, i in info["per_mode"].items()))
    elif s["device"] == "cpu":
        lines.append(f"- process-wide peak RSS (ru_maxrss): {info['ru_maxrss_gb']:.2f} GB "
                     f"(weights {info['weights_gb']} GB)")
    return "\n".join(lines) + "\n"


def _batches(batches: list[int]) -> str:
    """``[4, 4, 2, 2]`` -> ``4 x2, 2 x2``."""
    parts, last, count = [], None, 0
    for b in [*batches, None]:
        if b == last:
            count += 1
            continue
        if last is not None:
            parts.append(f"{last} x{count}")
        last, count = b, 1
    return ", ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, bf16 on CPU")
    p.add_argument("--resolution", type=int, default=None, help="default: 1024 on CUDA, 512 on CPU, 64 with --quick")
    p.add_argument("--steps", type=int, default=None, help="default: 30 (or the fast mode's steps)")
    p.add_argument("--guidance", type=float, default=None, help="default: 5.0 (or the fast mode's)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (each runs every mode once)")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up call per mode (0: none)")
    p.add_argument("--modes", default=DEFAULT_MODES)
    p.add_argument("--json", type=Path, help="write the full result here")
    p.add_argument("--results", type=Path, help="append the markdown table here (default: benchmarks/RESULTS.md; "
                                                "not for --quick unless given)")
    p.add_argument("--no-results", action="store_true", help="append no markdown table")
    p.add_argument("--skip-vae", action="store_true", help="output latents: no VAE decode in the end-to-end time")
    p.add_argument("--quick", action="store_true", help="tiny components: a sanity run in seconds, not a measurement")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--attention", choices=backends.CHOICES, default="sdpa",
                   help="sdpa (default), xformers (stops if it cannot run here), or auto (as the app chooses)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", choices=("off", "default", "max-autotune-no-cudagraphs", "reduce-overhead"),
                   default="off", help="torch.compile the UNet (our processors inside the graph), through "
                   "infinite_id.models.loading.compile_unet: one graph per batch layout, first calls reported apart")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a dry run of the "
                   "compile path without code generation, for gpu.sh QUICK=1 on a CPU)")
    p.add_argument("--compile-skip-plain", action="store_true",
                   help="leave plain SDXL uncompiled (compiled ours against stock diffusers)")
    p.add_argument("--vram-tier", choices=tiers.TIER_NAMES, help="a VRAM tier's options (models/tiers.py): its "
                   "memory mode, VAE slicing/tiling and UNet quantization; CUDA only")
    p.add_argument("--quantize", choices=("off", "int8"), default="off", help="torchao int8 weight-only UNet")
    p.add_argument("--explain", action="store_true", help="count dynamo graph breaks per mode (torch._dynamo.explain)")
    p.add_argument("--flops", action="store_true", help="also count UNet FLOPs per step of each batch layout (meta "
                                                        "device: exact and free)")
    p.add_argument("--memory", choices=("none", "model", "sequential"), default="none",
                   help="CPU offload (CUDA only; runs each mode in its own process)")
    p.add_argument("--vae-slicing", action="store_true")
    p.add_argument("--vae-tiling", action="store_true")
    p.add_argument("--fast", choices=("off", *fast_modes.FAST_MODES), default="off",
                   help="a fast mode's scheduler, steps and guidance (its LoRA is fused: no cost of its own)")
    p.add_argument("--id-encoder", action="store_true", help="also time the ID encoder and the CLIP ViT-H tower")
    p.add_argument("--isolate", action="store_true", help="each mode in its own process (not interleaved)")
    p.add_argument("--lora-rank", type=int, default=128, help="rank of the identity LoRA of the *-lora modes "
                   "(default 128, the IP-Adapter-FaceID files')")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if args.vram_tier:
        tier = tiers.TIERS[args.vram_tier]
        if args.quantize == "off" and tier.quantize:
            problem = tiers.quantizer_problem(args.device, DTYPES[args.dtype or ("fp16" if cuda else "bf16")])
            args.quantize = tier.quantize if problem is None else "off"
            tier = tier if problem is None else dataclasses.replace(tier, memory_mode=tier.fallback_memory_mode)
            if problem:
                print(f"note: tier {tier.name} without quantization ({problem}): {tier.memory_mode} offload")
        args.memory = tier.memory_mode if args.memory == "none" else args.memory
        args.vae_slicing, args.vae_tiling = args.vae_slicing or tier.vae_slicing, args.vae_tiling or tier.vae_tiling
    args.dtype = args.dtype or ("fp16" if cuda else "bf16")
    args.resolution = args.resolution or (64 if args.quick else 1024 if cuda else 512)
    defaults = fast_modes.sampling_defaults(args.fast)
    args.steps = args.steps or (2 if args.quick else defaults.num_inference_steps)
    args.guidance = defaults.guidance_scale if args.guidance is None else args.guidance
    if args.memory != "none" and not cuda:
        p.error("--memory model/sequential offloads to the CPU from an accelerator; it needs --device cuda.")
    if args.memory != "none":
        args.isolate = True  # offload hooks live on the shared modules: one pipeline per process
    if args.compile == "reduce-overhead":
        print("note: reduce-overhead uses CUDA graphs; per-call inputs (IDCall tensors) may force re-recording.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile != "off":
        # One static graph per batch layout (4 rows mixing, 2 rows after the window, 2 rows plain...), no dynamic
        # shapes, and room for all of them.
        torch._dynamo.config.automatic_dynamic_shapes = False
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, 64)
    modes = [parse_mode(m.strip()) for m in args.modes.split(",") if m.strip()]
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    outcome = run_isolated(args, modes) if args.isolate else run(args, modes)
    if args.flops and not args.quick:
        outcome["info"]["flops"] = count_flops(args.resolution, args.steps, args.skip_vae)
        if any(m.kwargs.get("lora_scale") for m in modes):
            outcome["info"]["lora_flops"] = count_lora_flops(args.resolution, args.lora_rank)
    summary = summarise(outcome["rounds"], modes, outcome["info"])
    device = torch.device(args.device)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/speed.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "device_name": machine(device), "load_before": load_before,
                     "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg())},
        "summary": {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in summary.items()},
        "raw_rounds": outcome["rounds"],
        "lora_costs": lora_costs(outcome["rounds"]),
        "info": outcome["info"],
    }
    table = markdown(result)
    if not args.child:
        print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    target = args.results or (None if args.quick else ROOT / "benchmarks" / "RESULTS.md")
    if target and not args.no_results:
        with target.open("a") as f:
            f.write("\n" + table)
    return result


if __name__ == "__main__":
    main()
