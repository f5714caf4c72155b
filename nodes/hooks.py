"""The only module that touches ModelPatcher / transformer_options: puts MaskAttn into a (cloned) model.

Per gated cross-attention site ComfyUI runs, in this order and with the SAME `extra_options` dict:
  1. every `attn2_patch(n, context, value, extra_options)`, in list order. MaskAttn has two there, kept at the ends
     of the list by OrderedPatchList whatever order the nodes were applied in: MaskAttnLayoutPatch first (notes the
     batch before other packs change it), MaskAttnGatePatch last: it sees n = norm2(x) and the text states exactly
     as attention will run them (after an attention couple has expanded the batch, say), computes the bias and
     leaves it in extra_options[BIAS_KEY];
  2. the `attn2` replace at (block, number, index): ours (MaskAttnAttention) takes q/k/v, pops the bias and runs
     masked attention through the host's own attention function, then adds the terms of any callbacks other
     packs registered (IPAdapter-style containers: `.callback`/`.kwargs` lists and `.add()`).
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import weakref

import torch

from ..masks.attention import masked_attention, warn_mask_fallback
from ..masks.rows import PROMPT_ROWS_KEY, RowLayoutError, cond_rows
from ..masks.runtime import EXECUTORS, EagerExecutor, GateRuntime, rows_by_text
from ..masks.source import GateSource
from ..masks.topology import CrossAttnSite, SiteKey, discover_sites, key_to_name

log = logging.getLogger("MaskAttn")
BIAS_KEY = "maskattn_bias"
LAYOUT_KEY = "maskattn_layout"  # (n, context) as the sampler batched them, before any pack's attn2_patch
SEEN_KEY = "maskattn_seen"  # (rows, tokens) the gate ran on, checked against the attention's q/k
ROWS_KEY = "maskattn_rows"  # [B] bool, the rows to gate when gate_uncond is off (None: every row)


class ForeignPatchError(RuntimeError):
    """Another node's attention replace sits where MaskAttn must go, and it cannot be chained."""


class PatchOrderError(RuntimeError):
    """Attention ran on another batch or prompt than MaskAttn's gate saw: a node bypassed the patch order."""


# ComfyUI shows an error's type as `module.QualName`; the pack's module path would read as a filesystem path.
ForeignPatchError.__module__ = PatchOrderError.__module__ = "MaskAttn"


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


# --- the attn2_patch list: MaskAttn at its ends ---------------------------------------------------------------------
def _position(patch) -> int:
    """-1: first (MaskAttn's layout patch), 1: last (its gate patch), 0: any other pack's patch."""
    return -1 if isinstance(patch, MaskAttnLayoutPatch) else 1 if isinstance(patch, MaskAttnGatePatch) else 0


def describe_patch(patch) -> str:
    """A patch as a person can find it: the module and name of the function (or class) that made it."""
    fn = patch if inspect.isfunction(patch) or inspect.ismethod(patch) else type(patch)
    module = getattr(fn, "__module__", "") or ""
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}".lstrip(".")


class OrderedPatchList(list):
    """The "attn2_patch" list of a model MaskAttn patched. MaskAttn's layout patch stays first and its gate patch
    last, whatever other packs add before or after Apply MaskAttn, so the gate reads n/context exactly as the
    attention runs them and the two orders of applying nodes give the same model.

    ComfyUI and packs grow the list with `old + [new]` (ModelPatcher.set_model_patch), `[new] + old`, `.append`,
    `.extend` (0.3.64 merges hook patches so), `.copy()` (copy_nested_dicts, at every sampling run) and deepcopy
    (ModelPatcher.clone): each keeps this type and MaskAttn at the ends, and so does an index assignment, so plain
    iteration (what every transformer block call does) needs no sorting.
    """

    def __init__(self, items=()):
        super().__init__(sorted(items, key=_position))  # (stable: other packs keep their relative order)

    def _storage(self) -> list:
        return list(list.__iter__(self))

    def _reorder(self):
        list.__setitem__(self, slice(None), sorted(list.__iter__(self), key=_position))

    def __setitem__(self, index, value):  # (ModelPatcher.model_patches_to assigns what a patch's .to() returns)
        list.__setitem__(self, index, value)
        self._reorder()

    def __add__(self, other):
        return OrderedPatchList([*self._storage(), *other])

    def __radd__(self, other):
        return OrderedPatchList([*other, *self._storage()])

    def __iadd__(self, other):
        self.extend(other)
        return self

    def append(self, patch):
        list.append(self, patch)
        self._reorder()

    def extend(self, patches):
        list.extend(self, patches)
        self._reorder()

    def insert(self, index, patch):
        list.insert(self, index, patch)
        self._reorder()

    def copy(self):
        return OrderedPatchList(self._storage())

    __copy__ = copy

    def __deepcopy__(self, memo):
        return OrderedPatchList(copy.deepcopy(self._storage(), memo))


