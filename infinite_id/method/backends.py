"""The attention kernel behind every processor, chosen once when a pipeline is built (DESIGN 6).

* ``sdpa``: torch's ``scaled_dot_product_attention``; always available, on every device.
* ``xformers``: ``xformers.ops.memory_efficient_attention``. Chosen only after a probe: a tiny real call on the
  device, plain and with a logit bias, whose outputs must match SDPA's. The xformers wheel most people install
  is built for one torch release; beside another it imports but every op raises ``NotImplementedError``
  ("No operator found for memory_efficient_attention_forward"), so being importable proves nothing.

``resolve_backend("auto" | "sdpa" | "xformers", device, dtype)`` returns a backend object and says why in one log
line. ``auto`` falls back to SDPA when xformers is missing or fails the probe; an explicit ``xformers`` that cannot
run raises :class:`AttentionBackendError` naming the installed xformers and torch versions. A backend is called as
``backend(q, k, v, bias)`` on ``[batch, heads, tokens, head_dim]`` tensors, ``bias`` added to the logits.

Mixed attention weights the text-stream keys by ``w`` (a logit bias ``log w``). With xformers that is either one
call with a tensor ``attn_bias`` (what the processors do today: they concatenate the keys) or two bias-free calls
on the two key sets merged exactly through their log-sum-exp (:func:`merge_partials`, ``backend.mixed``):
``out = (e^lse1 o1 + w e^lse2 o2) / (e^lse1 + w e^lse2)``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CHOICES = ("auto", "sdpa", "xformers")
# Largest |xformers - SDPA| the probe accepts, per dtype: both are fused kernels accumulating in fp32, so they
# differ by a few units in the last place of the output dtype; a kernel computing something else is off by > 0.1.
PROBE_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}
BIAS_ALIGNMENT = 8  # xformers wants the bias's key axis to start on a 16-byte boundary in 16-bit types


class AttentionBackendError(ValueError):
    """An explicitly requested attention backend cannot run here (stops the program at start-up)."""


def merge_partials(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor,
                   log_weight: float = 0.0) -> torch.Tensor:
    """Attention over the keys of two calls together, from each call's output ``[b, h, n, d]`` and log-sum-exp
    of its logits ``[b, h, n]``, with ``log_weight`` added to the second call's logits. Exact (up to rounding):
    softmax over the union is ``e^lse_i`` times each part's softmax, renormalised."""
    lse1, lse2 = lse1.float(), lse2.float() + log_weight
    total = torch.logaddexp(lse1, lse2)
    w1, w2 = torch.exp(lse1 - total).unsqueeze(-1), torch.exp(lse2 - total).unsqueeze(-1)
    return (w1 * out1.float() + w2 * out2.float()).to(out1.dtype)


class SDPABackend:
    """torch's fused attention (flash / memory-efficient / math, picked by torch per call).

    ``mixed`` is one biased call on the concatenated keys: torch has no public SDPA that returns the log-sum-exp,
    and on this CPU the two-call merge (through the private flash op) was slower anyway: 150.5 against 141.4 ms
    for one biased call at SDXL's 640-channel mixed layer (bf16, 512², one thread; 20.9 against 19.1 at 1280)."""

    name = "sdpa"
    merges_two_calls = False  # the processors concatenate the keys and call once with a logit bias

    @staticmethod
    def key_multiple(device: torch.device) -> int:
        """Pad constant key sets (the identity tokens) to a multiple of this with a -inf bias on the padding.

        CPU: 16; torch's CPU flash kernel works in key blocks and was measured 2.6-3.7x slower on 261 keys than
        on 272 on an Intel Xeon (3-5% on an AMD EPYC). CUDA: 1, since a mask moves SDPA off its flash kernel."""
        return 16 if torch.device(device).type == "cpu" else 1

    def __call__(self, q, k, v, bias=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def mixed(self, q, k1, v1, k2, v2, log_weight: float):
        """Attention over ``[k1 ; k2]`` with ``log_weight`` on the logits of ``k2`` (one biased call)."""
        bias = torch.zeros(1, 1, 1, k1.shape[2] + k2.shape[2], dtype=q.dtype, device=q.device)
        bias[..., k1.shape[2]:] = log_weight
        return self(q, torch.cat([k1, k2], dim=2), torch.cat([v1, v2], dim=2), bias)

    def __repr__(self) -> str:
        return "SDPABackend()"


class XFormersBackend:
    """xformers' memory-efficient attention. ``ops`` is the ``xformers.ops`` module, imported once when the
    backend is chosen (never looked up per call)."""

    name = "xformers"

    def __init__(self, ops):
        self._ops = ops
        # With partial attention the mixed attention's weight on the text keys needs no bias tensor: two bias-free
        # calls (the fastest kernels; a tensor bias limits xformers to its cutlass kernel) merged by log-sum-exp.
        self.merges_two_calls = getattr(ops.fmha, "memory_efficient_attention_partial", None) is not None

    @staticmethod
    def key_multiple(device: torch.device) -> int:
        return 1  # CUDA kernels take any key count; padding would need a bias tensor

    def __call__(self, q, k, v, bias=None):
        # xformers takes [batch, tokens, heads, head_dim]; our tensors are views of that layout, so no copy.
        if bias is not None:
            bias = _aligned_bias(bias, q, k)
        out = self._ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_bias=bias)
        return out.transpose(1, 2)

    def mixed(self, q, k1, v1, k2, v2, log_weight: float):
        """Two bias-free calls merged through their log-sum-exp (no concatenated keys, no bias tensor)."""
        partial = getattr(self._ops.fmha, "memory_efficient_attention_partial", None)
        if partial is None:  # an xformers without partial attention: one call with a bias tensor
            return SDPABackend.mixed(self, q, k1, v1, k2, v2, log_weight)
        parts = [partial(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) for k, v in ((k1, v1), (k2, v2))]
        (o1, lse1), (o2, lse2) = [(o.transpose(1, 2), lse[..., : q.shape[2]]) for o, lse in parts]
        return merge_partials(o1, lse1, o2, lse2, log_weight).to(q.dtype)

    def __repr__(self) -> str:
        return "XFormersBackend()"


