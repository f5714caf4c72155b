"""Context gates: learned heads that also read the run's own running attention aggregate (an opt-in gate kind).

A reference head (masks/gate.py) sees one layer's features at one step, so two locations with the same features get
the same gate whichever object they are becoming. Zero-shot gates v2 tell them apart by a running aggregate of the
run's cross-attention over layers and steps (masks/zeroshot_partition.py). A context head reads that aggregate too:

    logits = GateHead.logits(X, E) + context_net(c)            # [B, N, T]
    c[b, n, t] = [log(d + eps), log(d + eps) - log(max_t' d[t'] + eps), 1]   (0, 0, 0 before any aggregate)

where d[b, n, t] is token t's attention density at location n (its attention mass over the locations, mean 1) in the
aggregate of the run so far, *before* this layer. `context_net` is a tiny MLP whose last layer starts at zero, so a
fresh context head gives exactly the reference head's gate.

The per-token aggregate is a `PartitionState` with one group per token, kept in the run state (masks/run_state.py)
the patched model carries. The head needs the layer's input features and text states at the attention call: the
gate patch leaves them in the call's options under `FEATURES_KEY` for sources that set `reads_features`.
Pure torch, no ComfyUI import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .gate import GateHead
from .gates import MaskAttnGates
from .record import latent_hw
from .run_state import RunState, SourceRuns
from .topology import SiteKey
from .zeroshot_partition import DEFAULT_MEMORY, PartitionState

#: transformer_options entry: (n, context) of the gated layer, left by the gate patch for sources that read features.
FEATURES_KEY = "maskattn_features"
#: Context features per (location, token): log density, log density against the location's best token, a constant.
CONTEXT_FEATURES = 3
CONTEXT_HIDDEN = 16
DENSITY_EPS = 1e-3


class ContextGateHead(GateHead):
    """The reference head plus `context_net`, which maps each (location, token)'s context features to a logit term."""

    def __init__(self, feature_dim: int, token_dim: int, hidden_dim: int = 128,
                 context_features: int = CONTEXT_FEATURES, context_hidden: int = CONTEXT_HIDDEN):
        super().__init__(feature_dim, token_dim, hidden_dim)
        if min(context_features, context_hidden) <= 0:
            raise ValueError(f"context sizes must be positive, got K={context_features}, hidden={context_hidden}")
        self.context_features = int(context_features)
        self.context_hidden = int(context_hidden)
        # Built from its own generator: the reference part draws exactly what a GateHead draws, so heads made from
        # one seed agree on every shared tensor, and a set of context heads starts where its reference twin does.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context_features * 1000 + context_hidden)
            self.context_net = nn.Sequential(
                nn.Linear(context_features, context_hidden), nn.SiLU(), nn.Linear(context_hidden, 1))
        with torch.no_grad():
            self.context_net[2].weight.zero_()
            self.context_net[2].bias.zero_()

    def logits(self, features: Tensor, tokens: Tensor, context: Tensor | None = None,
               token_features: Tensor | None = None) -> Tensor:
        """Pre-sigmoid gate logits [B, N, T]; `context` [B, N, T, K] (None: the reference head's logits)."""
        base = super().logits(features, tokens, token_features)
        if context is None:
            return base
        if context.shape[:3] != base.shape or context.shape[-1] != self.context_features:
            raise ValueError(f"context features {tuple(context.shape)} do not fit logits {tuple(base.shape)} with "
                             f"K={self.context_features}")
        return base + self.context_net(context.to(base.dtype)).squeeze(-1)


def token_density(attention: Tensor) -> Tensor:
    """attention [B, N, T] (rows sum to 1) -> each token's mass over the locations normalised to mean 1 (what
    `masks.zeroshot_partition.group_density` gives with one group per token)."""
    n = attention.shape[1]
    return attention * (n / attention.sum(dim=1, keepdim=True).clamp_min(1e-30))


def context_features(before: Tensor | None, shape: tuple[int, int, int], device=None) -> Tensor:
    """[B, N, T, 3] context features from the aggregate density before this layer `before` [B, N, T]; all zero when
    there is none yet (the run's first gated layer). `shape` is (B, N, T)."""
    if before is None:
        return torch.zeros(*shape, CONTEXT_FEATURES, device=device, dtype=torch.float32)
    before = before.float()
    log_d = torch.log(before + DENSITY_EPS)
    best = torch.log(before.amax(dim=-1, keepdim=True) + DENSITY_EPS)
    return torch.stack([log_d, log_d - best, torch.ones_like(log_d)], dim=-1)