class MaskAttnLayoutPatch:
    """attn2_patch, first in the list: notes n and the context as the sampler batched them (references only), so the
    gate patch can tell the rows apart after another pack has changed the batch."""

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        return self

    def __call__(self, n, context, value, extra_options):
        extra_options[LAYOUT_KEY] = (n, context)
        return n, context, value


class MaskAttnGatePatch:
    """attn2_patch, last in the list: computes the gate bias of a gated site from the n/context attention will run
    (after every other pack's attn2_patch), leaves it for the replace."""

    def __init__(self, runtime: GateRuntime, clock: StepClock):
        self.runtime, self.clock = runtime, clock
        self._pending: tuple | None = None  # (site, sigmas) of a bias not yet consumed, to detect overwrites
        self._warned: set = set()

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):  # ModelPatcher.model_patches_to: gates move lazily, per device
        return self

    def __call__(self, n, context, value, extra_options):
        layout = extra_options.pop(LAYOUT_KEY, None)
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
        if key not in self.runtime.sites or not self.clock.active(extra_options):
            return n, context, value
        rows = _row_layout(self.runtime, extra_options, layout, n, context, key)
        extra_options[SEEN_KEY] = (n.shape[0], context.shape[1])
        if self.runtime.gates.needs_attention:  # (the bias comes from q/k, in the replace)
            extra_options[ROWS_KEY] = rows
            return n, context, value
        bias = self.runtime.bias(key, n, context, rows, extra_options)
        if bias is not None:
            extra_options[BIAS_KEY] = bias
            self._pending = (key, sigmas)
        return n, context, value

    def consumed(self):
        self._pending = None

    def order_message(self, key: SiteKey, seen: tuple, ran: tuple) -> str:
        after = self._patches_after_us()
        if after:
            who = "another node's attention patch (" + ", ".join(after) + ")"
        else:
            who = "another node"
        return (
            f"Apply MaskAttn: the cross-attention at {key_to_name(key)} ran on {ran[0]} rows and {ran[1]} tokens, "
            f"but MaskAttn's gate saw {seen[0]} rows and {seen[1]} tokens: {who} changed the batch or the prompt "
            f"after MaskAttn's gate had run, bypassing its place at the end of the attention patches. Apply MaskAttn "
            f"after that node (for example Attention Couple -> Apply MaskAttn -> KSampler)."
        )

    def _patches_after_us(self) -> list[str]:
        """On the error path only: the attn2 patches that ran after ours, read from the transformer block that called
        the replace (its `transformer_patches`), when the host's frames can be read."""
        frame = inspect.currentframe()
        try:
            for _ in range(6):
                frame = frame.f_back if frame is not None else None
                patches = frame.f_locals.get("transformer_patches") if frame is not None else None
                if isinstance(patches, dict):
                    entries = list(patches.get("attn2_patch", []))
                    if self in entries:
                        return [describe_patch(p) for p in entries[entries.index(self) + 1:]]
                    return []
            return []
        finally:
            del frame


_ROWS_CACHE: dict = {}


def _cond_rows(runtime: GateRuntime, extra_options, batch: int, device, key: SiteKey | None = None):
    """Which rows to gate when gating cond alone ([batch] bool), else None; see _chunk_rows."""
    return _chunk_rows(extra_options, batch, device, key) if runtime.cond_only else None


