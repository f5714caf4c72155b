"""Region gates: the user says where each phrase of the prompt belongs; its tokens are kept only there.

One prompt, several phrases ("red cube", "blue sphere"), one MASK per phrase (drawn, from a segmenter, from boxes).
At every gated cross-attention layer, each latent location keeps a phrase's tokens only if the location lies in
that phrase's mask, resized to the layer's grid. Everything else in the prompt (start token, words in no phrase,
relation words) stays visible everywhere. End and padding tokens are a choice (`END_TOKEN_MODES`): a causal
CLIP-style encoder folds the whole prompt into them, so they carry every phrase's identity into every region:
"keep" leaves them visible everywhere (the softer option, the default), "hide_in_regions" hides them inside the
regions, where the phrase tokens speak alone.

It is a gate source (masks/source.py) like the learned heads and the zero-shot gates: `Apply MaskAttn` installs it,
the runtime asks `attention_probabilities` for a keep-probability per (location, token), thresholds it (0.5) and adds
-1e4 to the suppressed pairs; the recorder and the viewer see the result like any other gate. The keep-probability of
a phrase token at a location is the fraction of that location's cell the mask covers, so at the default threshold a
cell belongs to a region when more than half of it is covered; a region keeps at least its most covered cell(s) at
every grid, so a small region never vanishes at a coarse layer.

Masks: a MASK is [B, H, W] (or [H, W]) in [0, 1] at any resolution; it is stretched to the latent grid as
ComfyUI's own mask conditioning is. A batch of 1 serves every image; a batch equal to the number of images the
sampler runs gives one mask per image (like ComfyUI's batched masks). Only the positive (cond) rows are gated:
the negative prompt has other words at other positions.

Pure torch; phrases are mapped to tokens with the zero-shot module's word/token alignment (masks/prompt.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .gate import NEGATIVE_VALUE
from .record import latent_hw
from .rows import prompt_rows
from .tokens import token_kinds
from .topology import STAGE_CHOICES, SiteKey
from .prompt import GroupingError, grouping_from_text, token_group_map
from .source import PromptGateSource, repeated_copies

END_TOKEN_MODES = ("keep", "hide_in_regions")
DEFAULT_END_TOKENS = "keep"
DEFAULT_STAGE = "all"  # the layout is given, not read from the model's attention: every stage can use it


class RegionError(ValueError):
    """Phrases or masks that do not fit the prompt or each other; `fix` says what to do about it."""

    fix = ""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        if fix is not None:
            self.fix = fix


class RegionPhraseError(RegionError):
    """The phrases: none written, or words that are not words of the prompt."""

    fix = "Use words of the prompt in phrases, each at most as often as the prompt has it."


class RegionMaskError(RegionError):
    """A mask (mask_1..mask_N): its shape, values, count or batch size."""

    fix = "Connect a mask with a white (non-zero) region for that phrase."


class RegionMaskBatchError(RegionMaskError):
    """A mask batch that fits neither one mask for all images nor one per image (found while sampling)."""


def split_phrases(text: str) -> list[str]:
    """Phrases written one per line or separated by "|"; "#" starts a comment; blank ones are dropped."""
    out = []
    for line in (text or "").splitlines():
        for part in line.split("#", 1)[0].split("|"):
            if part.strip():
                out.append(" ".join(part.split()))
    return out


def as_mask(mask: Tensor, name: str) -> Tensor:
    """A MASK input ([H, W], [B, H, W] or [B, 1, H, W]) as a float [B, H, W] CPU tensor in [0, 1]; a RegionMaskError
    naming `name` for a wrong shape, NaN/inf values or an image with no white pixel."""
    m = torch.as_tensor(mask).detach().float().cpu()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 4 and m.shape[1] == 1:  # [B, 1, H, W]
        m = m[:, 0]
    if m.ndim != 3 or m.shape[-1] == 0 or m.shape[-2] == 0:
        raise RegionMaskError(f"{name} has shape {tuple(mask.shape)}; expected a MASK [batch, height, width]",
                              fix=f"Connect a MASK to {name} (an image's mask, a drawn or segmented mask).")
    if not torch.isfinite(m).all():
        raise RegionMaskError(f"{name} contains NaN or infinite values",
                              fix=f"Check the node that makes {name}: a mask holds values from 0 to 1.")
    m = m.clamp(0.0, 1.0)
    empty = [i for i in range(m.shape[0]) if not bool((m[i] > 0).any())]
    if empty:
        which = "is empty" if m.shape[0] == 1 else f"is empty in batch item(s) {empty[:6]}"
        raise RegionMaskError(f"{name} {which} (all zero): the phrase would be suppressed everywhere")
    return m


def coverage(mask: Tensor, h: int, w: int) -> Tensor:
    """[B, H, W] mask -> [B, h, w] fraction of each latent cell it covers (area average), with every mask's most
    covered cell(s) raised to 1 so that no region disappears on a coarse grid."""
    cov = F.interpolate(mask[:, None], size=(h, w), mode="area")[:, 0]
    best = cov.amax(dim=(-2, -1), keepdim=True)
    return torch.where(cov >= best, torch.ones_like(cov), cov)


class RegionGates(PromptGateSource):
    """A MASKATTN gate source from phrases and masks (see the module docstring); Apply MaskAttn takes it as is."""

    source_name = "region"

    kind = "region"
    label = "region gates"
    needs_attention = True  # read at the attention call: it needs only the layer's grid and the batch layout
    placement = "encoder_decoder"

    def __init__(self, phrases: list[str], token_phrases: list[int], kinds: list[str], masks: list[Tensor], *,
                 stage: str = DEFAULT_STAGE, end_tokens: str = DEFAULT_END_TOKENS, encoders=(),
                 negative_value: float = NEGATIVE_VALUE, mask_names: list[str] | None = None, note: str = ""):
        if stage not in STAGE_CHOICES:
            raise ValueError(f"stage must be one of {STAGE_CHOICES}, got {stage!r}")
        if end_tokens not in END_TOKEN_MODES:
            raise ValueError(f"end_tokens must be one of {END_TOKEN_MODES}, got {end_tokens!r}")
        if len(token_phrases) != len(kinds):
            raise ValueError("token_phrases and kinds must have one entry per token position")
        names = mask_names or [f"mask_{i + 1}" for i in range(len(masks))]
        if len(masks) != len(phrases):
            raise RegionMaskError(f"{len(phrases)} phrase(s) but {len(masks)} mask(s)",
                                  fix="Give one mask per phrase, in the same order.")
        self.phrases = list(phrases)
        self.token_phrases = list(token_phrases)
        self.kinds = list(kinds)
        self.masks = [as_mask(m, n) for m, n in zip(masks, names)]
        self.mask_names = names
        batches = {m.shape[0] for m in self.masks}
        self.mask_batch = max(batches)
        if batches - {1, self.mask_batch}:
            raise RegionMaskError(
                f"{self._names()} hold different batch sizes {sorted(batches)}",
                fix="Give each phrase one mask (for every image), or every phrase the same number (one per image).")
        missing = [p for i, p in enumerate(self.phrases) if i not in set(self.token_phrases)]
        if missing:
            raise RegionPhraseError(f"phrase(s) {missing} map to no token of the prompt")
        self.stage = stage
        self.end_tokens = end_tokens
        self.encoders = frozenset(encoders)
        self.negative_value = negative_value
        self.source = note or f"region gates [{' | '.join(self.phrases)}]"
        # stages per architecture checked (these gates are shared by every model they are applied to)
        self._site_stages: dict[str, dict[SiteKey, str]] = {}
        self._checked: str | None = None
        self._cache: dict[tuple, Tensor] = {}
        # finished keep maps per (grid, tokens, row layout, device): (the layout's rows object, the [B, N, T] map)
        self._finished: dict[tuple, tuple[object, Tensor]] = {}

    def _names(self) -> str:
        return self.mask_names[0] if len(self.mask_names) == 1 else f"{self.mask_names[0]}..{self.mask_names[-1]}"

    # gate-source interface: check_fits / covers come from PromptGateSource

    def keep_template(self, h: int, w: int, tokens: int, device) -> Tensor:
        """[mask batch, h*w, tokens] keep-probabilities of the positive prompt on an h x w grid, cached."""
        key = (h, w, tokens, str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            return self._make_template(key, h, w, tokens, device)

    def _make_template(self, key: tuple, h: int, w: int, tokens: int, device) -> Tensor:
        length = len(self.token_phrases)
        repeat = tokens // length
        phrase_of = torch.tensor(self.token_phrases * repeat)
        end = torch.tensor([k == "end" for k in self.kinds] * repeat)
        cov = torch.stack([coverage(m, h, w).expand(self.mask_batch, h, w) for m in self.masks], dim=-1)
        cov = cov.reshape(self.mask_batch, h * w, len(self.masks))  # [Bm, N, R]
        keep = torch.ones(self.mask_batch, h * w, tokens)
        in_phrase = phrase_of >= 0
        keep[:, :, in_phrase] = cov[:, :, phrase_of[in_phrase]]
        if self.end_tokens == "hide_in_regions":
            keep[:, :, end] = (1.0 - cov.amax(dim=-1, keepdim=True)).expand(-1, -1, int(end.sum()))
        cached = self._cache[key] = keep.to(device)
        return cached

    def attention_probabilities(self, key: SiteKey, q: Tensor, k: Tensor, heads: int, info: dict) -> Tensor:
        """Keep-probabilities [B, N, T] for one gated layer: the prompt's rows from the masks, the rest 1.

        The prompt's rows are masks.rows.prompt_rows: the cond chunks, or the rows the host adapter found by text
        when another pack changed the batch (an attention couple's region rows carry other prompts and stay 1). The
        i-th of them draws image i mod (images), images = prompt rows / cond chunks: the sampler's batch order, which
        the couples keep for the rows they leave in place. The returned map is cached and shared: read it only."""
        b, n, _ = q.shape
        t = k.shape[1]
        length = len(self.token_phrases)
        if length == 0 or t % length:  # a context that is not this prompt (repeated): leave it alone
            return torch.ones(b, n, t, device=q.device, dtype=torch.float32)
        info = info or {}
        rows = prompt_rows(info, b, q.device)
        h, w = latent_hw(n, info)
        chunks = tuple(info.get("cond_or_uncond") or (0,))
        cache_key = (h, w, t, b, chunks, id(rows), str(q.device))
        cached = self._finished.get(cache_key)
        if cached is not None and cached[0] is rows:
            keep = cached[1]
        else:
            with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
                keep = self._finished_map(rows, b, n, t, h, w, chunks, q.device)
            if len(self._finished) >= 64:  # (row tensors made anew per call would otherwise pile up here)
                self._finished.clear()
            self._finished[cache_key] = (rows, keep)
        ours = repeated_copies(k, length) if t != length else None
        if ours is not None:  # chunks of a concatenated other prompt stay untouched
            keep = keep.masked_fill(~ours[:, None, :], 1.0)
        return keep

    def _finished_map(self, rows, b: int, n: int, t: int, h: int, w: int, chunks: tuple, device) -> Tensor:
        """[b, n, t]: the template of each prompt row's image on its rows, 1 elsewhere."""
        if isinstance(rows, list):  # no row of this prompt (an uncond-only call)
            return torch.ones(b, n, t, device=device, dtype=torch.float32)
        count = b if rows is None else rows.shape[0]
        cond_chunks = chunks.count(0) or 1
        images = count // cond_chunks if count % cond_chunks == 0 else count
        if self.mask_batch not in (1, images):
            raise RegionMaskBatchError(
                f"MaskAttn Region Gates: {self._names()} hold {self.mask_batch} images but the KSampler runs "
                f"{images}; give one mask per phrase for all images, or one per image")
        template = self.keep_template(h, w, t, device)  # [Bm, N, T]
        image = torch.arange(count) % images if self.mask_batch > 1 else torch.zeros(count, dtype=torch.long)
        per_row = template.index_select(0, image.to(device))  # [count, N, T]
        if rows is None:
            return per_row
        return torch.ones(b, n, t, device=device, dtype=torch.float32).index_copy_(0, rows, per_row)

    # for messages ----------------------------------------------------------------------------------------------------
    def describe(self) -> str:
        lines = [" | ".join(self.phrases),
                 f"# {len(self.phrases)} region(s), gated at stage {self.stage}; end/padding tokens: {self.end_tokens}"]
        for i, phrase in enumerate(self.phrases):
            where = [p for p, g in enumerate(self.token_phrases) if g == i]
            m = self.masks[i]
            lines.append(f"# {phrase} -> tokens {','.join(map(str, where))}; {self.mask_names[i]} "
                         f"{m.shape[-1]}x{m.shape[-2]}, {float((m > 0.5).float().mean()):.0%} of the image")
        return "\n".join(lines)


def phrase_tokens(text: str, phrases: list[str], tokens: dict, vocab: dict[int, str]) -> list[int]:
    """Per token position, the index of the phrase it belongs to (-1: none). Words of a phrase must be words of the
    prompt; a word that occurs more than once is taken at the occurrence nearest the phrase's other words."""
    try:
        grouping = grouping_from_text(text, "\n".join(phrases))
    except GroupingError as e:
        raise RegionPhraseError(str(e)) from None
    if len(grouping.groups) != len(phrases):
        raise RegionPhraseError(f"{len(phrases)} phrases but {len(grouping.groups)} have words")
    token_phrases, _ = token_group_map(grouping, tokens, vocab)
    return token_phrases


def build_region_gates(text: str, tokens: dict, vocab: dict[int, str], phrases, masks: list[Tensor], *,
                       stage: str = DEFAULT_STAGE, end_tokens: str = DEFAULT_END_TOKENS,
                       mask_names: list[str] | None = None, note: str = "") -> RegionGates:
    """Prompt text + ComfyUI tokenization + phrases (a list, or text one per line / "|"-separated) + one mask per
    phrase -> RegionGates."""
    phrases = split_phrases(phrases) if isinstance(phrases, str) else [p for p in phrases if p.strip()]
    if not phrases:
        raise RegionPhraseError("no phrases given",
                                fix="Write the phrases of the prompt, one per line or separated by |.")
    if len(masks) != len(phrases):
        raise RegionMaskError(f"{len(phrases)} phrase(s) ({' | '.join(phrases)}) but {len(masks)} mask(s)",
                              fix="Give one mask per phrase, in the same order.")
    token_phrases = phrase_tokens(text, phrases, tokens, vocab)
    kinds = token_kinds(tokens, vocab)
    return RegionGates(phrases, token_phrases, kinds[:len(token_phrases)], masks, stage=stage,
                       end_tokens=end_tokens, encoders=tokens.keys(), mask_names=mask_names, note=note)
