"""Attention couple, restated for the benchmark: one prompt per region, cross-attention outputs blended by masks.

What regional-prompting users run today (cgem156's attention couple and its successors), written here from the
algorithm's description, not from their code:

- every cross-attention layer runs the positive rows once with the base prompt and once more per region with that
  region's own prompt (the batch grows: an `attn2_patch` appends the rows, the layer attends them as usual);
- an `attn2_output_patch` blends the outputs back into one row per image: each region's output where its mask is,
  the base prompt's output outside every mask, weights normalised per location (overlaps are averaged);
- negative rows are untouched; the pooled text (SDXL's `y`) stays the base prompt's.

Masks are per region and per image ([R, B, H, W] at any resolution, area-resized to each layer's grid; B = 1 serves
every image). Region prompts must have the base prompt's token count (the tiny encoder's are all 16 tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

STATE_KEY = "compbench_couple_rows"


class AttentionCouple:
    def __init__(self, region_contexts: Tensor, masks: Tensor):
        """region_contexts [R, B, T, D] (B = 1 or one per image); masks [R, B, H, W] in [0, 1]."""
        if region_contexts.shape[0] != masks.shape[0]:
            raise ValueError("one context and one mask per region")
        self.contexts = region_contexts
        self.masks = masks.float()
        self._weights: dict = {}

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        return self

    def _cond_rows(self, batch: int, info: dict) -> tuple[list[int], int]:
        chunks = list(info.get("cond_or_uncond") or [0])
        if batch % len(chunks):
            chunks = [0]
        per = batch // len(chunks)
        return [c * per + j for c, kind in enumerate(chunks) if kind == 0 for j in range(per)], per

    def patch(self, n: Tensor, context: Tensor, value: Tensor, extra_options: dict):
        b = n.shape[0]
        rows, per = self._cond_rows(b, extra_options)
        if not rows:
            return n, context, value
        regions, bm = self.contexts.shape[0], self.contexts.shape[1]
        index = torch.tensor(rows, device=n.device)
        image = torch.tensor([r % per for r in rows])  # the image each cond row draws
        ctx = self.contexts.to(device=context.device, dtype=context.dtype)
        extra = [ctx[r, image if bm > 1 else torch.zeros_like(image)] for r in range(regions)]  # R x [c, T, D]
        if any(e.shape[1] != context.shape[1] for e in extra):
            raise ValueError("attention couple: region prompts must have the base prompt's token count")
        extra_options[STATE_KEY] = (b, rows, image)
        n = torch.cat([n] + [n.index_select(0, index)] * regions)
        context = torch.cat([context, *extra])
        return n, context, context

    def weights(self, h: int, w: int, device) -> Tensor:
        """[R + 1, B, h*w]: base weight first, then each region's, normalised per location."""
        key = (h, w, str(device))
        cached = self._weights.get(key)
        if cached is None:
            cov = F.interpolate(self.masks, size=(h, w), mode="area").flatten(2)  # [R, B, N]
            base = (1.0 - cov.sum(dim=0, keepdim=True)).clamp_min(0.0)
            stacked = torch.cat([base, cov])
            cached = self._weights[key] = (stacked / stacked.sum(dim=0, keepdim=True).clamp_min(1e-6)).to(device)
        return cached

    def output(self, out: Tensor, extra_options: dict) -> Tensor:
        state = extra_options.pop(STATE_KEY, None)
        if state is None:
            return out
        from comfyui_maskattn.masks.record import latent_hw

        b, rows, image = state
        regions = self.contexts.shape[0]
        base, extra = out[:b], out[b:].view(regions, len(rows), out.shape[1], out.shape[2])
        h, w = latent_hw(out.shape[1], extra_options)
        wts = self.weights(h, w, out.device).to(out.dtype)  # [R + 1, Bm, N]
        pick = image if wts.shape[1] > 1 else torch.zeros_like(image)
        wts = wts[:, pick.to(wts.device)]  # [R + 1, c, N]
        index = torch.tensor(rows, device=out.device)
        blended = wts[0, :, :, None] * base.index_select(0, index)
        for r in range(regions):
            blended = blended + wts[r + 1, :, :, None] * extra[r]
        return base.index_copy(0, index, blended)


def couple_model(model, region_contexts: Tensor, masks: Tensor):
    """A clone of `model` (ModelPatcher) with the attention couple installed on every cross-attention layer."""
    couple = AttentionCouple(region_contexts, masks)
    patched = model.clone()
    patched.set_model_attn2_patch(couple.patch)
    patched.set_model_attn2_output_patch(couple.output)
    return patched
