"""The only module that touches ModelPatcher / transformer_options: puts MaskAttn into a (cloned) model.

Per gated cross-attention site ComfyUI runs, in this order and with the SAME `extra_options` dict:
  1. every `attn2_patch(n, context, value, extra_options)`: ours (MaskAttnGatePatch, one for all sites) sees
     n = norm2(x) and the text states, exactly the gate's inputs, computes the bias and leaves it in
     extra_options[BIAS_KEY];
  2. the `attn2` replace at (block, number, index): ours (MaskAttnAttention) takes q/k/v, pops the bias and runs
     masked attention through the host's own attention function, then adds the terms of any callbacks other
     packs registered (IPAdapter-style containers: `.callback`/`.kwargs` lists and `.add()`).
"""

from __future__ import annotations

import copy
import inspect
import logging
import os

import torch

from ..masks.attention import masked_attention
from ..masks.gates import MaskAttnGates
from ..masks.runtime import GateRuntime
from ..masks.topology import CrossAttnSite, SiteKey, discover_sites, key_to_name

log = logging.getLogger("MaskAttn")
BIAS_KEY = "maskattn_bias"


class ForeignPatchError(RuntimeError):
    """Another node's attention replace sits where MaskAttn must go, and it cannot be chained."""


def model_sites(model) -> list[CrossAttnSite]:
    """Cross-attention sites of a ComfyUI MODEL (ModelPatcher)."""
    return discover_sites(model.model.diffusion_model)


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
    return masked_attention(q, k, v, heads, bias, plain, masked, **kwargs)


# --- per-step state shared by the gate patch and the containers ---------------------------------------------------
class StepClock:
    """Answers 'is this step inside [sigma_end, sigma_start]?' with one host sync per step, not per layer."""

    def __init__(self, sigma_start: float | None, sigma_end: float | None):
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self._sigmas = None
        self._sigma = None

    def __deepcopy__(self, memo):
        return self

    def sigma(self, extra_options) -> float | None:
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return None
        if sigmas is not self._sigmas:  # the same tensor object is handed to every layer of one model call
            self._sigmas, self._sigma = sigmas, float(sigmas.reshape(-1)[0])
        return self._sigma

    def active(self, extra_options) -> bool:
        if self.sigma_start is None and self.sigma_end is None:
            return True
        sigma = self.sigma(extra_options)
        if sigma is None:
            return True
        return ((self.sigma_end is None or sigma >= self.sigma_end)
                and (self.sigma_start is None or sigma <= self.sigma_start))


class MaskAttnGatePatch:
    """attn2_patch: computes the gate bias of a gated site from norm2(x) and the context, leaves it for the replace."""

    def __init__(self, runtime: GateRuntime, clock: StepClock):
        self.runtime, self.clock = runtime, clock
        self._pending: tuple | None = None  # (site, sigmas) of a bias not yet consumed, to detect overwrites
        self._warned: set = set()

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):  # ModelPatcher.model_patches_to: gates move lazily, per device
        return self

    def __call__(self, n, context, value, extra_options):
        block = extra_options.get("block")
        if block is None:
            return n, context, value
        key = (block[0], block[1], extra_options.get("block_index", 0))
        sigmas = extra_options.get("sigmas")
        if self._pending is not None and self._pending[1] is sigmas and self._pending[0] not in self._warned:
            self._warned.add(self._pending[0])
            log.warning(
                "MaskAttn: the attention at %s was replaced by another node applied after 'Apply MaskAttn'; that "
                "layer runs unmasked. Put 'Apply MaskAttn' after that node.", key_to_name(self._pending[0]))
        self._pending = None
        if key not in self.runtime.sites or self.runtime.gates.needs_attention or not self.clock.active(extra_options):
            return n, context, value
        rows = _cond_rows(self.runtime, extra_options, n.shape[0], n.device)
        bias = self.runtime.bias(key, n, context, rows, extra_options)
        if bias is not None:
            extra_options[BIAS_KEY] = bias
            self._pending = (key, sigmas)
        return n, context, value

    def consumed(self):
        self._pending = None


_ROWS_CACHE: dict = {}


def _cond_rows(runtime: GateRuntime, extra_options, batch: int, device):
    """[batch] bool on `device`: which rows belong to cond chunks (only when gating cond alone). Made once per batch
    layout and device, so the hook does not copy a new host tensor to the device at every layer."""
    if not runtime.cond_only:
        return None
    chunks = tuple(extra_options.get("cond_or_uncond") or [0])
    key = (chunks, batch, str(device))
    rows = _ROWS_CACHE.get(key)
    if rows is None:
        per = batch // len(chunks)
        with torch.inference_mode(False):  # a normal tensor: training may use it after sampling did
            rows = torch.tensor([c == 0 for c in chunks for _ in range(per)], dtype=torch.bool)
            rows = _ROWS_CACHE[key] = rows.to(device) if rows.numel() == batch else None
    return rows


