"""MaskAttn's two attn2_patch entries and what they share with the attention containers.

Per gated cross-attention site ComfyUI runs every `attn2_patch(n, context, value, extra_options)` in list order,
then the site's `attn2` replace, with the SAME `extra_options` dict. MaskAttnLayoutPatch runs first (notes the batch
before other packs change it); MaskAttnGatePatch runs last (nodes/patch_order.py keeps them at the ends): it sees
n = norm2(x) and the text states exactly as attention will run them (after an attention couple has expanded the
batch, say), computes the bias and leaves it in extra_options[BIAS_KEY] for the replace (nodes/containers.py).
"""

from __future__ import annotations

import inspect
import logging

import torch

from ..masks.context import FEATURES_KEY
from ..masks.rows import PROMPT_ROWS_KEY, RowLayoutError, cond_rows
from ..masks.runtime import GateRuntime, rows_by_text
from ..masks.topology import SiteKey, key_to_name

log = logging.getLogger("MaskAttn")
BIAS_KEY = "maskattn_bias"
LAYOUT_KEY = "maskattn_layout"  # (n, context) as the sampler batched them, before any pack's attn2_patch
SEEN_KEY = "maskattn_seen"  # (rows, tokens) the gate ran on, checked against the attention's q/k
ROWS_KEY = "maskattn_rows"  # [B] bool, the rows to gate when gate_uncond is off (None: every row)


class PatchOrderError(RuntimeError):
    """Attention ran on another batch or prompt than MaskAttn's gate saw: a node bypassed the patch order."""


# ComfyUI shows an error's type as `module.QualName`; the pack's module path would read as a filesystem path.
PatchOrderError.__module__ = "MaskAttn"


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


def describe_patch(patch) -> str:
    """A patch as a person can find it: the module and name of the function (or class) that made it."""
    fn = patch if inspect.isfunction(patch) or inspect.ismethod(patch) else type(patch)
    module = getattr(fn, "__module__", "") or ""
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}".lstrip(".")


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
            if self.runtime.gates.reads_features:  # (context gates: the layer's inputs too)
                extra_options[FEATURES_KEY] = (n, context)
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


def gated_rows(runtime: GateRuntime, extra_options, batch: int, device, key: SiteKey | None = None):
    """Which rows to gate when gating cond alone ([batch] bool), else None; see chunk_rows."""
    return chunk_rows(extra_options, batch, device, key) if runtime.cond_only else None


def chunk_rows(extra_options, batch: int, device, key: SiteKey | None = None):
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
        return gated_rows(runtime, extra_options, batch, n.device, key)
    if not (runtime.cond_only or runtime.gates.needs_attention):
        return None
    before_n, before_context = layout
    negative_before = chunk_rows(extra_options, before_n.shape[0], n.device, key).logical_not()
    negative, positive = rows_by_text(before_n, before_context, negative_before, n, context)
    # One host read of the match, then tensors cached by value: the same objects for the same layout, so a CUDA
    # graph keyed on them is reused across layers and steps, and the positive rows' index needs no nonzero() sync.
    gated, prompt_rows = expanded_rows(tuple(negative.logical_not().tolist()), tuple(positive.tolist()), n.device)
    if runtime.gates.needs_attention:
        extra_options[PROMPT_ROWS_KEY] = prompt_rows
    return gated if runtime.cond_only else None


def expanded_rows(gated: tuple, positive: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    key = ("expanded", gated, positive, str(device))
    rows = _ROWS_CACHE.get(key)
    if rows is None:
        with torch.inference_mode(False):  # normal tensors: training may use them after sampling did
            rows = _ROWS_CACHE[key] = (torch.tensor(gated, dtype=torch.bool).to(device),
                                       torch.tensor([i for i, p in enumerate(positive) if p],
                                                    dtype=torch.long).to(device))
    return rows


