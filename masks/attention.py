"""Masked cross-attention: softmax(Q K^T / sqrt(d) + bias) V, per head, one bias shared by every head.

The attention itself is whatever function the caller hands in (the host's own backend in ComfyUI), so the
user's choice of xformers / SDPA / sub-quadratic / sage is kept. `explicit_attention` is the plain-softmax
version: the float64 reference in tests, and the training path (torch's efficient SDPA backward rejects a
broadcast [B, 1, N, T] bias on CUDA).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

AttentionFn = Callable[..., Tensor]


def bias_as_mask(bias: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, N, T] gate bias -> [B, 1, N, T] additive mask in the attention dtype.

    [B, 1, N, T] float is the one mask layout every ComfyUI backend accepts on old and new hosts ([B, N, T] is
    silently misread by the 2024 pytorch backend when B equals the head count).
    """
    return (bias if bias.dtype == dtype else bias.to(dtype)).unsqueeze(1)


@dataclass
class DeferredBias:
    """A gate bias whose "suppresses nothing" is known only on the device (device_skip executors, masks/runtime.py).

    `unmasked` is a 0-dim bool tensor, true where the bias is all zeros: the layer must then give the unmasked call's
    output, bit for bit, as the straightforward path does by skipping the bias. Reading it on the host would be a
    device sync per layer; masked_attention selects on the device instead.
    """

    bias: Tensor  # [B, N, T]
    unmasked: Tensor  # 0-dim bool, same device


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, bias: Tensor | DeferredBias | None, attention_fn: AttentionFn,
    masked_fn: AttentionFn | None = None, **fn_kwargs
) -> Tensor:
    """q [B, N, H*d], k/v [B, T, H*d], bias [B, N, T] or None -> [B, N, H*d], through `attention_fn` (unmasked calls)
    and `masked_fn` (calls with a mask; default: attention_fn).

    With no bias the call is exactly the unpatched one, so untouched layers stay bit-identical. A DeferredBias runs
    both calls and keeps the unmasked one's output where its flag is set: the same bits as the host-side skip, with
    one more attention call instead of a sync.
    """
    if bias is None:
        return attention_fn(q, k, v, heads, **fn_kwargs)
    masked_fn = masked_fn or attention_fn
    if isinstance(bias, DeferredBias):
        masked = masked_fn(q, k, v, heads, mask=bias_as_mask(bias.bias, q.dtype), **fn_kwargs)
        return torch.where(bias.unmasked, attention_fn(q, k, v, heads, **fn_kwargs), masked)
    return masked_fn(q, k, v, heads, mask=bias_as_mask(bias, q.dtype), **fn_kwargs)


_FALLBACKS_WARNED: set[str] = set()


def warn_mask_fallback(backend: str, fallback: str) -> None:
    """One warning per backend, the first time a masked layer has to leave it (not one per call)."""
    if backend in _FALLBACKS_WARNED:
        return
    _FALLBACKS_WARNED.add(backend)
    logging.getLogger("MaskAttn").warning(
        "MaskAttn: ComfyUI's attention backend (%s) cannot apply an attention mask; the cross-attention layers "
        "MaskAttn masks run %s instead (every other attention call keeps %s).", backend, fallback, backend)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None, **_ignored) -> Tensor:
    """The textbook formula with an explicit softmax; same signature as ComfyUI's attention functions."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.view(b, n, heads, d).transpose(1, 2)
    kh = k.view(b, -1, heads, d).transpose(1, 2)
    vh = v.view(b, -1, heads, d).transpose(1, 2)
    # Logits and softmax in at least fp32: fp16 q.k overflows to inf for large activations (inf - inf = NaN in the
    # softmax), and masked rows differ by 1e4. The weights go back to the input dtype for the product with v.
    compute = torch.promote_types(q.dtype, torch.float32)
    logits = (qh.to(compute) @ kh.to(compute).transpose(-1, -2)) * d ** -0.5
    if mask is not None:
        logits = logits + mask.to(compute)
    weights = logits.softmax(dim=-1).to(vh.dtype)
    out = weights @ vh
    return out.transpose(1, 2).reshape(b, n, inner)