def _chunk_rows(extra_options, batch: int, device, key: SiteKey | None = None):
    """[batch] bool on `device`: which rows belong to cond chunks, by position (masks.rows.cond_rows). Made once per
    batch layout and device, so the hook does not copy a new host tensor to the device at every layer."""
    chunks = tuple(extra_options.get("cond_or_uncond") or ())
    cache_key = (chunks, batch, str(device))
    rows = _ROWS_CACHE.get(cache_key)
    if rows is None:
        try:
            flags = cond_rows(chunks, batch)
        except RowLayoutError:
            where = f" at {key_to_name(key)}" if key is not None else ""
            raise PatchOrderError(
                f"Apply MaskAttn: the cross-attention{where} runs {batch} rows, which do not split into the sampler's "
                f"{len(chunks)} chunks (cond/uncond): another node changed the batch where MaskAttn could not see it, "
                f"so it cannot tell the negative prompt's rows. Apply MaskAttn after that node, or turn gate_uncond "
                f"on.") from None
        with torch.inference_mode(False):  # a normal tensor: training may use it after sampling did
            rows = _ROWS_CACHE[cache_key] = torch.tensor(flags, dtype=torch.bool).to(device)
    return rows


def _row_layout(runtime: GateRuntime, extra_options, layout, n, context, key: SiteKey):
    """The rows to gate when gate_uncond is off ([B] bool; None: every row). Also leaves, for gate sources that read
    it (zero-shot), which rows carry the positive prompt itself (PROMPT_ROWS_KEY) when the batch was changed.

    While the batch is the sampler's, rows are known by position (cond_or_uncond chunks of equal size). When another
    pack changed it (an attention couple turns each cond row into base + region rows, each with its own prompt), rows
    are matched by content against the batch as the sampler made it (noted by MaskAttnLayoutPatch): a row is the
    negative prompt's when its text is an uncond row's text (up to ComfyUI's token repetition). See
    masks.runtime.rows_by_text.
    """
    batch = n.shape[0]
    if layout is None or layout[0].shape[0] == batch:
        return _cond_rows(runtime, extra_options, batch, n.device, key)
    if not (runtime.cond_only or runtime.gates.needs_attention):
        return None
    before_n, before_context = layout
    negative_before = _chunk_rows(extra_options, before_n.shape[0], n.device, key).logical_not()
    negative, positive = rows_by_text(before_n, before_context, negative_before, n, context)
    # One host read of the match, then tensors cached by value: the same objects for the same layout, so a CUDA
    # graph keyed on them is reused across layers and steps, and the positive rows' index needs no nonzero() sync.
    gated, prompt_rows = _expanded_rows(tuple(negative.logical_not().tolist()), tuple(positive.tolist()), n.device)
    if runtime.gates.needs_attention:
        extra_options[PROMPT_ROWS_KEY] = prompt_rows
    return gated if runtime.cond_only else None


