"""Training examples on a ComfyUI model: a LATENT batch and its CONDITIONING list become cached model inputs (the
latent in the model's own latent scale, the text states and `y` built by the model's own `extra_conds`, as the
samplers build them), with optional object masks per image. Shared by the Train node and `python -m cli.train`."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..masks.supervised import ObjectMasks

log = logging.getLogger("MaskAttn")


class TrainingInputError(ValueError):
    """Training inputs that cannot be used; the message says what to fix."""


@dataclass
class TrainingExamples:
    """Model inputs of N training examples, computed once (latents already in the model's latent scale)."""

    latents: Tensor  # [N, C, h, w]
    contexts: list[Tensor]  # N x [1, T_i, D]
    extras: dict[str, list[Tensor]] = field(default_factory=dict)  # e.g. "y": N x [1, adm]
    objects: list[ObjectMasks | None] | None = None  # per image: object masks and the tokens naming them

    def __len__(self):
        return self.latents.shape[0]

    def to(self, device) -> "TrainingExamples":
        return TrainingExamples(
            self.latents.to(device),
            [c.to(device) for c in self.contexts],
            {k: [t.to(device) for t in v] for k, v in self.extras.items()},
            self.objects,
        )

    def subset(self, index) -> "TrainingExamples":
        index = [int(i) for i in index]
        return TrainingExamples(
            self.latents[index],
            [self.contexts[i] for i in index],
            {k: [v[i] for i in index] for k, v in self.extras.items()},
            None if self.objects is None else [self.objects[i] for i in index],
        )

    def with_objects(self, objects: list[ObjectMasks | None]) -> "TrainingExamples":
        """These examples with object masks (one entry per image, None for an image without); checked against the
        conditioning lengths."""
        if len(objects) != len(self):
            raise TrainingInputError(f"{len(self)} images but object masks for {len(objects)}")
        for i, o in enumerate(objects):
            if o is not None and o.owner.shape[0] != self.contexts[i].shape[1]:
                raise TrainingInputError(
                    f"image {i}: the caption's tokens ({o.owner.shape[0]}) do not match its conditioning "
                    f"({self.contexts[i].shape[1]} tokens): give the text that was encoded for this image"
                )
        return TrainingExamples(self.latents, self.contexts, self.extras, list(objects))

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(x0 [B,...], context [B, T, D] with lengths repeated up to a common multiple, extras concatenated)."""
        idx = [int(i) for i in index]
        contexts = [self.contexts[i] for i in idx]
        length = functools.reduce(math.lcm, (c.shape[1] for c in contexts))
        context = torch.cat([c.repeat(1, length // c.shape[1], 1) for c in contexts])
        extras = {k: torch.cat([v[i] for i in idx]) for k, v in self.extras.items()}
        return self.latents[idx], context, extras


_IGNORED_COND_KEYS = ("control", "gligen", "area", "strength", "mask", "hooks", "uuid")


def prepare_examples(model, latent: dict, conditioning: list, device=None) -> TrainingExamples:
    """LATENT + CONDITIONING (one entry per image, or one for all) -> TrainingExamples (on `device`, default CPU).

    The conditioning goes through the model's own `extra_conds` exactly as ComfyUI's samplers call it, so SDXL's
    `y` (pooled text, sizes) is what sampling would use.
    """
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), Tensor):
        raise TrainingInputError("latents: expected a LATENT (a dict with 'samples'), e.g. from VAE Encode")
    samples = latent["samples"]
    if samples.ndim != 4 or samples.shape[0] < 1:
        raise TrainingInputError(f"latents: expected samples [N, C, h, w] with N >= 1, got {tuple(samples.shape)}")
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise TrainingInputError("positive: expected a CONDITIONING list with one entry per image (or one for all)")
    n = samples.shape[0]
    entries = []
    for j, entry in enumerate(conditioning):
        if not (isinstance(entry, (list, tuple)) and len(entry) >= 2 and isinstance(entry[0], Tensor)):
            raise TrainingInputError(f"positive[{j}]: not a CONDITIONING entry [tensor, dict]")
        c, opts = entry[0], dict(entry[1] or {})
        for i in range(c.shape[0]):  # a batched entry counts as several examples
            entries.append(
                (
                    c[i : i + 1],
                    {
                        k: (
                            v[i : i + 1]
                            if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == c.shape[0] and c.shape[0] > 1
                            else v
                        )
                        for k, v in opts.items()
                    },
                )
            )
    if len(entries) == 1 and n > 1:
        entries = entries * n
    if len(entries) != n:
        raise TrainingInputError(
            f"{n} latents but {len(entries)} conditionings: give one conditioning per image "
            f"(in the latent batch's order) or a single one for all"
        )
    ignored = sorted({k for _, o in entries for k in o if k in _IGNORED_COND_KEYS and o[k] is not None})
    if ignored:
        log.warning("MaskAttn training ignores these conditioning fields: %s", ", ".join(ignored))

    base = model.model
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.inference_mode(False), torch.no_grad():
        x0 = base.process_latent_in(samples.detach().clone().float()).to(device)
        contexts, extras = [], {}
        for i, (c, opts) in enumerate(entries):
            params = {k: v for k, v in opts.items() if k not in _IGNORED_COND_KEYS}
            noise = x0[i : i + 1]
            params.update(cross_attn=c.detach().clone().to(device), device=device, noise=noise)
            params.setdefault("width", noise.shape[3] * 8)
            params.setdefault("height", noise.shape[2] * 8)
            params.setdefault("prompt_type", "positive")
            for k in ("pooled_output",):
                if isinstance(params.get(k), Tensor):
                    params[k] = params[k].detach().clone()
            out = base.extra_conds(**params)
            cross = out.pop("c_crossattn", None)
            contexts.append(
                (cross.cond if cross is not None else params["cross_attn"]).detach().clone().float().to(device)
            )
            for name, cond in out.items():
                value = getattr(cond, "cond", None)
                if not isinstance(value, Tensor):
                    continue
                extras.setdefault(name, []).append(value.detach().clone().to(device))
        for name, values in list(extras.items()):
            if len(values) != n:
                raise TrainingInputError(f"conditioning field {name!r} is present for some images only")
    dims = {c.shape[-1] for c in contexts}
    if len(dims) != 1:
        raise TrainingInputError(
            f"conditionings of different widths {sorted(dims)}: encode every caption with the same CLIP"
        )
    return TrainingExamples(x0, contexts, extras)
