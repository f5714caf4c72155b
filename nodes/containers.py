"""The attention containers MaskAttn puts at each gated site, and the host attention function they run.

The `attn2` replace at (block, number, index) is MaskAttnAttention: it takes q/k/v, pops the bias the gate patch
left (nodes/gate_patch.py) and runs masked attention through the host's own attention function, then adds the terms
of any callbacks other packs registered (IPAdapter-style containers: `.callback`/`.kwargs` lists and `.add()`).
MaskAttnSelfAttention is its `attn1` twin for gate sources that mask self-attention.
"""

from __future__ import annotations

import copy
import inspect
import weakref

from ..masks.attention import masked_attention, warn_mask_fallback
from ..masks.context import FEATURES_KEY
from ..masks.rows import PROMPT_ROWS_KEY
from ..masks.topology import SiteKey
from .gate_patch import BIAS_KEY, ROWS_KEY, SEEN_KEY, MaskAttnGatePatch, PatchOrderError, gated_rows

# --- the host's attention function ------------------------------------------------------------------------------
_HOST_KWARGS: tuple[bool, bool] | None = None


def _host_attention():
    import comfy.ldm.modules.attention as attention

    global _HOST_KWARGS
    if _HOST_KWARGS is None:  # newer hosts take attn_precision and transformer_options (optimized_attention_override)
        params = inspect.signature(attention.attention_basic).parameters
        _HOST_KWARGS = ("attn_precision" in params, hasattr(attention, "wrap_attn"))
    return attention.optimized_attention, attention.optimized_attention_masked, _HOST_KWARGS


def host_attention(q, k, v, heads, bias, extra_options):
    """softmax(QK^T/sqrt(d) + bias)V through ComfyUI's configured backend, called as its CrossAttention calls it."""
    plain, masked, (precision, options) = _host_attention()
    kwargs = {}
    if precision:
        kwargs["attn_precision"] = extra_options.get("attn_precision")
    if options:
        kwargs["transformer_options"] = extra_options
    if bias is not None:
        masked = _mask_taking(masked)
    return masked_attention(q, k, v, heads, bias, plain, masked, **kwargs)


# masked function -> the name of its backend when that backend cannot take a mask, else ""
_MASKLESS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mask_taking(masked):
    """The host's masked attention function, unless its backend cannot take a mask: flash attention refuses one
    (ComfyUI then retries in SDPA and logs a warning per call) and sageattention without an `attn_mask` argument
    drops it silently. Those layers run ComfyUI's PyTorch attention instead, with one warning per backend."""
    import comfy.ldm.modules.attention as attention

    try:
        backend = _MASKLESS.get(masked)
    except TypeError:  # (not weak-referenceable: a callable object without __weakref__)
        backend = None
    if backend is None:
        backend = _maskless_backend(attention, masked) or ""
        try:
            _MASKLESS[masked] = backend
        except TypeError:
            pass
    fallback = getattr(attention, "attention_pytorch", None)
    if not backend or fallback is None:
        return masked
    warn_mask_fallback(backend, "ComfyUI's PyTorch attention (scaled_dot_product_attention)")
    return fallback


def _maskless_backend(attention, fn) -> str | None:
    """The name of `fn`'s backend when it is one of ComfyUI's that cannot apply an attention mask, else None."""
    if fn is getattr(attention, "attention_flash", None):
        return "flash attention"
    if fn is getattr(attention, "attention_sage", None):
        try:
            takes_mask = "attn_mask" in inspect.signature(getattr(attention, "sageattn")).parameters
        except (AttributeError, TypeError, ValueError):
            takes_mask = False
        if not takes_mask:
            return "sage attention"
    return None


# --- the containers ----------------------------------------------------------------------------------------------
def chainable(obj) -> bool:
    """Another pack's attention replace that a container can adopt: callable, with `.callback`/`.kwargs` lists."""
    lists = isinstance(getattr(obj, "callback", None), list) and isinstance(getattr(obj, "kwargs", None), list)
    return lists and callable(obj)