def _expanded_rows(gated: tuple, positive: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    key = ("expanded", gated, positive, str(device))
    rows = _ROWS_CACHE.get(key)
    if rows is None:
        with torch.inference_mode(False):  # normal tensors: training may use them after sampling did
            rows = _ROWS_CACHE[key] = (torch.tensor(gated, dtype=torch.bool).to(device),
                                       torch.tensor([i for i, p in enumerate(positive) if p],
                                                    dtype=torch.long).to(device))
    return rows


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
        return MaskAttnAttention(self.patch, self.key, moved) if _chainable(moved) else self

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
                    rows = _cond_rows(runtime, extra_options, q.shape[0], q.device, self.key)
                bias = runtime.usable(runtime.compute_from_attention(self.key, q, k, heads, rows, extra_options))
            elif runtime.gates.observes_inactive:  # (zero-shot v2 aggregates ungated steps too)
                runtime.gates.observe_attention(self.key, q, k, heads, extra_options)
            extra_options.pop(PROMPT_ROWS_KEY, None)
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
                rows = _cond_rows(runtime, extra_options, q.shape[0], q.device, self.key)
                bias = bias * rows.to(bias.dtype)[:, None, None]
        return self._finish(q, k, v, bias, extra_options)


# --- which exact gate variant CUDA devices run ------------------------------------------------------------------
#: Every variant (an executor of masks/runtime.py) gives the spec path's bits (tests, cuda_check.py); they differ
#: only in how the GPU is driven. Which is fastest is for a GPU run to say (benchmarks/gpu_check.sh prints it);
#: until one has, CUDA keeps the measured eager gate.
CUDA_GATE_VARIANTS = EXECUTORS
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


def _chainable_replaces(replaces: dict, sites, what: str, fix: str) -> dict:
    """{site key: another pack's attention replace to adopt} at `sites`; one that cannot be chained is refused by
    name, before anything is installed."""
    foreign = {}
    for site in sites:
        existing = replaces.get(site.key)
        if existing is None or isinstance(existing, MaskAttnAttention):
            continue
        if not _chainable(existing):
            raise ForeignPatchError(
                f"Apply MaskAttn: another node already replaced the {what} at {key_to_name(site.key)} with "
                f"{type(existing).__name__}, which cannot be chained (it has no callback list). Apply MaskAttn "
                f"before that node, {fix}."
            )
        foreign[site.key] = existing
    return foreign


def install(model, gates: GateSource, sites: list[CrossAttnSite], *, threshold: float, negative_value: float,
            sigma_start: float | None = None, sigma_end: float | None = None, cond_only: bool = False):
    """A patched clone of `model` (a ModelPatcher); the input model is never changed."""
    on_cuda = torch.device(getattr(model, "load_device", None) or "cpu").type == "cuda"
    # a bad $MASKATTN_CUDA_GATE fails here, first; the CPU keeps the synced eager gate (a host sync costs it nothing)
    make_executor = CUDA_GATE_VARIANTS[cuda_gate_variant()] if on_cuda else EagerExecutor
    patched = model.clone()
    to = patched.model_options.setdefault("transformer_options", {})
    replaces = to.get("patches_replace", {}).get("attn2", {})
    self_replaces = to.get("patches_replace", {}).get("attn1", {})
    masks_self = gates.masks_self_attention
    # A second Apply MaskAttn replaces the first: drop our earlier patches, keep callbacks adopted by it.
    others = [p for p in to.get("patches", {}).get("attn2_patch", [])
              if not isinstance(p, (MaskAttnGatePatch, MaskAttnLayoutPatch))]
    foreign = _chainable_replaces(replaces, sites, "cross-attention",
                                  "or narrow MaskAttn's stage/placement so the layers do not overlap")
    foreign_self = _chainable_replaces(self_replaces, sites if masks_self else (), "self-attention",
                                       "or set the zero-shot gates' self_attention to 'open'")

    runtime = GateRuntime(gates=gates, sites=frozenset(s.key for s in sites), threshold=threshold,
                          negative_value=negative_value, cond_only=cond_only, executor=make_executor())
    gate_patch = MaskAttnGatePatch(runtime, StepClock(sigma_start, sigma_end))
    to.setdefault("patches", {})["attn2_patch"] = OrderedPatchList([MaskAttnLayoutPatch(), *others, gate_patch])
    for site in sites:
        existing = replaces.get(site.key)
        adopt = existing if isinstance(existing, MaskAttnAttention) or site.key in foreign else None
        patched.set_model_attn2_replace(MaskAttnAttention(gate_patch, site.key, adopt), *site.key)
        existing = self_replaces.get(site.key)
        if masks_self:
            adopt = existing if isinstance(existing, MaskAttnAttention) or site.key in foreign_self else None
            patched.set_model_attn1_replace(MaskAttnSelfAttention(gate_patch, site.key, adopt), *site.key)
        elif isinstance(existing, MaskAttnSelfAttention):  # a second Apply without self-attention masking
            if existing.callback:  # (keeps the adopted callbacks; these gates mask nothing there)
                patched.set_model_attn1_replace(MaskAttnSelfAttention(gate_patch, site.key, existing), *site.key)
            else:
                patched.model_options["transformer_options"]["patches_replace"]["attn1"].pop(site.key, None)
    # An earlier Apply's containers at layers these gates leave out would keep gating with the earlier gates (an
    # attention-family source computes its bias in the container): point them at this runtime, which leaves those
    # layers ungated and keeps the callbacks they adopted.
    for key, existing in list(replaces.items()):
        if isinstance(existing, MaskAttnAttention) and key not in runtime.sites:
            patched.set_model_attn2_replace(MaskAttnAttention(gate_patch, key, existing), *key)
    for key, existing in list(self_replaces.items()):
        if isinstance(existing, MaskAttnSelfAttention) and key not in runtime.sites:
            patched.set_model_attn1_replace(MaskAttnSelfAttention(gate_patch, key, existing), *key)
    return patched, runtime


def installed_runtime(model) -> GateRuntime | None:
    """The GateRuntime MaskAttn put on this model, if any (for the viewer and tests)."""
    for p in model.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", []):
        if isinstance(p, MaskAttnGatePatch):
            return p.runtime
    return None
