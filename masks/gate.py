"""The MaskAttn gate head and the hard, straight-through gate it feeds (method spec: docs/METHOD.md).

Per cross-attention layer, with X the latent features entering the query projection [B, N, C] and E the text
states entering the key projection [B, T, D]:

    f = MLP_C(LayerNorm(X)),  g = MLP_D(LayerNorm(E))            # [B, N, h], [B, T, h]
    P = sigmoid(f g^T / sqrt(h) + b)                            # [B, N, T]
    M = 1[P > threshold]; an all-zero row keeps its argmax token  # exact 0/1 forward
    bias = (1 - M_ste) * negative_value                         # added to the attention logits

Submodule names follow the reference implementation (`feature_net.{0,1,3}`, `token_net.{0,1,3}`,
`logit_bias`) so its checkpoints load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The method's suppression value: finite in fp16 (max 65504) and bf16, so no softmax row becomes NaN.
NEGATIVE_VALUE = -1.0e4


class GateHead(nn.Module):
    """Token-conditioned spatial gate: probability that latent location n keeps text token t."""

    def __init__(self, feature_dim: int, token_dim: int, hidden_dim: int = 128):
        super().__init__()
        if min(feature_dim, token_dim, hidden_dim) <= 0:
            raise ValueError(f"GateHead dims must be positive, got C={feature_dim}, D={token_dim}, h={hidden_dim}")
        self.feature_dim = int(feature_dim)
        self.token_dim = int(token_dim)
        self.hidden_dim = int(hidden_dim)
        self.feature_net = nn.Sequential(
            nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.token_net = nn.Sequential(
            nn.LayerNorm(token_dim), nn.Linear(token_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.logit_bias = nn.Parameter(torch.zeros(()))
        # For the sampling fast path (fast_logits): the LayerNorm and the parameter dicts of the feature MLP and of this
        # head. Reading a dict skips nn.Module's call and attribute machinery (same ops, a few µs per gated layer), and
        # is never stale: a module keeps its dict for life, and every way of replacing a parameter (.to() with
        # overwritten parameters, load_state_dict(assign=True)) writes into it; deepcopy maps the tuple to the copies.
        self._fast_parts = (self.feature_net[0], self.feature_net[0]._parameters, self.feature_net[1]._parameters,
                            self.feature_net[3]._parameters, self._parameters)

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.feature_dim, self.token_dim, self.hidden_dim

    def token_features(self, tokens: Tensor) -> Tensor:
        """g = token_net(E): depends on the prompt only, so callers may compute it once per conditioning."""
        return self.token_net(tokens)

    def logits(self, features: Tensor, tokens: Tensor, token_features: Tensor | None = None) -> Tensor:
        """Pre-sigmoid gate logits [B, N, T]."""
        if features.ndim != 3 or tokens.ndim != 3:
            raise ValueError(
                f"GateHead expects features [B,N,C] and tokens [B,T,D], got {tuple(features.shape)} and "
                f"{tuple(tokens.shape)}"
            )
        if features.shape[-1] != self.feature_dim or tokens.shape[-1] != self.token_dim:
            raise ValueError(
                f"GateHead built for C={self.feature_dim}, D={self.token_dim} got C={features.shape[-1]}, "
                f"D={tokens.shape[-1]}: the gate file does not match this model's cross-attention layer"
            )
        f = self.feature_net(features)
        g = self.token_net(tokens) if token_features is None else token_features
        return torch.baddbmm(self.logit_bias.expand(1, 1, 1).to(f.dtype), f, g.transpose(1, 2),
                             alpha=self.hidden_dim ** -0.5)

    def fast_logits(self, features: Tensor, token_features_t: Tensor) -> Tensor:
        """`logits(features, _, g)` bit for bit from g transposed ([B, h, T], cached per prompt by the caller), minus
        the checks and the Python-side calls (this runs once per gated layer per sampling step, where each operator
        call costs more than its arithmetic: the 0-dim logit bias broadcasts inside baddbmm without an expand)."""
        norm, norm_params, first, second, own = self._fast_parts
        f = F.layer_norm(features, norm.normalized_shape, norm_params["weight"], norm_params["bias"], norm.eps)
        f = F.linear(F.silu(F.linear(f, first["weight"], first["bias"])), second["weight"], second["bias"])
        bias = own["logit_bias"]
        return torch.baddbmm(bias if bias.dtype == f.dtype else bias.to(f.dtype), f, token_features_t,
                             alpha=self.hidden_dim ** -0.5)

    def fast_parameters(self) -> tuple[Tensor, ...]:
        """The parameters fast_logits reads (the feature side and the logit bias), as it reads them."""
        _, norm, first, second, own = self._fast_parts
        return (norm["weight"], norm["bias"], first["weight"], first["bias"], second["weight"], second["bias"],
                own["logit_bias"])

    def forward(self, features: Tensor, tokens: Tensor) -> Tensor:
        """Gate probabilities P [B, N, T]."""
        return torch.sigmoid(self.logits(features, tokens))


@dataclass
class GateResult:
    probabilities: Tensor  # P [B, N, T]
    hard: Tensor  # M, exact 0/1 [B, N, T]
    bias: Tensor  # additive logit bias [B, N, T]; exact (1 - M) * negative_value in the forward pass


def hard_gate(probabilities: Tensor, threshold: float = 0.5, valid_tokens: Tensor | None = None) -> Tensor:
    """M = 1[P > threshold], with the empty-row rule: a location that keeps no token keeps its argmax token.

    `valid_tokens` [B, T] (bool) excludes tokens from both the threshold and the fallback (a conditioning's own
    attention mask); every batch item needs at least one valid token.
    """
    soft = probabilities
    if valid_tokens is not None:
        soft = probabilities * valid_tokens[:, None, :].to(probabilities.dtype)
    hard = soft > threshold
    empty = ~hard.any(dim=-1, keepdim=True)
    # argmax over valid tokens only: invalid ones get -inf so they can never be the fallback.
    scores = soft if valid_tokens is None else soft.masked_fill(~valid_tokens[:, None, :], float("-inf"))
    fallback = torch.zeros_like(hard).scatter_(-1, scores.argmax(dim=-1, keepdim=True), True)
    return torch.where(empty, fallback, hard).to(probabilities.dtype)


def gate_bias(
    probabilities: Tensor,
    threshold: float = 0.5,
    negative_value: float = NEGATIVE_VALUE,
    valid_tokens: Tensor | None = None,
) -> GateResult:
    """Hard gate with a straight-through gradient, turned into the additive attention bias.

    Forward values are exactly (1 - M) * negative_value: the STE term (P - stopgrad(P)) is identically zero, which
    avoids the rounding of the textbook `M - stopgrad(P) + P` (that form leaves ~1e-8 * 1e4 noise on kept pairs
    for thresholds other than 0.5). Backward: d bias / d P = -negative_value, as in the reference.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    if not negative_value < 0:
        raise ValueError(f"negative_value must be negative, got {negative_value}")
    hard = hard_gate(probabilities.detach(), threshold, valid_tokens)
    if probabilities.requires_grad:
        soft = probabilities
        if valid_tokens is not None:
            soft = probabilities * valid_tokens[:, None, :].to(probabilities.dtype)
        ste = hard + (soft - soft.detach())
    else:
        ste = hard
    return GateResult(probabilities=probabilities, hard=hard, bias=(1.0 - ste) * negative_value)


def strength_to_negative_value(strength: float, full: float = NEGATIVE_VALUE) -> float:
    """Suppression value for a partial strength s in [0, 1].

    A suppressed pair's pre-softmax weight is multiplied by (1 - s): logit += log(1 - s). s = 1 is the method
    (`full`, -1e4: weight ~0); s = 0 leaves attention untouched. Clamped to `full` so it stays finite.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1] here, got {strength} (0 means: do not patch)")
    if strength >= 1.0:
        return full
    return max(math.log1p(-strength), full)
