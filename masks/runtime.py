"""GateRuntime: the one place where a sampling-time gate bias is computed (and, later, cached and recorded).

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

    def __deepcopy__(self, memo):  # shared by a model and its clones; it holds no per-run tensors
        return self

    def compute(self, key: SiteKey, features: Tensor, context: Tensor, cond_rows: Tensor | None = None,
                info: dict | None = None) -> GateResult:
        """Gate for one site. features [B, N, C], context [B, T, D]; cond_rows [B] bool restricts gating to those rows."""
        head = self.gates.heads_on(features.device)[self.gates.site_heads[key]]
        probabilities = torch.sigmoid(head.logits(features.float(), context.float()))
        result = gate_bias(probabilities, self.threshold, self.negative_value)
        return self._finish(key, result, cond_rows, info)

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
        return self.usable(self.compute(key, features, context, cond_rows, info))
