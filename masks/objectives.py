"""Training objectives for MaskAttn gates: how a gate passes its gradient, and which loss it trains on (pure torch).

Every objective samples with the method's exact hard gate in the forward pass (kept pairs untouched, suppressed pairs
-1e4); they differ in the backward pass and in the loss:

- estimator "ste" (the reference): bias = (1 - M_ste) * -1e4 with M_ste = M + P - stopgrad(P). A suppressed pair's
  attention weight is exactly 0, so its gradient is exactly 0: a pair that closes never reopens by itself.
- estimator "soft": the same hard forward; the gate's gradient is that of the *softly* masked attention
  softmax(QK^T/sqrt(d) + log P) V, in which a suppressed pair still has weight proportional to P, so it learns
  whether it should reopen. The attention's own inputs (q, k, v) get the gradient of the hard forward.
- estimator "concrete": a stochastic hard gate, M = 1[logit + s * L > 0] with logistic noise L whose scale s
  anneals from 1 to 0 over training (hard-concrete style exploration: closed pairs open now and then), with the
  soft backward at the noisy logits.

Losses: "eps" is the model's own denoising loss (||D - x0||^2 / c_out^2, the reference); "x0" is the error of the
predicted clean image ||D - x0||^2, which weighs high noise levels (where layout is decided) up by c_out^2. A sigma
band restricts the drawn noise levels to a range of the model's sigma table (quantiles of its index). A sparsity
weight adds lambda * mean(P) (an open start with a prior that closes what the loss does not need).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import explicit_attention
from .gate import GateResult, gate_bias, hard_gate

ESTIMATORS = ("ste", "soft", "concrete")
LOSS_SPACES = ("eps", "x0")


@dataclass(frozen=True)
class Objective:
    name: str
    estimator: str  # ESTIMATORS
    loss_space: str = "eps"  # LOSS_SPACES
    sigma_band: tuple[float, float] | None = None  # (low, high) quantiles of the sigma table's index; None: all
    sparsity: float = 0.0  # weight of mean(P) added to the loss
    init_bias: float = 0.0  # logit bias of fresh heads
    summary: str = ""

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.loss_space not in LOSS_SPACES:
            raise ValueError(f"loss_space must be one of {LOSS_SPACES}, got {self.loss_space!r}")
        if self.sigma_band is not None and not 0.0 <= self.sigma_band[0] < self.sigma_band[1] <= 1.0:
            raise ValueError(f"sigma_band must be 0 <= low < high <= 1, got {self.sigma_band}")


#: The named objectives, one table for the node and the command line (docs/TRAINING.md explains them; what each
#: measured is in benchmarks/compbench/RESULTS.md).
OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("paper", "ste", init_bias=0.0,
                  summary="the reference: straight-through hard gate, eps loss, uniform noise levels, zero init"),
        Objective("paper_open", "ste", init_bias=2.0,
                  summary="the reference's estimator and loss from an open start (logit bias 2: every pair kept)"),
        Objective("soft_backward", "soft", init_bias=2.0,
                  summary="hard forward, gradient of the softly masked attention (closed pairs keep a gradient)"),
        Objective("soft_x0", "soft", loss_space="x0", sigma_band=(0.3, 1.0), init_bias=2.0,
                  summary="soft backward, loss on the predicted clean image, noise levels from the upper 70% of "
                          "the table (where layout is decided)"),
        Objective("sparse", "soft", sparsity=0.05, init_bias=2.0,
                  summary="soft backward from an open start with a sparsity prior 0.05 * mean(P)"),
        Objective("concrete", "concrete", init_bias=0.0,
                  summary="stochastic hard gate (logistic noise annealed 1 -> 0) with the soft backward"),
    )
}
#: The only objective that did not hurt on the benchmark (benchmarks/compbench/RESULTS.md); none improved binding.
DEFAULT_OBJECTIVE = "soft_x0"


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown training objective {name!r}; one of {', '.join(OBJECTIVES)}") from None


def sigma_band_table(sigma_table: Tensor, band: tuple[float, float] | None) -> Tensor:
    """The part of an ascending sigma table that a band of index quantiles selects (at least one entry)."""
    if band is None:
        return sigma_table
    n = len(sigma_table)
    lo = min(n - 1, int(math.floor(band[0] * n)))
    hi = max(lo + 1, int(math.ceil(band[1] * n)))
    return sigma_table[lo:hi]


def clean_image_loss(denoised: Tensor, target: Tensor, scale: float = 1.0) -> Tensor:
    """mean_b mean((D - x0)^2) / scale, in fp32 (scale: a constant that puts it near the eps loss's magnitude)."""
    if denoised.shape != target.shape:
        raise ValueError(f"denoised {tuple(denoised.shape)} and target {tuple(target.shape)} differ in shape")
    return (denoised.float() - target.float()).pow(2).flatten(1).mean(1).mean() / scale


def noise_scale(step: int, total_steps: int) -> float:
    """Scale of the concrete estimator's logistic noise at optimisation step `step`: linear from 1 down to 0."""
    return max(0.0, 1.0 - step / max(1, total_steps - 1))


def site_seed(seed: int, key) -> int:
    digest = hashlib.blake2b(f"maskattn-gate-noise:{int(seed)}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class GateRecord:
    """One gated layer's gate in one training forward pass (for priors and mask supervision)."""

    key: tuple
    logits: Tensor  # [B, N, T] fp32, differentiable w.r.t. the head
    probabilities: Tensor  # [B, N, T]
    grid: tuple[int, int]  # (h, w) of the layer's latent grid


@dataclass
class TrainingGate:
    """The gate of a training forward pass, for one objective; the host puts `compute` and `attention` in place of
    GateRuntime.compute and its attention override while training.

    `heads_for(key)` returns the live head of a site; `grid_of(tokens, info)` the (h, w) of a layer's grid.
    `begin_step(step, total, noise_seed)` is called by the loss closure before each forward pass.
    """

    objective: Objective
    heads_for: object
    grid_of: object
    threshold: float = 0.5
    negative_value: float = -1.0e4
    observers: list = field(default_factory=list)
    detach_features: bool = False  # mask supervision: the gate trains on its own loss, not through the model
    records: list[GateRecord] = field(default_factory=list)
    _step: int = 0
    _total: int = 1
    _noise_seed: int = 0
    _noise: dict = field(default_factory=dict)
    _pending: Tensor | None = None

    def begin_step(self, step: int, total_steps: int, noise_seed: int = 0) -> None:
        self._step, self._total, self._noise_seed = int(step), int(total_steps), int(noise_seed)
        self.records.clear()
        self._noise.clear()
        self._pending = None

    def _noise_for(self, key, shape, device) -> Tensor:
        # Cached per site for the step: a gradient-checkpointed block that recomputes its forward sees the same draw.
        cached = self._noise.get(key)
        if cached is None or tuple(cached.shape) != tuple(shape):
            gen = torch.Generator().manual_seed(site_seed(self._noise_seed, key))
            u = torch.rand(shape, generator=gen).clamp_(1e-6, 1 - 1e-6)
            cached = self._noise[key] = (torch.log(u) - torch.log1p(-u)).to(device)
        return cached

    def compute(self, key, features: Tensor, context: Tensor, cond_rows: Tensor | None = None,
                info: dict | None = None) -> GateResult:
        head = self.heads_for(key)
        if self.detach_features:
            features, context = features.detach(), context.detach()
        with torch.enable_grad():
            logits = head.logits(features.float(), context.float()).float()
        return self.from_logits(key, logits, cond_rows, info)

    def from_logits(self, key, logits: Tensor, cond_rows: Tensor | None = None, info: dict | None = None) -> GateResult:
        """The objective's gate from one layer's logits [B, N, T] (fp32, differentiable w.r.t. the head); `compute`
        for heads that read more than the features and text (context gates make their logits at the attention)."""
        probabilities = torch.sigmoid(logits)
        estimator = self.objective.estimator
        if estimator == "ste" and not self.detach_features:
            result = gate_bias(probabilities, self.threshold, self.negative_value)
        else:
            gate_logits = logits
            if estimator == "concrete" and not self.detach_features:
                s = noise_scale(self._step, self._total)
                if s > 0:
                    gate_logits = logits + s * self._noise_for(key, logits.shape, logits.device)
            hard = hard_gate(torch.sigmoid(gate_logits.detach()), self.threshold)
            result = GateResult(probabilities=probabilities, hard=hard, bias=(1.0 - hard) * self.negative_value)
            if not self.detach_features:
                self._pending = F.logsigmoid(gate_logits)  # log P: the soft mask the attention's backward uses
        self.records.append(GateRecord(key, logits, probabilities, tuple(self.grid_of(logits.shape[1], info or {}))))
        if cond_rows is not None:
            rows = cond_rows.to(device=result.bias.device, dtype=result.bias.dtype)[:, None, None]
            result.bias = result.bias * rows
            if self._pending is not None:
                self._pending = self._pending * rows
        for observe in self.observers:
            observe(key, result, info or {})
        return result

    def attention(self, q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None, **kw) -> Tensor:
        """The masked attention of a gated layer: exact with the hard mask; under the soft estimators its gradient
        to the gate is that of softmax(QK^T/sqrt(d) + log P) V (q, k, v detached there)."""
        out = explicit_attention(q, k, v, heads, mask=mask)
        soft, self._pending = self._pending, None
        if soft is None or mask is None or not torch.is_grad_enabled():
            return out
        if tuple(soft.shape) != (mask.shape[0],) + tuple(mask.shape[2:]):
            raise RuntimeError(f"MaskAttn training: the soft mask {tuple(soft.shape)} does not belong to this "
                               f"attention call {tuple(mask.shape)}")
        soft_out = explicit_attention(q.detach(), k.detach(), v.detach(), heads, mask=soft.unsqueeze(1))
        return out + (soft_out - soft_out.detach()).to(out.dtype)

    def sparsity_term(self) -> Tensor | None:
        if not self.objective.sparsity or not self.records:
            return None
        return self.objective.sparsity * torch.stack([r.probabilities.mean() for r in self.records]).mean()