class MaskAttnAttention:
    """attn2 replace container for one site: masked base attention, then adopted callbacks (IPAdapter duck type)."""

    def __init__(self, patch: MaskAttnGatePatch, key: SiteKey, adopt=None):
        self.patch, self.key = patch, key
        self.callback, self.kwargs = [], []
        # the class of the container adopted (directly or through an earlier MaskAttn container): its own methods
        # (`.to()` and the per-device kwargs) run on this container, which carries its attributes
        self.adopted_type = None
        if adopt is not None:  # keep every attribute another pack may read (IPAdapter sets kwargs as attributes)
            for name, value in vars(adopt).items():
                if name not in ("callback", "kwargs", "patch", "key", "adopted_type"):
                    setattr(self, name, dict(value) if isinstance(value, dict) else value)  # (own per-device dicts)
            self.callback, self.kwargs = list(adopt.callback), list(adopt.kwargs)
            self.adopted_type = adopt.adopted_type if isinstance(adopt, MaskAttnAttention) else type(adopt)

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)
        for name, value in kwargs.items():
            setattr(self, name, value)

    def _adopted(self, name: str):
        method = getattr(self.adopted_type, name, None) if self.adopted_type is not None else None
        return method if callable(method) else None

    def to(self, *args, **kwargs):
        """ModelPatcher.model_patches_to: an adopted container's own `.to` runs on this container (IPAdapter_plus
        builds per-device kwargs there for multi-GPU work units); MaskAttn's own state moves lazily, per device."""
        move = self._adopted("to")
        if move is None:
            return self
        moved = move(self, *args, **kwargs)
        if moved is None or moved is self:
            return self
        return MaskAttnAttention(self.patch, self.key, moved) if chainable(moved) else self

    def __deepcopy__(self, memo):
        # A clone gets its own callback lists and dicts (IPAdapter .add()s to the clone's container in place; its
        # .to() fills a per-device dict) but shares the heavy objects (gates, adapter weights) with the model it was
        # cloned from.
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, dict):
                setattr(new, name, dict(value))
        new.callback, new.kwargs = list(self.callback), [dict(kw) for kw in self.kwargs]
        return new

    def __call__(self, q, k, v, extra_options):
        bias = extra_options.pop(BIAS_KEY, None)
        seen = extra_options.pop(SEEN_KEY, None)
        rows = extra_options.pop(ROWS_KEY, None)
        self.patch.consumed()
        if seen is not None and seen != (q.shape[0], k.shape[1]):
            raise PatchOrderError(self.patch.order_message(self.key, seen, (q.shape[0], k.shape[1])))
        runtime = self.patch.runtime
        if runtime.gates.needs_attention and self.key in runtime.sites:
            heads = extra_options["n_heads"]
            if self.patch.clock.active(extra_options):
                if seen is None:  # (our gate patch did not run here: rows by position)
                    rows = gated_rows(runtime, extra_options, q.shape[0], q.device, self.key)
                bias = runtime.usable(runtime.compute_from_attention(self.key, q, k, heads, rows, extra_options))
            elif runtime.gates.observes_inactive:  # (zero-shot v2 aggregates ungated steps too)
                runtime.gates.observe_attention(self.key, q, k, heads, extra_options)
            extra_options.pop(PROMPT_ROWS_KEY, None)
        extra_options.pop(FEATURES_KEY, None)
        return self._finish(q, k, v, bias, extra_options)

    def _finish(self, q, k, v, bias, extra_options):
        """The (masked) attention through the host's backend, plus the adopted callbacks' terms."""
        runtime = self.patch.runtime
        override = runtime.attention_override
        if override is None:
            out = host_attention(q, k, v, extra_options["n_heads"], bias, extra_options)
        else:
            out = masked_attention(q, k, v, extra_options["n_heads"], bias, override)
        if self.callback:
            sigma = self.patch.clock.sigma(extra_options)
            device_kwargs = self._adopted("get_multigpu_kwargs")  # IPAdapter_plus: kwargs moved to q's device
            per_device = device_kwargs(self, q.device) if device_kwargs is not None else self.kwargs
            for i, (callback, kw) in enumerate(zip(self.callback, self.kwargs)):
                if sigma is None or kw.get("sigma_end", 0.0) <= sigma <= kw.get("sigma_start", float("inf")):
                    call_kw = per_device[i] if i < len(per_device) else kw
                    out = out + callback(out, q, k, v, extra_options, **call_kw)
        return out if out.dtype == q.dtype else out.to(q.dtype)


class MaskAttnSelfAttention(MaskAttnAttention):
    """attn1 replace container for one gated site, installed only for gate sources that mask self-attention
    (zero-shot gates with self_attention="separate_groups"): the bias comes from the gate source's partition;
    adopted callbacks are chained as in the attn2 container."""

    def __call__(self, q, k, v, extra_options):
        runtime = self.patch.runtime
        bias = None
        if runtime.gates.masks_self_attention and self.key in runtime.sites and self.patch.clock.active(extra_options):
            bias = runtime.gates.self_attention_bias(self.key, q, extra_options["n_heads"], extra_options,
                                                     runtime.negative_value)
            if bias is not None and runtime.cond_only:
                rows = gated_rows(runtime, extra_options, q.shape[0], q.device, self.key)
                bias = bias * rows.to(bias.dtype)[:, None, None]
        return self._finish(q, k, v, bias, extra_options)