def _aligned_bias(bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``bias`` broadcast to ``[batch, tokens_q, heads, tokens_k]``'s BMHK-attention shape ``[b, h, n_q, n_k]``
    as xformers requires: its dtype, its key axis padded in memory to a multiple of 8 and sliced back (xformers'
    own hint), and broadcast dimensions as stride-0 views (never a materialised ``[b, h, n_q, n_k]`` tensor)."""
    n_k = k.shape[2]
    padded = -n_k % BIAS_ALIGNMENT
    if padded or bias.dtype != q.dtype or bias.stride(-1) != 1:
        store = bias.new_zeros((*bias.shape[:-1], n_k + padded), dtype=q.dtype)
        store[..., :n_k] = bias
        bias = store[..., :n_k]
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], n_k)


SDPA = SDPABackend()


def installed_versions() -> tuple[str | None, str]:
    """(xformers version or None when it is not installed, torch version), read without importing xformers.

    The xformers version names the torch its kernels were built for when the wheel records it (its
    ``cpp_lib.json``, also shown by ``python -m xformers.info``): "0.0.35 (built for torch 2.10.0+cu128)"."""
    spec = importlib.util.find_spec("xformers")
    if spec is None:
        return None, torch.__version__
    try:
        version = importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        version = "of unknown version"
    for folder in spec.submodule_search_locations or ():
        try:
            built = json.loads((Path(folder) / "cpp_lib.json").read_text())["version"]["torch"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        version += f" (built for torch {built})"
        break
    return version, torch.__version__


def probe(backend, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when ``backend`` computes what SDPA computes on ``device`` in ``dtype`` (plain, with a logit bias on
    a key count that is not a multiple of 8, and the two-call mixed form); else why not, in a few words."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 64, generator=g).to(device, dtype) for _ in range(3))
    k_t, v_t = (torch.randn(2, 2, 37, 64, generator=g).to(device, dtype) for _ in range(2))
    bias = torch.zeros(1, 1, 1, 101, dtype=dtype, device=device)
    bias[..., 64:] = math.log(0.7)
    k_all, v_all = torch.cat([k, k_t], dim=2), torch.cat([v, v_t], dim=2)
    cases = {
        "plain": (lambda b: b(q, k, v)),
        "logit bias": (lambda b: b(q, k_all, v_all, bias)),
        "mixed": (lambda b: b.mixed(q, k, v, k_t, v_t, math.log(1.7))),
    }
    tolerance = PROBE_TOLERANCE.get(dtype, 1e-2)
    for label, run in cases.items():
        try:
            with torch.no_grad():
                got, want = run(backend), run(SDPA)
        except Exception as exc:  # noqa: BLE001 - any failure of an optional kernel means "do not use it"
            return f"{type(exc).__name__}: {_first_line(exc)}"
        error = (got.float() - want.float()).abs().max().item()
        if not error <= tolerance:  # also catches NaN
            return f"its {label} attention differs from SDPA's by {error:.3g} (tolerance {tolerance:g})"
    return None


def resolve_backend(choice: str | None, device: torch.device | str, dtype: torch.dtype):
    """The backend for ``choice`` on ``device``/``dtype``, probed once; logs one line saying which and why."""
    choice = (choice or "auto").lower()
    if choice not in CHOICES:
        raise ValueError(f"attention must be one of {', '.join(CHOICES)}; got {choice!r}.")
    if choice == "sdpa":
        logger.info("Attention: SDPA (as asked).")
        return SDPA
    xformers_version, torch_version = installed_versions()
    if xformers_version is None:
        why = "xformers is not installed"
    else:
        try:
            import xformers.ops as ops

            backend = XFormersBackend(ops)
            why = probe(backend, device, dtype)
        except Exception as exc:  # noqa: BLE001 - a broken install may fail at import too
            why = f"{type(exc).__name__}: {_first_line(exc)}"
        if why is None:
            logger.info("Attention: xformers %s (probed on %s: matches SDPA).", xformers_version, device)
            return backend
    if choice == "xformers":
        raise AttentionBackendError(_refusal(xformers_version, torch_version, device, why))
    logger.info("Attention: SDPA (xformers not used: %s).", _said(xformers_version, torch_version, device, why))
    return SDPA


def _said(xformers_version, torch_version, device, why) -> str:
    if xformers_version is None:
        return f"{why}; torch {torch_version}"
    return f"xformers {xformers_version} cannot run here with torch {torch_version} on {device}: {why}"


def _refusal(xformers_version, torch_version, device, why) -> str:
    if xformers_version is None:
        return (f"--attention xformers was asked for, but xformers is not installed beside torch {torch_version}; "
                "install the xformers build made for this torch (see the README) or use --attention auto or sdpa.")
    return (f"--attention xformers was asked for, but the installed xformers {xformers_version} cannot run with torch "
            f"{torch_version} on {device} ({why}); install the xformers build made for torch {torch_version} (see "
            "the README) or use --attention auto or sdpa.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:200]


def stock_processor(backend):
    """diffusers' own processor for plain SDXL on the same kernel (the benchmark's baseline and text-only paths)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    return XFormersAttnProcessor() if backend.name == "xformers" else AttnProcessor2_0()
