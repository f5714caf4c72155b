"""Mask-supervised gate training (beyond the paper, which trains on the denoising loss alone): pure torch.

Each training image may come with object masks and the words each object is named by ("red cube" -> a mask of the
cube). A word's token should be kept where its object is and suppressed elsewhere, so at every gated layer the gate's
keep-probability of that token is trained towards the fraction of each latent cell the object's mask covers (binary
cross-entropy on the gate logits). Tokens of no object (start, end, padding, relation words) are not supervised.

Where no object is (the background), `outside` decides: "keep" (the default) keeps every object's words open there,
so a word is suppressed only where another object is; "close" suppresses them there too (the coverage target above).
The training-free gates (masks/zeroshot.py) do neither: they close the losing group's words everywhere, background
included; masks that tile the image (Zero-Shot Masks, background "to its winning group") give that target with
either setting.

The gate sees what it sees while sampling: the features entering the layer at a noisy latent, drawn like the
denoising objective draws them. Only the heads learn; no gradient goes through the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .region import as_mask, coverage

#: What an object's words are trained to do where no object's mask is (see the module docstring).
MASK_OUTSIDE = ("keep", "close")


@dataclass
class ObjectMasks:
    """One image's objects: `owner[t]` = the object token t names (-1: none), `masks[o]` = where object o is."""

    owner: Tensor  # [T] long
    masks: Tensor  # [R, H, W] float in [0, 1]
    # (h, w) -> [h*w, R] coverage: computed once per grid, not at every layer and step
    _coverage: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _uncovered: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (h, w) -> [h*w]

    def __post_init__(self):
        self.owner = torch.as_tensor(self.owner, dtype=torch.long).reshape(-1)
        self.masks = torch.as_tensor(self.masks, dtype=torch.float32)
        if self.masks.ndim != 3:
            raise ValueError(f"object masks must be [objects, H, W], got {tuple(self.masks.shape)}")
        if self.owner.numel() and int(self.owner.max()) >= self.masks.shape[0]:
            raise ValueError("a token names an object without a mask")

    def cell_coverage(self, h: int, w: int) -> Tensor:
        """[h*w, R]: the share of each latent cell each object covers (the region gates' coverage, so a small object
        keeps its most covered cell), cached per grid."""
        cached = self._coverage.get((h, w))
        if cached is None:
            r = self.masks.shape[0]
            cached = self._coverage[(h, w)] = coverage(self.masks, h, w).reshape(r, h * w).T.contiguous()
        return cached

    def uncovered(self, h: int, w: int) -> Tensor:
        """[h*w]: the share of each latent cell no object covers (one minus the union's area average), cached."""
        cached = self._uncovered.get((h, w))
        if cached is None:
            union = self.masks.amax(dim=0)[None, None]
            cached = self._uncovered[(h, w)] = (
                1.0 - F.interpolate(union, size=(h, w), mode="area")).reshape(h * w).clamp_min(0.0)
        return cached

    def targets(self, h: int, w: int, tokens: int, outside: str = "keep") -> tuple[Tensor, Tensor]:
        """(target keep-probability [h*w, tokens], weight [h*w, tokens]) on an h x w grid; a context longer than the
        image's own (repeated to a common length in a batch) repeats the pattern. outside="keep" adds the share of
        each cell no object covers to every object's target (a word is closed only as far as other objects cover
        the cell); "close" leaves the coverage as it is."""
        check_outside(outside)
        own = self.owner.shape[0]
        if tokens % own:
            raise ValueError(f"context of {tokens} tokens is not a repetition of this image's {own}")
        owner = self.owner.repeat(tokens // own)
        cover = self.cell_coverage(h, w)  # [N, R]
        supervised = owner >= 0
        target = torch.zeros(h * w, tokens)
        target[:, supervised] = cover[:, owner[supervised]]
        if outside == "keep":
            target[:, supervised] = (target[:, supervised] + self.uncovered(h, w)[:, None]).clamp_max(1.0)
        weight = supervised.float()[None, :].expand(h * w, tokens)
        return target, weight


def check_outside(outside: str) -> None:
    if outside not in MASK_OUTSIDE:
        raise ValueError(f"mask_outside must be one of {MASK_OUTSIDE}, got {outside!r}")


def object_masks(text: str, phrases: list[str], masks: list[Tensor], tokens: dict,
                 vocab: dict[int, str]) -> ObjectMasks:
    """One image's ObjectMasks from its caption, its object phrases (words of the caption), one mask per phrase
    ([H, W] or [1, H, W], any resolution; stretched to a common size) and ComfyUI's tokenization of the caption
    (`clip.tokenize(text, return_word_ids=True)`, with the tokenizer's id -> BPE string `vocab`)."""
    from .region import RegionError, phrase_tokens

    if len(masks) != len(phrases):
        raise ValueError(f"{len(phrases)} phrase(s) but {len(masks)} mask(s): one mask per phrase")
    if not phrases:
        raise ValueError("no phrases")
    try:
        owner = phrase_tokens(text, list(phrases), tokens, vocab)
    except RegionError as e:
        raise ValueError(str(e)) from None
    missing = [p for i, p in enumerate(phrases) if i not in set(owner)]
    if missing:
        raise ValueError(f"phrase(s) {missing} map to no token of the caption")
    planes = []
    for i, m in enumerate(masks):
        m = as_mask(m, f"mask {i + 1}")  # [B, H, W] in [0, 1]; bad shapes, NaN and empty masks are reported
        if m.shape[0] != 1:
            raise ValueError(f"mask {i + 1} holds {m.shape[0]} masks; expected one [H, W] mask per phrase")
        planes.append(m[0])
    h = max(m.shape[0] for m in planes)
    w = max(m.shape[1] for m in planes)
    stacked = torch.stack([m if tuple(m.shape) == (h, w) else
                           F.interpolate(m[None, None], size=(h, w), mode="nearest")[0, 0] for m in planes])
    return ObjectMasks(torch.tensor(owner, dtype=torch.long), stacked)


def batch_targets(objects: list[ObjectMasks | None], h: int, w: int, tokens: int, device,
                  outside: str = "keep") -> tuple[Tensor, Tensor]:
    """Stacked targets/weights [B, h*w, tokens] of a batch (an image without masks has weight 0)."""
    ts, ws = [], []
    for o in objects:
        if o is None:
            ts.append(torch.zeros(h * w, tokens))
            ws.append(torch.zeros(h * w, tokens))
        else:
            t, w_ = o.targets(h, w, tokens, outside)
            ts.append(t)
            ws.append(w_)
    return torch.stack(ts).to(device), torch.stack(ws).to(device)


def _targets_by_grid(objects, records, outside: str) -> dict:
    """The batch targets of each (grid, tokens, device) the records need, built once per forward pass: every layer
    of a grid shares them."""
    out = {}
    for r in records:
        key = (tuple(r.grid), r.logits.shape[-1], r.logits.device)
        if key not in out:
            out[key] = batch_targets(objects, r.grid[0], r.grid[1], r.logits.shape[-1], r.logits.device, outside)
    return out


def mask_loss(records, objects: list[ObjectMasks | None], outside: str = "keep") -> Tensor:
    """Mean over gated layers of the weighted binary cross-entropy between gate logits and mask coverage.

    `records`: GateRecords (masks/objectives.py) of one forward pass, logits [B, N, T] on grid (h, w). A batch without
    any masks gives a zero loss that still depends on every gate's logits (the same graph on every DDP rank).
    """
    if not records:
        raise ValueError("no gated layer ran: nothing to supervise")
    for r in records:
        h, w = r.grid
        if h * w != r.logits.shape[1]:
            raise ValueError(f"layer {r.key}: grid {h}x{w} does not match {r.logits.shape[1]} locations")
    targets = _targets_by_grid(objects, records, outside)
    losses = []
    for r in records:
        target, weight = targets[(tuple(r.grid), r.logits.shape[-1], r.logits.device)]
        if r.logits.shape[0] != target.shape[0]:
            raise ValueError(f"layer {r.key}: {r.logits.shape[0]} rows but {target.shape[0]} images with masks")
        bce = F.binary_cross_entropy_with_logits(r.logits.float(), target, reduction="none")
        losses.append((bce * weight).sum() / weight.sum().clamp_min(1.0))
    return torch.stack(losses).mean()


def mask_agreement(records, objects: list[ObjectMasks | None], threshold: float = 0.5,
                   outside: str = "keep") -> float:
    """Share of supervised (location, token) pairs where the hard gate agrees with the target (> 0.5)."""
    agree = total = 0.0
    targets = _targets_by_grid(objects, records, outside)
    for r in records:
        target, weight = targets[(tuple(r.grid), r.logits.shape[-1], r.logits.device)]
        hard = r.probabilities.detach() > threshold
        agree += float((((target > 0.5) == hard).float() * weight).sum())
        total += float(weight.sum())
    return agree / total if total else float("nan")
