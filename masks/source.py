"""GateSource: what a MASKATTN object is. Everything Apply MaskAttn, the hooks (nodes/hooks.py), the runtime
(masks/runtime.py), the recorder and the viewer may ask of a gate source is declared here, with its default.

Three sources ship: learned heads (`masks.gates.MaskAttnGates`), zero-shot gates (`masks.zeroshot.ZeroShotGates`) and
region gates (`masks.region.RegionGates`); the last two share `PromptGateSource`, a source built from a prompt's
tokens. A source belongs to one of two families, told apart by `needs_attention`:

- False (learned heads): the runtime runs the source's heads on the layer's input features and text states. The source
  has `site_heads` ({site key: head index}) and `heads_on(device)` (the heads in float32 on that device).
- True: the keep-probabilities come from the layer's own projected queries and keys, at the attention call:
  `attention_probabilities(key, q, k, heads, info)`.

A base class rather than a typing.Protocol: callers read every member plainly because the defaults live here (a
Protocol gives none to a class that does not subclass it, so callers would be back to probing), and Apply MaskAttn's
isinstance check accepts only what was written as a gate source (a runtime-checkable Protocol accepts any object that
happens to have the method names). Pure torch, no ComfyUI import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from .gate import NEGATIVE_VALUE
from .topology import CrossAttnSite, SiteKey, architecture_name


# The transformer_options key under which Apply MaskAttn gives a source the sigma of its handover_percent.
HANDOVER_SIGMA = "maskattn_handover_sigma"


class GateMismatchError(ValueError):
    """A gate set does not fit the model it is applied to."""


class GateSource(ABC):
    """A source of MaskAttn gates: which (latent location, token) pairs of each gated cross-attention layer stay.

    Subclasses implement `check_fits` and `covers`, and their family's computation (see the module docstring); every
    other member has the default given here. A source is read-only once built and is shared by a model and its
    clones; what it gathers while sampling lives in a per-run state on the patched model (`new_run`,
    masks/run_state.py).
    """

    kind: str = "gate source"
    """What kind of source, for messages and the viewer: learned heads are "trained", "untrained" or "test_only";
    "zero-shot"; "region"."""

    label: str = ""
    """A qualifier the viewer puts before the kind ("training-free" for zero-shot gates); "" for none."""

    source: str = ""
    """Where the gates came from (a file, the prompt's groups, the phrases), for messages; "" when unknown."""

    stage: str = "all"
    """The stage the source gates ("all", "high", "mid", "low"), for Apply MaskAttn's message when nothing matches."""

    negative_value: float = NEGATIVE_VALUE
    """The bias added to a suppressed pair's attention logit at strength 1."""

    start_percent: float = 0.0
    """The earliest point of the schedule the source gates; Apply MaskAttn uses the later of this and its input."""

    handover_percent: float | None = None
    """A point of the schedule where the source's own rule changes (zero-shot gates with a layout: the places give
    way to the model's attention); Apply MaskAttn hands its sigma to the source in the transformer options
    (`HANDOVER_SIGMA`). None: no such point."""

    needs_attention: bool = False
    """True: gated from the layer's queries and keys (`attention_probabilities`); False: learned heads run on the
    layer's input features (`site_heads`, `heads_on`)."""

    observes_inactive: bool = False
    """True: `observe_attention` is called at the gated layers on steps outside the start/end window."""

    masks_self_attention: bool = False
    """True: the gated layers' self-attention gets an attn1 container that adds `self_attention_bias`."""

    track_regions: bool = False
    """True: a consumer reads the source's regions and per-word leakage after a run (the Zero-Shot Masks node, the
    viewer), so a source that keeps them as optional bookkeeping (zero-shot gates) keeps them; others ignore it."""

    keeps_a_token_per_row: bool = False
    """True: at every location some token has keep-probability 1 (attention sources), so no location can keep
    nothing and the runtime skips gate_bias's empty-row rule (a no-op then: the same bits)."""

    reads_features: bool = False
    """True (needs_attention sources that also read the layer's inputs: context gates, masks/context.py): the gate
    patch leaves the layer's input features and text states for `attention_probabilities` in the call's options."""

    token_groups: list[int] | None = None
    """Per prompt token position, the index of its group in `grouping` (-1: none), for the viewer; None: no groups."""

    grouping = None
    """The prompt's word groups (`masks.prompt.Grouping`) that `token_groups` indexes, for the viewer; None: none."""

    layout = None
    """The layout the prompt's spatial words give `grouping`'s groups (`masks.layout.Layout`), for the viewer; None:
    none."""

    # Declared, not defaulted: a dataclass subclass (MaskAttnGates) would read a class value here as its field's
    # default.
    site_heads: dict[SiteKey, int]
    """Learned heads only (needs_attention False): which head of `heads_on(device)` gates each covered site."""

    @abstractmethod
    def check_fits(self, sites: list[CrossAttnSite], model_name: str = "this model") -> None:
        """Raise a `masks.gates.GateMismatchError` naming the problem unless the source can gate a model with these
        cross-attention sites; called by Apply MaskAttn before `covers`."""

    @abstractmethod
    def covers(self, key: SiteKey) -> bool:
        """Whether the source gates the site `key` (of the model last given to `check_fits`)."""

    def attention_probabilities(self, key: SiteKey, q: Tensor, k: Tensor, heads: int, info: dict) -> Tensor:
        """Keep-probabilities [B, N, T] (float32) of one gated layer from its projected queries [B, N, heads*d] and keys
        [B, T, heads*d]; `info` is the call's transformer options. Sources with needs_attention implement it."""
        raise NotImplementedError(f"{type(self).__name__} sets needs_attention but has no attention_probabilities")

    def heads_on(self, device) -> nn.ModuleList:
        """The learned heads on `device` in float32, indexed by `site_heads`. Sources without needs_attention
        implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no learned heads; set needs_attention and implement "
                                  f"attention_probabilities")

    def observe_attention(self, key: SiteKey, q: Tensor, k: Tensor, heads: int, info: dict) -> None:
        """A gated layer's attention on a step outside the start/end window (called when observes_inactive); no-op."""

    def self_attention_bias(self, key: SiteKey, q: Tensor, heads: int, info: dict,
                            negative_value: float) -> Tensor | None:
        """[B, N, N] additive bias for a gated layer's self-attention (called when masks_self_attention); None: none."""
        return None

    def leakage(self) -> list[tuple[str, str, float]]:
        """(word, its group, share of its attention inside its group's region) from the last run, for the viewer;
        [] when the source has no regions."""
        return []

    def region_masks(self, height: int, width: int) -> Tensor | None:
        """[R, G, height, width] 0/1: each group's region in the last run; None when the source has none (or no run
        was seen)."""
        return None

    def new_run(self):
        """A fresh per-run state (a `masks.run_state.RunState`) for one patched model, or None when the source
        gathers nothing while sampling. Apply MaskAttn puts it in the model's transformer options
        (masks/run_state.py)."""
        return None

    def describe(self) -> str:
        """A short text for the node's output and messages."""
        return f"{self.kind} gates" + (f" ({self.source})" if self.source else "")

    def __deepcopy__(self, memo):
        # read-only once built; ComfyUI deep-copies model_options on every clone, so the clones share it
        return self


def kind_of(obj) -> str:
    """How a message names what was connected: a gate source's kind, else the Python type of anything else."""
    return obj.kind if isinstance(obj, GateSource) else type(obj).__name__


ENCODERS_OF = {"sdxl": {"g", "l"}, "sd1": {"l"}, "sd2": {"h"}}


def repeated_copies(k: Tensor, length: int) -> Tensor | None:
    """[b, T] bool: the tokens of the chunks that repeat the first `length` tokens (ComfyUI repeats a shorter prompt
    to batch it with a longer one); False for chunks of another prompt (a ConditioningConcat). Computed on the
    device, no sync. None when T == length."""
    b, t, width = k.shape
    if t == length:
        return None
    copies = k.view(b, t // length, length, width)
    first = copies[:, :1]
    scale = first.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    same = ((copies - first).abs().amax(dim=(2, 3)) <= 1e-3 * scale[:, :, 0, 0])  # [b, copies]
    return same.repeat_interleave(length, dim=1)


class PromptGateSource(GateSource):
    """What gate sources built from a prompt's tokens share: they must meet a model of the CLIP they were built with,
    they cover the layers of their stage, and they are gated from the layer's attention (needs_attention), on the
    prompt's rows (masks.rows.prompt_rows). Subclasses set `encoders`, `stage`, `source_name`, `mismatch_error`, and
    `_site_stages` / `_checked` in __init__, and implement `attention_probabilities`."""

    source_name = "prompt"
    mismatch_error = GateMismatchError
    needs_attention = True

    def check_fits(self, sites: list[CrossAttnSite], model_name: str = "this model") -> None:
        arch = architecture_name(sites)
        expected = ENCODERS_OF.get(arch)
        if expected is not None and self.encoders and self.encoders != expected:
            raise self.mismatch_error(
                f"the {self.source_name} gates were built with a CLIP whose encoders are {sorted(self.encoders)}, but "
                f"{model_name} is {arch} (encoders {sorted(expected)}). Connect the CLIP of the same checkpoint.")
        self._site_stages[arch] = {s.key: s.stage for s in sites}
        self._checked = arch

    def covers(self, key: SiteKey, sites: list[CrossAttnSite] | None = None) -> bool:
        """Whether the site `key` of `sites` (default: of the model last given to check_fits) is in this stage."""
        stages = {s.key: s.stage for s in sites} if sites is not None else self._site_stages.get(self._checked, {})
        stage = stages.get(key)
        return stage is not None and (self.stage == "all" or stage == self.stage)