class MaskAttnAttention:
    """attn2 replace container for one site: masked base attention, then adopted callbacks (IPAdapter duck type)."""

    def __init__(self, patch: MaskAttnGatePatch, key: SiteKey, adopt=None):
        self.patch, self.key = patch, key
        self.callback, self.kwargs = [], []
        if adopt is not None:  # keep every attribute another pack may read (IPAdapter sets kwargs as attributes)
            for name, value in vars(adopt).items():
                if name not in ("callback", "kwargs", "patch", "key"):
                    setattr(self, name, value)
            self.callback, self.kwargs = list(adopt.callback), list(adopt.kwargs)

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)
        for name, value in kwargs.items():
            setattr(self, name, value)

    def to(self, *args, **kwargs):
        return self

    def __deepcopy__(self, memo):
        # A clone gets its own callback lists (IPAdapter .add()s to the clone's container in place) but shares the
        # heavy objects (gates, adapter weights) with the model it was cloned from.
        new = copy.copy(self)
        new.callback, new.kwargs = list(self.callback), [dict(kw) for kw in self.kwargs]
        return new

    def __call__(self, q, k, v, extra_options):
        bias = extra_options.pop(BIAS_KEY, None)
        self.patch.consumed()
        runtime = self.patch.runtime
        if runtime.gates.needs_attention and self.key in runtime.sites and self.patch.clock.active(extra_options):
            heads = extra_options["n_heads"]
            rows = _cond_rows(runtime, extra_options, q.shape[0], q.device)
            bias = runtime.usable(runtime.compute_from_attention(self.key, q, k, heads, rows, extra_options))
        override = runtime.attention_override
        if override is None:
            out = host_attention(q, k, v, extra_options["n_heads"], bias, extra_options)
        else:
            out = masked_attention(q, k, v, extra_options["n_heads"], bias, override)
        if self.callback:
            sigma = self.patch.clock.sigma(extra_options)
            for callback, kw in zip(self.callback, self.kwargs):
                if sigma is None or kw.get("sigma_end", 0.0) <= sigma <= kw.get("sigma_start", float("inf")):
                    out = out + callback(out, q, k, v, extra_options, **kw)
        return out if out.dtype == q.dtype else out.to(q.dtype)


# --- which exact gate variant CUDA devices run ------------------------------------------------------------------
#: Every variant gives the straightforward path's bits (tests, cuda_check.py); they differ only in how the GPU is
#: driven: (GateRuntime.graphs, GateRuntime.device_skip). Which is fastest is for a GPU run to say
#: (benchmarks/gpu_check.sh prints it); until one has, CUDA keeps the measured eager gate.
CUDA_GATE_VARIANTS = {"eager": (False, False), "graphs": (True, False), "device_skip": (False, True),
                      "graphs+device_skip": (True, True)}
CUDA_GATE_DEFAULT = "eager"
CUDA_GATE_ENV = "MASKATTN_CUDA_GATE"


def cuda_gate_variant() -> str:
    """The exact gate variant for CUDA devices: $MASKATTN_CUDA_GATE if set, else CUDA_GATE_DEFAULT."""
    name = os.environ.get(CUDA_GATE_ENV, "").strip() or CUDA_GATE_DEFAULT
    if name not in CUDA_GATE_VARIANTS:
        raise ValueError(
            f"Apply MaskAttn: the environment variable {CUDA_GATE_ENV}={name!r} names no gate variant; use one of "
            f"{', '.join(CUDA_GATE_VARIANTS)}, or unset it for the default ({CUDA_GATE_DEFAULT}), then restart ComfyUI."
        )
    return name


def _chainable(obj) -> bool:
    lists = isinstance(getattr(obj, "callback", None), list) and isinstance(getattr(obj, "kwargs", None), list)
    return lists and callable(obj)


def install(model, gates: MaskAttnGates, sites: list[CrossAttnSite], *, threshold: float, negative_value: float,
            sigma_start: float | None = None, sigma_end: float | None = None, cond_only: bool = False):
    """A patched clone of `model` (a ModelPatcher); the input model is never changed."""
    on_cuda = torch.device(getattr(model, "load_device", None) or "cpu").type == "cuda"
    cuda_variant = CUDA_GATE_VARIANTS[cuda_gate_variant()] if on_cuda else None  # (a bad setting fails here, first)
    patched = model.clone()
    to = patched.model_options.setdefault("transformer_options", {})
    replaces = to.get("patches_replace", {}).get("attn2", {})
    # A second Apply MaskAttn replaces the first: drop our earlier gate patch, keep callbacks adopted by it.
    patches = to.get("patches", {})
    if "attn2_patch" in patches:
        patches["attn2_patch"] = [p for p in patches["attn2_patch"] if not isinstance(p, MaskAttnGatePatch)]
    foreign = {}
    for site in sites:
        existing = replaces.get(site.key)
        if existing is None or isinstance(existing, MaskAttnAttention):
            continue
        if not _chainable(existing):
            raise ForeignPatchError(
                f"Apply MaskAttn: another node already replaced the cross-attention at {key_to_name(site.key)} with "
                f"{type(existing).__name__}, which cannot be chained (it has no callback list). Apply MaskAttn "
                f"before that node, or narrow MaskAttn's stage/placement so the layers do not overlap."
            )
        foreign[site.key] = existing

    runtime = GateRuntime(gates=gates, sites=frozenset(s.key for s in sites), threshold=threshold,
                          negative_value=negative_value, cond_only=cond_only)
    if cuda_variant is not None:
        runtime.graphs, runtime.device_skip = cuda_variant
    gate_patch = MaskAttnGatePatch(runtime, StepClock(sigma_start, sigma_end))
    patched.set_model_attn2_patch(gate_patch)
    for site in sites:
        existing = replaces.get(site.key)
        adopt = existing if isinstance(existing, MaskAttnAttention) or site.key in foreign else None
        patched.set_model_attn2_replace(MaskAttnAttention(gate_patch, site.key, adopt), *site.key)
    return patched, runtime


def installed_runtime(model) -> GateRuntime | None:
    """The GateRuntime MaskAttn put on this model, if any (for the viewer and tests)."""
    for p in model.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", []):
        if isinstance(p, MaskAttnGatePatch):
            return p.runtime
    return None
