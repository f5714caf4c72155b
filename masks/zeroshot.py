"""Zero-shot (training-free) MaskAttn gates: region gates from the prompt's structure and the model's own attention.

This is not the paper's method. MaskAttn-SDXL learns a gate head per stage; nobody has published trained heads,
so this module gives the same injection point a gate that needs no training:

1. the prompt is split into entity groups and its words mapped to token positions (masks/prompt.py);
2. at sampling time, per gated layer, every latent location is assigned to the group it attends to most, and the
   tokens of the other groups are gated out there. Start, end and padding tokens, and words in no group, stay
   visible everywhere. Options (masks/zeroshot_partition.py): the partition from this layer's attention or from
   attention aggregated over layers and steps; end and padding tokens hidden inside the groups' regions;
   self-attention separated between regions. The aggregate also gives the groups' regions as masks and each word's
   leakage (share of its attention inside its group's region).

Pure Python + torch: no ComfyUI import.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .gate import NEGATIVE_VALUE
from .layout import FULL, Layout, layout_prior, parse_layout
from .prompt import Grouping, grouping_for, token_group_map
from .record import latent_hw
from .rows import prompt_rows
from .run_state import SourceRuns
from .source import HANDOVER_SIGMA, GateMismatchError, PromptGateSource, repeated_copies
from .tokens import token_kinds
from .topology import STAGE_CHOICES, SiteKey
from .zeroshot_partition import (
    DEFAULT_MEMORY,
    REGION_LEVEL,
    PartitionState,
    ZeroShotRun,
    group_density,
    image_masks,
    regions,
    self_attention_bias,
)

# Where zero-shot gating starts by default, as a fraction of the sampling schedule (ComfyUI's start_percent).
# In the first steps the latent is mostly noise: per-token cross-attention maps are low-contrast and an argmax
# partition of them is noise that gating would then lock in. The coarse layout forms in roughly the first third
# of the schedule, and attribute binding is decided there too, so gating cannot start much later and still help.
DEFAULT_START_PERCENT = 0.2
DEFAULT_STAGE = "mid"  # the method's default stage

# partition: "layer" (this layer's attention at this step only) or "aggregate" (densities aggregated over the
# gated layers and the steps, from the first step); docs/ZEROSHOT.md compares them.
PARTITIONS = ("layer", "aggregate")
DEFAULT_PARTITION = "aggregate"
# End and padding tokens: "keep" visible everywhere; "hide_in_regions" hidden inside every group's region (a causal
# CLIP-style encoder folds the whole prompt into them, so they carry every group's words into every region).
END_TOKENS = ("keep", "hide_in_regions")
DEFAULT_END_TOKENS = "keep"
# Self-attention (attn1) of the gated layers: "open" untouched; "separate_groups" a location of one group's region
# does not attend to another group's region (Bounded Attention's subject masking).
SELF_ATTENTION = ("open", "separate_groups")
DEFAULT_SELF_ATTENTION = "open"
# Layout from the prompt's spatial words (masks/layout.py): with one found, gating starts at the first step, where the
# layout is decided, with each group's place alone; from start_percent on the aggregate decides, weighted by the
# places ("combine") or alone ("window").
LAYOUTS = ("from the prompt", "off")
DEFAULT_LAYOUT = "from the prompt"
LAYOUT_HANDOVERS = ("combine", "window")
DEFAULT_LAYOUT_HANDOVER = "combine"
# A place's weight outside its band: after the handover ("combine") a group outside its place wins only where the
# others draw less than this share of its attention; inside shared places the attention alone decides.
LAYOUT_FLOOR = 0.001


class ZeroShotMismatchError(GateMismatchError):
    """Zero-shot gates built with one text encoder are applied to a model of another architecture."""


class ZeroShotGates(PromptGateSource):
    """A MASKATTN gate source that needs no training (see the module docstring); Apply MaskAttn takes it as is."""

    source_name = "zero-shot"
    mismatch_error = ZeroShotMismatchError

    kind = "zero-shot"
    label = "training-free"
    placement = "encoder_decoder"

    def __init__(self, grouping: Grouping, token_groups: list[int], *, stage: str = DEFAULT_STAGE,
                 start_percent: float = DEFAULT_START_PERCENT, encoders=(), threshold: float = 0.5,
                 negative_value: float = NEGATIVE_VALUE, partition: str = DEFAULT_PARTITION,
                 memory: float = DEFAULT_MEMORY, end_tokens: str = DEFAULT_END_TOKENS,
                 self_attention: str = DEFAULT_SELF_ATTENTION, token_kinds: list[str] | None = None,
                 word_tokens: list[tuple[str, int, list[int]]] | None = None, layout: Layout | None = None,
                 layout_handover: str = DEFAULT_LAYOUT_HANDOVER, layout_floor: float = LAYOUT_FLOOR,
                 notice: Callable[[str], None] | None = None, observe_before_start: bool = True):
        if stage not in STAGE_CHOICES:
            raise ValueError(f"stage must be one of {STAGE_CHOICES}, got {stage!r}")
        for name, value, choices in (("partition", partition, PARTITIONS), ("end_tokens", end_tokens, END_TOKENS),
                                     ("self_attention", self_attention, SELF_ATTENTION),
                                     ("layout_handover", layout_handover, LAYOUT_HANDOVERS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        self.partition = partition
        self.end_tokens = end_tokens
        self.self_attention = self_attention
        self.masks_self_attention = self_attention == "separate_groups"
        self.observe_before_start = observe_before_start  # (off only for a benchmark ablation)
        self.memory = float(memory)
        PartitionState(self.memory)  # (checks the memory now, not at the first sampling step)
        # what a run gathers (the aggregate, its regions and leakage, the notices given) lives in its run state
        self.runs = SourceRuns(self.new_run)
        kinds = list(token_kinds or [])
        self.end_positions = [p for p, kind in enumerate(kinds[:len(token_groups)]) if kind == "end"]
        # (word, group, token positions) of every grouped word, for the leakage report
        self.word_tokens = list(word_tokens or [])
        self.grouping = grouping
        self.token_groups = list(token_groups)
        self.groups = sorted({g for g in self.token_groups if g >= 0})
        self.stage = stage
        self.start_percent = float(start_percent)
        # the layout prior (None: off); it acts only where there are groups to separate and a place was found
        self.layout = layout
        self.layout_handover = layout_handover
        self.layout_floor = float(layout_floor)
        if self.uses_layout:
            self.handover_percent = self.start_percent
            self.start_percent = 0.0
        self.encoders = frozenset(encoders)
        self.threshold = threshold
        self.negative_value = negative_value
        self.source = f"zero-shot gates [{grouping.describe() or 'no groups'}]"
        # stages per architecture checked (these gates are shared by every model they are applied to)
        self._site_stages: dict[str, dict[SiteKey, str]] = {}
        self._checked: str | None = None
        self._maps: dict[tuple, tuple[Tensor, Tensor]] = {}
        # Called once per run with a message when sampling finds nothing to gate (the node's: log + canvas).
        self.notice = notice

    @property
    def keeps_a_token_per_row(self) -> bool:
        """A token in no group that is never hidden (the start token) has P = 1 at every location, so no location
        ever keeps nothing and the runtime may skip the empty-row rule (a no-op then)."""
        end = set(self.end_positions) if self.end_tokens == "hide_in_regions" else ()
        return any(g < 0 and p not in end for p, g in enumerate(self.token_groups))

    keeps_aggregate = True
    """Sampling always keeps the run's aggregate: the v2 partition, the layout's clock, self-attention separation, and
    the regions and leakage a reader may ask for after the run (the Zero-Shot Masks node, the viewer) come from it."""

    def new_run(self) -> ZeroShotRun:
        return ZeroShotRun(self)

    def _run(self, info: dict | None) -> ZeroShotRun:
        return self.runs.of(info, self)

    @property
    def last_partition(self) -> PartitionState | None:
        """The aggregate of the run these gates last worked in (None before any)."""
        run = self.runs.latest
        return None if run is None else run.partition

    @property
    def uses_layout(self) -> bool:
        """A layout prior with a place for some group, and at least two groups to separate."""
        return (self.layout is not None and len(self.groups) >= 2
                and any(self.layout.band_of(g) != (FULL, FULL) for g in self.groups))

    def layout_masks(self, height: int, width: int) -> Tensor | None:
        """[G, height, width] each gated group's place (column order) as a soft mask, or None without a layout."""
        if self.layout is None or not self.layout.active:
            return None
        return layout_prior(self.layout, self.groups, height, width)

    def _layout_weights(self, h: int, w: int, device) -> Tensor:
        """[h*w, G] the places on a layer's grid, floored at LAYOUT_FLOOR; drawn once per grid and device."""
        key = ("layout", h, w, str(device), self.layout_floor, tuple(sorted(self.layout.bands.items())))
        cached = self._maps.get(key)
        if cached is None:
            prior = layout_prior(self.layout, self.groups, h, w)
            floor = self.layout_floor
            cached = (floor + (1.0 - floor) * prior).flatten(1).t().contiguous().to(device)
            self._maps[key] = cached
        return cached

    def _layout_share(self, share: Tensor, density: Tensor, n: int, info: dict, device) -> Tensor:
        """The groups' shares [b, N, G] with the layout: the places alone before the handover, then the density
        weighted by them ("combine") or the shares as they are ("window")."""
        weights = self._layout_weights(*latent_hw(n, info), device)
        if self._before_handover(info):
            return weights.expand_as(share)
        if self.layout_handover == "window":
            return share
        weighted = density * weights
        return weighted / weighted.sum(dim=-1, keepdim=True).clamp_min(1e-30)

    def _before_handover(self, info: dict) -> bool:
        """Whether this step comes before the aggregate takes over (Apply MaskAttn sets the sigma; without it the
        places decide throughout)."""
        handover = (info or {}).get(HANDOVER_SIGMA)
        sigma = self._run(info).partition.sigma
        return handover is None or sigma is None or sigma > handover

    @property
    def observes_inactive(self) -> bool:
        """The steps before the start are observed too while the aggregate is kept (nothing is gated there; the
        aggregate forms unbiased)."""
        return self.keeps_aggregate and self.observe_before_start

    @property
    def active(self) -> bool:
        """At least two groups with tokens: with fewer there is nothing to separate and nothing is gated."""
        return len(self.groups) >= 2

    def nothing_to_separate(self) -> str | None:
        """Why these gates change nothing, or None when they have at least two groups to separate."""
        if self.active:
            return None
        if not any(it.kind in ("word", "embedding") for it in self.grouping.items):
            return "the prompt is empty, so there are no groups to separate: the model runs unchanged"
        found = self.grouping.describe() or "no object words"
        return (f"the prompt gives {len(self.groups)} group{'s' if len(self.groups) != 1 else ''} ({found}); at least "
                f"two (e.g. 'red book | yellow vase') are needed to separate anything: the model runs unchanged")

    def _say_once(self, info: dict, what: str, message: str) -> None:
        """Give `message` once per sampling run (these gates are cached by ComfyUI and reused across runs, and each run
        deserves its notice). Only on the notice path (reading sigma syncs)."""
        if self._run(info).first_notice(what, info) and self.notice is not None:
            self.notice(message)

    # gate-source interface: check_fits / covers come from PromptGateSource

    def _group_tensors(self, tokens: int, device) -> tuple[Tensor, Tensor, Tensor] | None:
        """For a context of `tokens` tokens: ([T] bool, the token belongs to a group; [T] that group's column, 0
        where none; [T, G] one-hot), cached per (length, device); None when the context is not this prompt's
        length repeated (ComfyUI repeats a shorter prompt up to a common multiple of 77)."""
        length = len(self.token_groups)
        if length == 0 or tokens % length:
            return None
        key = (tokens, str(device))
        cached = self._maps.get(key)
        if cached is None:
            column_of = {g: c for c, g in enumerate(self.groups)}
            columns = [column_of.get(g, -1) for g in self.token_groups] * (tokens // length)
            column = torch.tensor(columns, dtype=torch.long)
            grouped = column >= 0
            onehot = torch.zeros(tokens, len(self.groups))
            onehot[grouped.nonzero().flatten(), column[grouped]] = 1.0
            cached = self._maps[key] = (grouped.to(device), column.clamp_min(0).to(device), onehot.to(device))
        return cached

    def attention_probabilities(self, key: SiteKey, q: Tensor, k: Tensor, heads: int, info: dict) -> Tensor:
        """Keep-probabilities [B, N, T] for one gated layer, from this layer's own attention.

        Source: this layer's own queries and keys, this step. That is the attention the gate acts on, at this
        layer's resolution, with no state kept between steps or layers (a previous step's map would need storage
        keyed by site and batch layout, which changes with cfg, area conds and batch size, and would be stale by
        one step); the cost is one extra QK^T softmax per gated layer.

        Per cond row: A = softmax(QK^T/sqrt(d)) averaged over heads; a group's mass at location n is the sum of
        A over its tokens; each group's mass is normalised over the locations (its spatial distribution), so a
        subject that draws little attention overall still wins where its attention concentrates (raw mass would
        let the dominant subject win everywhere and deepen neglect). r_g = a group's share of those densities at
        n. A group's tokens get P = 0.5 + 0.5 (r_g - max over the other groups), so at threshold 0.5 exactly the
        winner is kept (a tie keeps the tied groups); a lower threshold also keeps groups that come close, a
        higher one keeps a group only where it wins clearly. Tokens in no group, uncond rows, contexts of another
        length and concatenated chunks that are not copies of this prompt get P = 1 (never gated). No host sync.
        """
        b, n, _ = q.shape
        t = k.shape[1]
        if not self.active:
            return torch.ones(b, n, t, device=q.device, dtype=torch.float32)
        rows = prompt_rows(info, b, q.device)
        if isinstance(rows, list) and not rows:  # an uncond-only call: nothing of ours to gate
            return torch.ones(b, n, t, device=q.device, dtype=torch.float32)
        maps = self._group_tensors(t, q.device)
        if maps is None:
            self._say_once(info, "not found", (
                f"MaskAttn Zero-Shot Gates: the prompt given to this node ({len(self.token_groups)} tokens) is not the "
                f"one being sampled (its context has {t} tokens), so nothing is gated. Connect this node's "
                f"conditioning output to the KSampler's positive input, or give it exactly the positive prompt."))
            return torch.ones(b, n, t, device=q.device, dtype=torch.float32)
        grouped, column, onehot = maps
        gated = self._gate(q, k, heads, info, rows, grouped, column, onehot, gate=True)
        if rows is None:
            return gated
        out = torch.ones(b, n, t, device=q.device, dtype=torch.float32)
        return out.index_copy_(0, rows, gated)

    def observe_attention(self, key: SiteKey, q: Tensor, k: Tensor, heads: int, info: dict) -> None:
        """A gated layer's attention at a step before gating starts: added to the aggregate, nothing gated."""
        if not self.active:
            return
        b, t = q.shape[0], k.shape[1]
        rows = prompt_rows(info, b, q.device)
        maps = self._group_tensors(t, q.device)
        if (isinstance(rows, list) and not rows) or maps is None:
            return
        self._gate(q, k, heads, info, rows, *maps, gate=False)

    def _gate(self, q: Tensor, k: Tensor, heads: int, info: dict, rows, grouped: Tensor, column: Tensor,
              onehot: Tensor, gate: bool) -> Tensor | None:
        """Keep-probabilities [R, N, T] of the prompt's rows (see attention_probabilities); gate=False only feeds the
        aggregate and the leakage totals."""
        n, t = q.shape[1], k.shape[1]
        qc = q if rows is None else q.index_select(0, rows)
        kc = k if rows is None else k.index_select(0, rows)
        if qc.dtype != torch.float32:  # (float32 as is: a per-layer copy saved)
            qc, kc = qc.float(), kc.float()
        bc, d = qc.shape[0], qc.shape[-1] // heads
        qh = qc.view(bc, n, heads, d).transpose(1, 2)
        kh = kc.view(bc, t, heads, d).transpose(1, 2)
        attention = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1).mean(dim=1)  # [b, N, T]
        ours = repeated_copies(kc, len(self.token_groups))  # [b, T] bool, or None: every token is ours
        if ours is not None:
            attention = attention * ours[:, None, :]
        state = self._run(info).partition
        state.clock(info)
        h, w = latent_hw(n, info)
        aggregate = state.add(group_density(attention, onehot), h, w, (bc, len(self.groups)))
        if self.partition == "aggregate":
            density = aggregate
            share = density / density.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        else:  # v1, bit for bit
            mass = attention @ onehot  # [b, N, G]
            density = mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-30)
            share = density / density.sum(dim=-1, keepdim=True).clamp_min(1e-30)
            density = density * n  # (mean 1 over the grid, for the regions)
        if gate and self.uses_layout:
            share = self._layout_share(share, density, n, info, q.device)
        hides_end = self.end_tokens == "hide_in_regions" and bool(self.end_positions)
        region = regions(density) if hides_end or density is aggregate else None
        # leakage against the regions the masks show (the aggregate's), whichever partition
        state.add_leakage(attention, region if density is aggregate else regions(aggregate), column, grouped,
                          len(self.groups))
        if not gate:
            return None
        top2 = share.topk(2, dim=-1).values  # G >= 2
        best, second = top2[..., :1], top2[..., 1:]
        winner = share >= best
        other = torch.where(winner, second, best)  # the strongest other group
        keep = 0.5 + 0.5 * (share - other)
        keep = torch.where(winner, keep.clamp_min(0.5 + 1e-4), keep)  # the winner (and ties) stay above 0.5
        per_token = keep.index_select(-1, column).masked_fill(~grouped, 1.0)  # [b, N, T]
        if hides_end:
            end = self._end_mask(t, q.device)
            outside = (region < 0).float()[:, :, None]  # background keeps the end tokens
            per_token = torch.where(end[None, None, :], outside, per_token)
        if ours is not None:
            per_token = per_token.masked_fill(~ours[:, None, :], 1.0)
        return per_token

    def _end_mask(self, tokens: int, device) -> Tensor:
        key = ("end", tokens, str(device))
        cached = self._maps.get(key)
        if cached is None:
            length = len(self.token_groups)
            end = torch.zeros(length, dtype=torch.bool)
            end[self.end_positions] = True
            cached = self._maps[key] = end.repeat(tokens // length).to(device)
        return cached

    def self_attention_bias(self, key: SiteKey, q: Tensor, heads: int, info: dict,
                            negative_value: float) -> Tensor | None:
        """[B, N, N] additive bias for a gated layer's self-attention (self_attention="separate_groups"): a location
        in one group's region does not attend to another group's region; the prompt's rows only. None when there
        is no aggregate yet (the first gated layer of a run) or nothing to separate."""
        if not self.masks_self_attention or not self.active:
            return None
        b, n = q.shape[:2]
        rows = prompt_rows(info, b, q.device)
        if isinstance(rows, list) and not rows:
            return None
        bc = b if rows is None else rows.shape[0]
        h, w = latent_hw(n, info)
        state = self._run(info).partition
        state.clock(info)  # a layer's self-attention runs before its cross-attention: a new run starts here
        density = state.at(h, w, (bc, len(self.groups)))
        if density is None:
            return None
        bias = self_attention_bias(regions(density), negative_value, q.dtype)
        if rows is None:
            return bias
        return torch.zeros(b, n, n, device=q.device, dtype=q.dtype).index_copy_(0, rows, bias)

    # the partition as a product ------------------------------------------------------------------------------------
    def group_labels(self) -> list[str]:
        """One label per gated group column ("red book")."""
        words = self.grouping.group_words()
        return [" ".join(words[g]) for g in self.groups]

    def region_masks(self, height: int, width: int, cover_background: bool = False) -> Tensor | None:
        """[R, G, height, width] 0/1: each group's region in the last run's aggregate (R prompt rows, G groups in
        column order), or None when no run was seen. cover_background: every pixel goes to the group that wins it in
        the final aggregate, however weakly (a tie to the first), so the masks tile the image; about the gates' own
        decision, which is made per step from the aggregate so far."""
        state = self.last_partition
        aggregate = None if state is None else state.combined()
        if aggregate is None:
            return None
        return image_masks(aggregate, height, width, level=0.0 if cover_background else REGION_LEVEL)

    def leakage(self) -> list[tuple[str, str, float]]:
        """(word, its group, share of its attention inside its group's region) for every grouped word, over the
        last run's gated (and observed) layers, steps and images; empty when no run was seen."""
        state = self.last_partition
        if state is None or state.inside is None:
            return []
        length = len(self.token_groups)
        inside = state.inside.reshape(-1, length).sum(0).tolist()
        total = state.total.reshape(-1, length).sum(0).tolist()
        labels = self.grouping.group_words()
        out = []
        for word, group, positions in self.word_tokens:
            mass = sum(total[p] for p in positions if p < length)
            if mass > 0:
                out.append((word, " ".join(labels[group]), sum(inside[p] for p in positions if p < length) / mass))
        return out

    def leakage_text(self) -> str:
        """The leakage report as lines "word (group): 83% inside its region"."""
        rows = self.leakage()
        if not rows:
            return ""
        return "\n".join(f"{word} ({group}): {100 * share:.0f}% of its attention inside its region, "
                         f"{100 * (1 - share):.0f}% leaks" for word, group, share in rows)

    # for messages ----------------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """The grouping line (editable) and comment lines: stage, start, words in no group, token positions."""
        lines = [self.grouping.describe()]
        g = len(self.groups)
        if g >= 2 and self.uses_layout:
            within = "within the places" if self.layout_handover == "combine" else "alone"
            lines.append(f"# {g} groups, gated at stage {self.stage} from the first step by the prompt's layout; from "
                         f"{self.handover_percent:.0%} of the schedule the model's attention decides ({within}) "
                         f"(training-free zero-shot gates, not learned MaskAttn gates)")
        elif g >= 2:
            lines.append(f"# {g} groups, gated at stage {self.stage} from {self.start_percent:.0%} of the schedule "
                         f"(training-free zero-shot gates, not learned MaskAttn gates)")
        if g >= 2:
            lines.append(f"# partition: {self.partition}; end tokens: {self.end_tokens}; self-attention: "
                         f"{self.self_attention}")
        else:
            lines.append(f"# {g} group{'s' if g != 1 else ''} with tokens: nothing to separate, the model runs "
                         f"unchanged")
        if self.layout is not None:
            said = self.layout.summary_lines() or ["no spatial words between the groups: no layout"]
            lines.extend(f"# layout: {line}" for line in said)
            if self.layout.active and g < 2:
                lines.append("# layout: one group, nothing to place it against: the layout is not used")
        loose = self.grouping.ungrouped_words()
        if loose:
            lines.append("# in no group (visible everywhere): " + " ".join(loose))
        positions = []
        for gi, members in enumerate(self.grouping.groups):
            where = [p for p, gg in enumerate(self.token_groups) if gg == gi]
            words = " ".join(self.grouping.items[i].text for i in members)
            shown = ",".join(map(str, where[:16])) + (f",… ({len(where)} tokens)" if len(where) > 16 else "")
            positions.append(f"{words} -> {shown or 'no tokens'}")
        if positions:
            lines.append("# token positions: " + " | ".join(positions))
        lines.append("# edit: paste the first line into 'groups' and change it (groups split by |, words by spaces)")
        return "\n".join(lines)


def build_zero_shot_gates(text: str, tokens: dict, vocab: dict[int, str], *, groups_text: str = "",
                          stage: str = DEFAULT_STAGE, start_percent: float = DEFAULT_START_PERCENT,
                          partition: str = DEFAULT_PARTITION, memory: float = DEFAULT_MEMORY,
                          end_tokens: str = DEFAULT_END_TOKENS, self_attention: str = DEFAULT_SELF_ATTENTION,
                          layout: str = DEFAULT_LAYOUT, layout_handover: str = DEFAULT_LAYOUT_HANDOVER,
                          layout_floor: float = LAYOUT_FLOOR, notice: Callable[[str], None] | None = None,
                          observe_before_start: bool = True) -> ZeroShotGates:
    """Prompt text + ComfyUI tokenization (+ an optional user grouping) -> ZeroShotGates."""
    grouping = grouping_for(text, groups_text)
    token_groups, per_encoder = token_group_map(grouping, tokens, vocab)
    first = per_encoder[next(iter(per_encoder))]
    word_tokens = []
    for g, members in enumerate(grouping.groups):
        for i in members:
            where = [p for p in first.get(i, []) if p < len(token_groups) and token_groups[p] == g]
            if where:
                word_tokens.append((grouping.items[i].text, g, where))
    return ZeroShotGates(grouping, token_groups, stage=stage, start_percent=start_percent, encoders=tokens.keys(),
                         partition=partition, memory=memory, end_tokens=end_tokens, self_attention=self_attention,
                         token_kinds=token_kinds(tokens, vocab), word_tokens=word_tokens,
                         layout=_layout_option(layout, grouping), layout_handover=layout_handover,
                         layout_floor=layout_floor, notice=notice, observe_before_start=observe_before_start)


def _layout_option(layout: str, grouping: Grouping) -> Layout | None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return parse_layout(grouping) if layout == "from the prompt" else None

