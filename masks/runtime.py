"""GateRuntime: the one place where a gate bias is computed, cached (text side) and handed to observers (recording).

It knows nothing of ComfyUI: the host adapter (nodes/hooks.py) hands it the site key, the latent features
entering the query projection, the text states entering the key projection, and which batch rows to gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .gate import GateResult, gate_bias
from .gates import MaskAttnGates
from .topology import SiteKey

GateObserver = Callable[[SiteKey, GateResult, dict], None]


@dataclass(eq=False)
class GateRuntime:
    gates: MaskAttnGates
    sites: frozenset  # the SiteKeys this runtime gates (a subset of gates.site_heads)
    threshold: float = 0.5
    negative_value: float = -1.0e4
    cond_only: bool = False
    # A bias of all zeros is skipped (None) so a layer whose gate keeps everything runs the untouched attention,
    # bit for bit, on every backend. Costs one device sync per gated layer.
    skip_unmasked: bool = True
    observers: list[GateObserver] = field(default_factory=list)
    # None: the host's attention backend. Training sets explicit_attention (differentiable on every device).
    attention_override: Callable | None = None

    def __post_init__(self):
        self._token_cache: dict[int, tuple[Tensor, Tensor]] = {}  # head index -> (context, token_net(context))
        self._heads_by_device: dict[torch.device, object] = {}

    def __deepcopy__(self, memo):  # shared by a model and its clones; it holds no per-run tensors
        return self

    def _head(self, key: SiteKey, device: torch.device):
        index = self.gates.site_heads[key]
        heads = self._heads_by_device.get(device)
        if heads is None or heads[index].logit_bias.device != device:  # (training moves heads in place)
            heads = self._heads_by_device[device] = self.gates.heads_on(device)
        return index, heads[index]

    def compute(self, key: SiteKey, features: Tensor, context: Tensor, cond_rows: Tensor | None = None,
                info: dict | None = None) -> GateResult:
        """The straightforward gate for one site (the spec line by line; differentiable: training uses it).

        features [B, N, C], context [B, T, D]; cond_rows [B] bool restricts gating to those rows.
        """
        _, head = self._head(key, features.device)
        probabilities = torch.sigmoid(head.logits(features.float(), context.float()))
        result = gate_bias(probabilities, self.threshold, self.negative_value)
        return self._finish(key, result, cond_rows, info)

    def _token_features(self, index: int, head, context: Tensor) -> Tensor:
        """token_net(context), computed once per conditioning tensor: every layer a head serves in one model call
        gets the same context object, so a stage-shared head runs its text MLP once per step instead of per layer."""
        cached = self._token_cache.get(index)
        if cached is not None and cached[0] is context:
            return cached[1]
        g = head.token_features(context.float())
        self._token_cache[index] = (context, g)
        return g

    def fast_bias(self, key: SiteKey, features: Tensor, context: Tensor, cond_rows: Tensor | None = None,
                  info: dict | None = None) -> Tensor | None:
        """Sampling-time gate: the same values as `compute` bit for bit, with fewer kernels and one sync.

        The text side is cached per conditioning; the all-kept / empty-row checks share one host sync; the fallback
        kernels run only when some row is empty; the bias is made directly in the model's dtype.
        """
        index, head = self._head(key, features.device)
        if torch.is_grad_enabled() and head.logit_bias.requires_grad:  # training: gradients need the plain path
            return self.usable(self.compute(key, features, context, cond_rows, info))
        g = self._token_features(index, head, context)
        probabilities = torch.sigmoid(head.fast_logits(features.float(), g))
        hard = probabilities > self.threshold
        if cond_rows is not None:  # rows left ungated keep every token
            hard |= ~cond_rows.to(hard.device)[:, None, None]
        kept = hard.sum(dim=-1, keepdim=True)  # tokens kept per location
        if self.skip_unmasked:
            fewest = int(kept.amin())  # the one host sync: decides "nothing suppressed" and "some row empty"
            all_kept, any_empty = fewest == hard.shape[-1], fewest == 0
            if all_kept and not self.observers:
                return None
        else:
            all_kept, any_empty = False, True
        if any_empty:  # empty rows keep their argmax token (they have no other True to clash with)
            fallback = torch.zeros_like(hard).scatter_(-1, probabilities.argmax(dim=-1, keepdim=True), True)
            hard |= (kept == 0) & fallback
        # (not torch.where with scalars: 4x slower on the CPU)
        bias = hard.logical_not().to(features.dtype).mul_(self.negative_value)
        if self.observers:
            result = GateResult(probabilities=probabilities, hard=hard.to(probabilities.dtype), bias=bias)
            for observe in self.observers:
                observe(key, result, info or {})
        return None if all_kept else bias

    def compute_from_attention(self, key: SiteKey, q: Tensor, k: Tensor, heads: int, cond_rows: Tensor | None = None,
                               info: dict | None = None) -> GateResult:
        """Gate for one site from the layer's own projected queries/keys (gate sources with needs_attention)."""
        probabilities = self.gates.attention_probabilities(key, q, k, heads, info or {})
        result = gate_bias(probabilities, self.threshold, self.negative_value)
        return self._finish(key, result, cond_rows, info)

    def _finish(self, key, result: GateResult, cond_rows, info) -> GateResult:
        if cond_rows is not None:
            result.bias = result.bias * cond_rows.to(device=result.bias.device, dtype=result.bias.dtype)[:, None, None]
        for observe in self.observers:
            observe(key, result, info or {})
        return result

    def usable(self, result: GateResult) -> Tensor | None:
        """The additive bias [B, N, T], or None when it would suppress nothing (see skip_unmasked)."""
        if self.skip_unmasked and not bool((result.bias != 0).any()):
            return None
        return result.bias

    def bias(self, key: SiteKey, features: Tensor, context: Tensor, cond_rows: Tensor | None = None,
             info: dict | None = None) -> Tensor | None:
        """The additive bias [B, N, T] for one site from its input features, or None when it suppresses nothing."""
        return self.fast_bias(key, features, context, cond_rows, info)
