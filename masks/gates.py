"""MaskAttnGates: the learned MASKATTN gate source: gate heads and which site each one serves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .gate import NEGATIVE_VALUE, GateHead
from .source import GateMismatchError, GateSource
from .topology import STAGES, CrossAttnSite, SiteKey, architecture_name, key_to_name


@dataclass(eq=False)
class MaskAttnGates(GateSource):
    """Learned gate heads (a GateSource without needs_attention): the runtime runs head `site_heads[key]` of
    `heads_on(device)` on each gated layer's input features and text states."""

    heads: nn.ModuleList
    site_heads: dict[SiteKey, int]  # which head gates which cross-attention site
    site_stages: dict[SiteKey, str]
    architecture: str = "sdxl"
    threshold: float = 0.5
    negative_value: float = NEGATIVE_VALUE
    stage: str = "mid"
    placement: str = "encoder_decoder"
    kind: str = "trained"  # "trained" | "test_only" | "untrained"
    source: str = ""  # file it came from, for messages
    _on_device: dict = field(default_factory=dict, repr=False)

    #: Which head architecture: "reference" (the paper's GateHead) or "context" (masks/context.py). Not `kind`,
    #: which says whether the heads are trained.
    gate_kind: ClassVar[str] = "reference"

    def __post_init__(self):
        for key, index in self.site_heads.items():
            if not 0 <= index < len(self.heads):
                raise ValueError(
                    f"site {key_to_name(key)} points at head {index}, but there are {len(self.heads)} heads")
        for key, stage in self.site_stages.items():
            if stage not in STAGES:
                raise ValueError(f"site {key_to_name(key)} has unknown stage {stage!r}")

    @classmethod
    def fresh(cls, sites: list[CrossAttnSite], hidden_dim: int = 128, share_by_stage: bool = True,
              seed: int | None = None, **fields) -> "MaskAttnGates":
        """New (untrained) heads for `sites`: one per (stage, C, D) like the reference, or one per site."""
        if not sites:
            raise ValueError("no cross-attention sites selected: check the stage/placement filter")
        gen_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            heads, index_of, site_heads = nn.ModuleList(), {}, {}
            for site in sites:
                share_key = (site.stage, site.feature_dim, site.context_dim) if share_by_stage else site.key
                if share_key not in index_of:
                    index_of[share_key] = len(heads)
                    heads.append(cls.make_head(site.feature_dim, site.context_dim, hidden_dim))
                site_heads[site.key] = index_of[share_key]
        finally:
            if seed is not None:
                torch.random.set_rng_state(gen_state)
        fields.setdefault("architecture", architecture_name(sites))
        fields.setdefault("kind", "untrained")
        return cls(heads=heads, site_heads=site_heads, site_stages={s.key: s.stage for s in sites}, **fields)

    @staticmethod
    def make_head(feature_dim: int, token_dim: int, hidden_dim: int) -> GateHead:
        """A new head of this gate kind."""
        return GateHead(feature_dim, token_dim, hidden_dim)

    def training_run(self):
        """The run state a training forward pass starts from (a fresh one per step), or None: reference heads
        gather nothing while they run."""
        return None

    # --- the GateSource members (masks/source.py) ---
    def covers(self, key: SiteKey) -> bool:
        return key in self.site_heads

    @property
    def hidden_dim(self) -> int:
        return self.heads[0].hidden_dim if len(self.heads) else 0

    def head(self, key: SiteKey) -> GateHead:
        return self.heads[self.site_heads[key]]

    def heads_on(self, device: torch.device) -> nn.ModuleList:
        """The heads on `device` (fp32, the reference's gate precision), copied once per device and cached."""
        device = torch.device(device)
        first = next(self.heads.parameters(), None)
        if first is None or first.device == device:
            return self.heads
        cached = self._on_device.get(device)
        if cached is None:
            import copy

            cached = copy.deepcopy(self.heads).to(device=device, dtype=torch.float32)
            cached.requires_grad_(False)
            self._on_device[device] = cached
        return cached

    def check_fits(self, sites: list[CrossAttnSite], model_name: str = "this model") -> None:
        """Raise a GateMismatchError naming the problem unless every gated site exists with the heads' dims."""
        by_key = {s.key: s for s in sites}
        missing = [key_to_name(k) for k in self.site_heads if k not in by_key]
        if missing:
            raise GateMismatchError(
                f"the gate file {self.source or '(in memory)'} was made for {self.architecture}; {model_name} "
                f"({architecture_name(sites)}) has no cross-attention at {', '.join(missing[:6])}"
                f"{' …' if len(missing) > 6 else ''}. Load gates trained for this model's architecture."
            )
        for key, index in self.site_heads.items():
            site, head = by_key[key], self.heads[index]
            if (site.feature_dim, site.context_dim) != (head.feature_dim, head.token_dim):
                raise GateMismatchError(
                    f"the gate file {self.source or '(in memory)'} was made for {self.architecture} "
                    f"(at {key_to_name(key)}: features {head.feature_dim}, text {head.token_dim}); {model_name} "
                    f"({architecture_name(sites)}) has features {site.feature_dim}, text {site.context_dim} there. "
                    f"Load gates trained for this model's architecture."
                )

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.heads.parameters())