def head_attention(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) averaged over the heads, in float32: [B, N, T] (no gradient)."""
    with torch.no_grad():
        b, n, width = q.shape
        d = width // heads
        qh = q.detach().float().reshape(b, n, heads, d).transpose(1, 2)
        kh = k.detach().float().reshape(b, k.shape[1], heads, d).transpose(1, 2)
        return torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1).mean(dim=1)


class ContextRun(RunState):
    """One run's per-token aggregate. `single_pass` (training): every site is seen once per run, so a second call at
    a site (a gradient-checkpointed block recomputing its forward) reuses the first call's context and adds nothing."""

    def __init__(self, source, memory: float = DEFAULT_MEMORY, single_pass: bool = False):
        super().__init__(source)
        self.state = PartitionState(memory)
        self.memo: dict | None = {} if single_pass else None

    def context(self, key: SiteKey, q: Tensor, k: Tensor, heads: int, info: dict) -> Tensor:
        """[B, N, T, 3] context features of this layer from the aggregate before it; this layer is then added."""
        if self.memo is not None and key in self.memo:
            return self.memo[key]
        ctx = self._advance(q, k, heads, info, read=True)
        if self.memo is not None:
            self.memo[key] = ctx
        return ctx

    def observe(self, q: Tensor, k: Tensor, heads: int, info: dict) -> None:
        """Adds a layer to the aggregate without gating it (steps outside the start/end window)."""
        self._advance(q, k, heads, info, read=False)

    def _advance(self, q: Tensor, k: Tensor, heads: int, info: dict, read: bool) -> Tensor | None:
        attention = head_attention(q, k, heads)
        b, n, t = attention.shape
        h, w = latent_hw(n, info)
        layout = (b, t)
        with torch.no_grad():
            self.state.clock(info)
            before = self.state.at(h, w, layout) if read else None
            ctx = context_features(before, (b, n, t), attention.device) if read else None
            self.state.add(token_density(attention), h, w, layout)
        return ctx


@dataclass(eq=False)
class ContextGates(MaskAttnGates):
    """Learned context heads (ContextGateHead): gated at the attention call from the layer's features, the text and
    the run's aggregate, which every gated layer's attention feeds, gated or not."""

    memory: float = DEFAULT_MEMORY

    gate_kind: ClassVar[str] = "context"
    needs_attention: ClassVar[bool] = True
    observes_inactive: ClassVar[bool] = True
    reads_features: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        for i, head in enumerate(self.heads):
            if not isinstance(head, ContextGateHead):
                raise ValueError(f"context gates need context heads; head {i} is a {type(head).__name__}")
        self.runs = SourceRuns(self.new_run)

    @staticmethod
    def make_head(feature_dim: int, token_dim: int, hidden_dim: int) -> GateHead:
        return ContextGateHead(feature_dim, token_dim, hidden_dim)

    def new_run(self) -> ContextRun:
        return ContextRun(self, self.memory)

    def training_run(self) -> ContextRun:
        return ContextRun(self, self.memory, single_pass=True)

    def attention_logits(self, key: SiteKey, q: Tensor, k: Tensor, heads: int, info: dict,
                         detach: bool = False) -> Tensor:
        """Gate logits [B, N, T] (float32) of one gated layer; differentiable w.r.t. the head when its parameters
        require grad (`detach`: not w.r.t. the layer's features and text)."""
        features = info.get(FEATURES_KEY)
        if features is None:
            raise RuntimeError("context gates need the layer's input features: the MaskAttn gate patch did not run "
                               "before this attention (apply the gates with Apply MaskAttn)")
        n, text = features
        if detach:
            n, text = n.detach(), text.detach()
        ctx = self.runs.of(info, self).context(key, q, k, heads, info)
        head = self.heads_on(q.device)[self.site_heads[key]]
        return head.logits(n.float(), text.float(), ctx).float()

    def attention_probabilities(self, key: SiteKey, q: Tensor, k: Tensor, heads: int, info: dict) -> Tensor:
        return torch.sigmoid(self.attention_logits(key, q, k, heads, info))

    def observe_attention(self, key: SiteKey, q: Tensor, k: Tensor, heads: int, info: dict) -> None:
        self.runs.of(info, self).observe(q, k, heads, info)

    def describe(self) -> str:
        return f"{self.kind} context gates" + (f" ({self.source})" if self.source else "")


#: The gate kinds this pack runs and trains, by the `gate_kind` a gate file names (masks/gatefile.py).
GATE_CLASSES: dict[str, type[MaskAttnGates]] = {"reference": MaskAttnGates, "context": ContextGates}
GATE_KINDS = tuple(GATE_CLASSES)
