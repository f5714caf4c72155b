"""Zero-shot (training-free) MaskAttn gates: region gates from the prompt's structure and the model's own attention.

This is NOT the paper's method. MaskAttn-SDXL learns a gate head per stage; nobody has published trained heads
yet, so this module gives the same injection point a gate that needs no training:

1. the prompt is split into entity groups: an object with its attributes ("a red book and a yellow vase" ->
   {red, book}, {yellow, vase}), at commas, "and", "with", spatial phrases ("next to", "on the left of", ...),
   BREAK and "|"; ComfyUI's weighting syntax `(word:1.2)`, `((word))`, escaped `\\(` is read the way ComfyUI's
   tokenizer reads it; style and quality words ("masterpiece", "photo of", "by <artist>") belong to no group;
2. words are mapped to token positions by aligning the prompt's words with the tokens ComfyUI's own tokenizer
   produced (both SDXL encoders, prompts over 77 tokens: chunk c occupies positions 77c .. 77c+76);
3. at sampling time, per gated layer, every latent location is assigned to the group it attends to most (from
   this layer's own attention, see `ZeroShotGates.attention_probabilities`), and the tokens of the other groups
   are gated out there. Start, end and padding tokens, and words in no group, stay visible everywhere.
   Options (v2, masks/zeroshot_partition.py): the partition from attention aggregated over layers and steps; end and
   padding tokens hidden inside the groups' regions; self-attention separated between regions. The aggregate is
   kept in every mode: it gives the groups' regions as masks and each word's leakage (share of its attention inside
   its group's region).

The grouping is shown to the user in a small text format ("red book | yellow vase") that can be edited and fed
back (`grouping_from_text`). Pure Python + torch: no ComfyUI import.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .gate import NEGATIVE_VALUE
from .gates import GateMismatchError
from .record import latent_hw
from .rows import prompt_rows
from .source import GateSource
from .tokens import host_pieces, pretokens, token_kinds
from .topology import STAGE_CHOICES, CrossAttnSite, SiteKey, architecture_name
from .zeroshot_partition import (
    DEFAULT_MEMORY,
    REGION_LEVEL,
    PartitionState,
    group_density,
    image_masks,
    regions,
    self_attention_bias,
)

# Where zero-shot gating starts by default, as a fraction of the sampling schedule (ComfyUI's start_percent).
# In the first steps the latent is mostly noise: per-token cross-attention maps are low-contrast and an argmax
# partition of them is noise that gating would then lock in. The coarse layout forms in roughly the first third
# of the schedule, and attribute binding is decided there too, so gating cannot start much later and still
# help. 0.2 is SDXL sigma ~5.1: the first 4 of 20 "normal" steps, the first 5 of 20 "karras" steps run ungated.
DEFAULT_START_PERCENT = 0.2
DEFAULT_STAGE = "mid"  # the method's default stage; SDXL 32x32 / SD1.x 16x16 maps at 1024 / 512 px

# v2 options (masks/zeroshot_partition.py). partition: "layer" = v1 (this layer's attention at this step only);
# "aggregate" = densities aggregated over the gated layers and the steps (from the first step). Measured on the
# compbench's second model, on colour-shape pairings it never saw (results_v2_pairs_200, 200 prompts x 2 seeds):
# aggregate +3.9 [0.6, 7.1] points of binding and -21.6 of colour leak against the untouched model, layer -1.8 and
# -8.3; on the first model (every pairing seen) neither moved binding beyond noise (results_zeroshot).
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


class GroupingError(ValueError):
    """A user-written grouping does not fit the prompt (a word that is not in it, an empty group)."""


class ZeroShotMismatchError(GateMismatchError):
    """Zero-shot gates built with one text encoder are applied to a model of another architecture."""


# --- 1. prompt text -> items ------------------------------------------------------------------------------------------
def weighted_segments(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """ComfyUI's emphasis syntax: `(x)` multiplies the weight by 1.1, `(x:1.3)` sets it, `\\(` `\\)` are literal.

    Returns (text, weight) runs in order. An unmatched parenthesis is literal text, as in ComfyUI.
    """
    out: list[tuple[str, float]] = []
    buf: list[str] = []

    def flush():
        if buf:
            out.append(("".join(buf), weight))
            buf.clear()

    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in "()":
            buf.append(text[i + 1])
            i += 2
            continue
        if ch == "(":
            close = _matching_paren(text, i)
            if close < 0:
                buf.append(ch)
                i += 1
                continue
            flush()
            inner = text[i + 1:close]
            inner_weight = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out.extend(weighted_segments(inner, inner_weight))
            i = close + 1
            continue
        buf.append(ch)
        i += 1
    flush()
    return out


def _matching_paren(text: str, start: int) -> int:
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "()":
            i += 2
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


@dataclass
class Item:
    """One piece of the prompt: a word, an embedding, punctuation, a separator phrase word, or BREAK."""

    text: str  # as written, emphasis syntax removed
    kind: str  # "word" | "embedding" | "punct" | "newline"
    role: str = ""  # "" | "sep" (separator word or mark) | "break" | "stop" | "style"
    group: int = -1

    @property
    def norm(self) -> str:
        return normalize_word(self.text)


def normalize_word(text: str) -> str:
    return text.strip().lower().replace("’", "'")


_ITEM_RE = re.compile(
    r"(?P<embedding>embedding:[^\s,;|()]+)"
    r"|(?P<word>[^\W_]+(?:['’\-][^\W_]+|(?<=\d)[.,]\d+)*)"  # man's, t-shirt, 2.5, f1.8
    r"|(?P<newline>\n)"
    r"|(?P<punct>[^\w\s]|_)"
)


def prompt_items(text: str) -> list[Item]:
    """The prompt as a flat list of items, emphasis removed (a weight boundary is also a word boundary)."""
    items: list[Item] = []
    for segment, _weight in weighted_segments(text):
        for m in _ITEM_RE.finditer(segment):
            kind = m.lastgroup
            piece = m.group(0)
            if kind == "embedding":
                name = piece.rstrip(".!?:")
                items.append(Item(name, "embedding"))
                items.extend(Item(c, "punct") for c in piece[len(name):])
            else:
                items.append(Item(piece, kind))
    return items


# --- 2. items -> entity groups ----------------------------------------------------------------------------------------
SEPARATOR_MARKS = {",", ";", ".", "!", "?", "|", ":", "/", "\n", "+"}
HARD_MARKS = {"|", ".", "!", "?", "\n", ";"}  # an attribute-only clause never merges across these

# Multi-word relations first (longest match wins). Single words after.
SEPARATOR_PHRASES = sorted([
    tuple(p.split()) for p in (
        "next to", "close to", "on the left of", "on the right of", "to the left of", "to the right of",
        "on the left side of", "on the right side of", "in front of", "on top of", "at the top of",
        "at the bottom of", "in the middle of", "in the center of", "in the centre of", "on the side of",
        "left of", "right of", "across from", "surrounded by", "together with", "along with", "as well as",
        "and", "with", "beside", "besides", "behind", "under", "underneath", "beneath", "below", "above", "over",
        "near", "on", "in", "inside", "within", "between", "against", "among", "amongst", "around", "atop",
        "alongside", "opposite", "versus", "vs", "or", "while", "plus", "by", "holding", "wearing", "riding",
        "carrying", "eating", "drinking", "reading", "playing", "sitting", "standing", "lying", "chasing",
        "hugging", "walking", "looking", "facing", "touching", "feeding", "watching", "containing", "featuring",
    )
], key=len, reverse=True)

STOPWORDS = set("""
a an the this that these those some any its it his her their my your our of is are was were be been being very
to at as into onto from for each other another both which who whose whom there here also just only then than
so such made make has have having outside indoors outdoors together them they him he she we us you me itself
themselves
""".split())

# Words that describe the whole picture, not one entity: never a group of their own, never gated.
STYLE_WORDS = set("""
masterpiece best quality high highly detailed detail details ultra hyper hyperrealistic realistic photorealistic
photoreal photo photograph photography picture image shot render rendering rendered illustration painting
drawing sketch art artwork digital concept oil watercolor watercolour acrylic pencil anime cartoon 3d 2d cgi
octane unreal engine cinematic lighting light lit studio portrait closeup close-up wide angle lens bokeh dof
depth field focus sharp soft 4k 8k 16k hd uhd hdr resolution trending artstation deviantart pixiv award
winning professional style stylized aesthetic beautiful intricate elegant epic dramatic volumetric ambient
composition scene view full body upper shot vintage retro minimalist minimalism abstract surreal fantasy
sci-fi scifi solo canvas dslr film grain analog polaroid bokeh
night day dawn dusk sunset sunrise morning evening noon midnight twilight rain fog foggy mist misty haze hazy
""".split())
# Multi-word genre and lighting names that describe the whole picture.
STYLE_PHRASES = [tuple(p.split()) for p in (
    "golden hour", "blue hour", "still life", "national geographic", "street photography", "oil on canvas",
    "depth of field", "rule of thirds", "bird's eye view", "wide shot", "long exposure",
)]
_CAMERA_RE = re.compile(r"\d+mm|f\d+(?:\.\d+)?|iso\d+", re.IGNORECASE)

# Words that open a framing phrase "<frame> of ...": "a photo of", "a painting of", "a close-up of".
FRAMING_WORDS = {"photo", "photograph", "picture", "image", "painting", "drawing", "sketch", "illustration",
                 "render", "rendering", "portrait", "closeup", "close-up", "shot", "view", "scene", "artwork",
                 "poster", "still", "snapshot", "depiction"}

# Attribute words: a clause made only of these ("a black and white cat", "a big, fluffy dog") joins its neighbour.
ATTRIBUTE_WORDS = set("""
red orange yellow green blue purple violet pink brown black white gray grey golden gold silver cyan magenta teal
turquoise beige maroon navy crimson scarlet dark light bright pale pastel neon striped spotted checkered
plaid big small large tiny huge giant little tall short long round square fat thin wide narrow wooden metal
metallic glass plastic stone furry fluffy shiny glossy matte transparent old young new ancient happy sad cute
angry smiling colorful colourful multicolored
""".split())

SOFT_SEPARATORS = {",", "and", "+", "&"}


@dataclass
class Grouping:
    """The prompt's items and its entity groups (lists of item indices, in prompt order)."""

    items: list[Item]
    groups: list[list[int]]

    def __post_init__(self):
        for item in self.items:
            item.group = -1
        for g, members in enumerate(self.groups):
            for i in members:
                self.items[i].group = g

    def group_words(self) -> list[list[str]]:
        return [[self.items[i].text for i in members] for members in self.groups]

    def describe(self) -> str:
        """The user-editable text: groups separated by " | ", words by spaces (the input of grouping_from_text)."""
        return " | ".join(" ".join(words) for words in self.group_words())

    def ungrouped_words(self) -> list[str]:
        return [it.text for it in self.items if it.kind in ("word", "embedding") and it.group < 0]


def _tag_roles(items: list[Item]) -> None:
    words = [(i, it.norm) for i, it in enumerate(items) if it.kind in ("word", "embedding")]
    style_at: set[int] = set()
    for k in range(len(words)):
        for phrase in STYLE_PHRASES:
            if tuple(w for _, w in words[k:k + len(phrase)]) == phrase:
                style_at.update(i for i, _ in words[k:k + len(phrase)])
    k = 0
    while k < len(words):
        if words[k][0] in style_at:
            items[words[k][0]].role = "style"
            k += 1
            continue
        if items[words[k][0]].text == "BREAK":
            items[words[k][0]].role = "break"
            k += 1
            continue
        for phrase in SEPARATOR_PHRASES:
            if tuple(w for _, w in words[k:k + len(phrase)]) == phrase:
                for i, _ in words[k:k + len(phrase)]:
                    items[i].role = "sep"
                k += len(phrase)
                break
        else:
            norm = words[k][1]
            if norm in STOPWORDS:
                items[words[k][0]].role = "stop"
            elif norm in STYLE_WORDS or _CAMERA_RE.fullmatch(norm):
                items[words[k][0]].role = "style"
            k += 1
    for it in items:
        if it.kind in ("punct", "newline") and it.text in SEPARATOR_MARKS:
            it.role = "sep" if it.text not in HARD_MARKS else "break"
        elif it.kind == "newline":
            it.role = "break"


@dataclass
class _Clause:
    members: list[int] = field(default_factory=list)  # item indices
    before: str = ""  # separator that opened it ("" at the start, "and", ",", "|", "BREAK", ...)
    after: str = ""
    scope: str = "local"  # "local" | "global" (style / artist / "in the style of" clauses)


def _clauses(items: list[Item]) -> list[_Clause]:
    out = [_Clause()]
    sep_words: list[str] = []
    for i, it in enumerate(items):
        if it.role in ("sep", "break"):
            sep_words.append(it.text.lower() if it.role == "sep" else "|")
            continue
        if sep_words:
            sep = " ".join(sep_words)
            if out[-1].members:
                out[-1].after = sep
                out.append(_Clause(before=sep))
            else:
                out[-1].before = (out[-1].before + " " + sep).strip()
            artist = sep_words[-1] == "by" and (len(sep_words) == 1 or sep_words[-2] != "surrounded")
            if artist and not (it.kind == "word" and it.norm in ARTICLES):
                out[-1].scope = "global"  # "art by greg rutkowski"; "a house by the lake" stays local
            sep_words = []
        out[-1].members.append(i)
    return [c for c in out if c.members]


def _content(items: list[Item], clause: _Clause) -> list[int]:
    if clause.scope == "global":
        return []
    words = [i for i in clause.members if items[i].kind in ("word", "embedding")]
    if any(items[i].norm == "style" for i in words):  # "in the style of ...", "anime style"
        return []
    content = []
    for pos, i in enumerate(words):
        it = items[i]
        if it.role in ("stop", "style"):
            continue
        nxt = items[words[pos + 1]].norm if pos + 1 < len(words) else ""
        if it.norm in FRAMING_WORDS and nxt == "of":  # "a photo of", "a portrait of"
            continue
        content.append(i)
    styled = any(items[i].role == "style" for i in words)
    if content and styled and all(items[i].norm in ATTRIBUTE_WORDS for i in content):
        return []  # "golden light", "soft dramatic lighting": attributes of a style word describe the whole picture
    return content


ARTICLES = {"a", "an", "the"}


def _first_word(items: list[Item], clause: _Clause) -> str:
    return next((items[i].norm for i in clause.members if items[i].kind in ("word", "embedding")), "")


def _soft(sep: str) -> bool:
    return bool(sep) and all(part in SOFT_SEPARATORS for part in sep.split())


def group_prompt(text: str) -> Grouping:
    """Split a prompt into entity groups (see the module docstring); words in no group stay visible everywhere."""
    items = prompt_items(text)
    _tag_roles(items)
    clauses = _clauses(items)
    contents = [_content(items, c) for c in clauses]
    # Attribute-only clauses join their neighbour: "a black and white cat", "a big, fluffy dog", "a dog, brown".
    for ci, members in enumerate(contents):
        if not members or not all(items[i].norm in ATTRIBUTE_WORDS for i in members):
            continue
        if len(members) >= 2 and _first_word(items, clauses[ci]) in ARTICLES:
            continue  # "a blue square", "a small square": an article + 2 words is an entity whose noun doubles as
            # an attribute word, not a dangling attribute
        # forward unless the next clause opens a new entity with an article ("a dog, brown, and a cat")
        opens_entity = ci + 1 < len(clauses) and _first_word(items, clauses[ci + 1]) in ARTICLES
        if ci + 1 < len(clauses) and _soft(clauses[ci].after) and contents[ci + 1] and not opens_entity:
            contents[ci + 1] = members + contents[ci + 1]
            contents[ci] = []
        elif ci > 0 and _soft(clauses[ci].before) and contents[ci - 1]:
            contents[ci - 1] = contents[ci - 1] + members
            contents[ci] = []
        else:
            contents[ci] = []  # a lone attribute ("red") describes the whole picture
    groups: list[list[int]] = []
    seen: dict[tuple, int] = {}
    for members in contents:
        if not members:
            continue
        key = tuple(sorted(items[i].norm for i in members))
        if key in seen:  # the same entity twice ("a cat, a cat"): one group, not two that compete
            groups[seen[key]] = sorted(groups[seen[key]] + members)
            continue
        seen[key] = len(groups)
        groups.append(sorted(members))
    return Grouping(items, groups)


def grouping_from_text(text: str, groups_text: str) -> Grouping:
    """A user-written grouping: groups separated by "|" or new lines, words by spaces, "#" starts a comment.

    Every word must be a word of the prompt. A word that occurs more than once is matched to the occurrence
    nearest the group's other words (the group's rarest word is placed first), so "red vase | red book" works
    for "a red book and a red vase".
    """
    items = prompt_items(text)
    _tag_roles(items)
    occurrences: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it.kind in ("word", "embedding"):
            occurrences.setdefault(it.norm, []).append(i)
    used: set[int] = set()
    groups: list[list[int]] = []
    for line in groups_text.splitlines():
        line = line.split("#", 1)[0]
        for part in line.split("|"):
            words = [it.norm for it in prompt_items(part) if it.kind in ("word", "embedding")]
            if not words:
                if part.strip() and not set(part.strip()) <= set(",;."):
                    raise GroupingError(f"group {part.strip()!r} has no words")
                continue
            for w in words:
                if w not in occurrences:
                    raise GroupingError(f"{w!r} is not a word of the prompt")
            order = sorted(range(len(words)), key=lambda j: len([o for o in occurrences[words[j]] if o not in used]))
            placed: list[int] = []
            for j in order:
                free = [o for o in occurrences[words[j]] if o not in used]
                if not free:
                    raise GroupingError(f"{words[j]!r} occurs {len(occurrences[words[j]])} time(s) in the prompt; the "
                                        f"groups use it more often")
                if placed:
                    centre = sum(placed) / len(placed)
                    pick = min(free, key=lambda o: (abs(o - centre), o))
                else:
                    pick = free[0]
                placed.append(pick)
                used.add(pick)
            groups.append(sorted(placed))
    return Grouping(items, groups)


# --- 3. words -> token positions (the tokenization is read as pieces in masks/tokens.py) ------------------------------
def item_pieces(items: list[Item]) -> list[tuple[str, int]]:
    """(piece, item index) for the prompt side of the alignment."""
    out = []
    for i, it in enumerate(items):
        if it.kind == "newline":
            continue
        out.extend((p, i) for p in pretokens(it.text))
    return out


def item_positions(items: list[Item], chunks, vocab: dict[int, str]) -> dict[int, list[int]]:
    """item index -> token positions in one encoder's tokenization, by aligning text pieces.

    Alignment (not ComfyUI's word ids) because hosts number words differently: the 2024 host gives every
    space-separated word an id, newer ones one id per weighted segment. Pieces that do not line up (an embedding
    loaded as vectors, a character the tokenizer cleans away) are matched only when one prompt item owns the
    whole mismatching run; anything else stays unmapped, i.e. visible everywhere.
    """
    mine = item_pieces(items)
    theirs = host_pieces(chunks, vocab)
    matcher = difflib.SequenceMatcher(None, [p for p, _ in mine], [p for p, _ in theirs], autojunk=False)
    out: dict[int, list[int]] = {}
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            for a, b in zip(range(i1, i2), range(j1, j2)):
                out.setdefault(mine[a][1], []).extend(theirs[b][1])
        elif op == "replace":
            owners = {mine[a][1] for a in range(i1, i2)}
            if len(owners) == 1:
                owner = owners.pop()
                for b in range(j1, j2):
                    out.setdefault(owner, []).extend(theirs[b][1])
    return {k: sorted(v) for k, v in out.items()}


def token_group_map(grouping: Grouping, tokens: dict, vocab: dict[int, str]) -> tuple[list[int], dict]:
    """Per token position of the conditioning, the group index there (-1: no group, visible everywhere).

    `tokens`: what ComfyUI's `clip.tokenize(text, return_word_ids=True)` returns: {encoder: [[(token, weight,
    word_id), ...] per 77-token chunk]}; SDXL has "g" and "l", whose token axes are concatenated feature-wise, so
    a position gets a group only where both encoders agree. Also returns {encoder: {item: positions}}.
    """
    if not isinstance(tokens, dict) or not tokens:
        raise ValueError("tokens: expected {encoder: [chunk, ...]} from clip.tokenize")
    maps, per_encoder = [], {}
    for name, chunks in tokens.items():
        length = sum(len(chunk) for chunk in chunks)
        positions = item_positions(grouping.items, chunks, vocab)
        per_encoder[name] = positions
        m = [-1] * length
        for item, where in positions.items():
            g = grouping.items[item].group
            if g >= 0:
                for p in where:
                    m[p] = g
        maps.append(m)
    length = min(len(m) for m in maps)
    merged = [maps[0][p] if all(m[p] == maps[0][p] for m in maps) else -1 for p in range(length)]
    return merged, per_encoder


# --- 4. the gate source -----------------------------------------------------------------------------------------------
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
                 word_tokens: list[tuple[str, int, list[int]]] | None = None):
        if stage not in STAGE_CHOICES:
            raise ValueError(f"stage must be one of {STAGE_CHOICES}, got {stage!r}")
        for name, value, choices in (("partition", partition, PARTITIONS), ("end_tokens", end_tokens, END_TOKENS),
                                     ("self_attention", self_attention, SELF_ATTENTION)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        self.partition = partition
        self.end_tokens = end_tokens
        self.self_attention = self_attention
        self.masks_self_attention = self_attention == "separate_groups"
        # The run's regions and each word's leakage are bookkeeping over every gated layer and step, kept only while
        # something reads them: the aggregate partition, self-attention separation, or a consumer that sets
        # track_regions (the Zero-Shot Masks node, the gate recorder behind the viewer).
        self.track_regions = False
        self.ran_without_regions = False  # a run went by untracked: a consumer added later has nothing to read
        self.node_id: str | None = None  # the Zero-Shot Gates node that built these (set by the node)
        self.observe_before_start = True  # (off only for a benchmark ablation)
        self.state = PartitionState(memory)
        kinds = list(token_kinds or [])
        self.end_positions = [p for p, kind in enumerate(kinds[:len(token_groups)]) if kind == "end"]
        # (word, group, token positions) of every grouped word, for the leakage report
        self.word_tokens = list(word_tokens or [])
        self.grouping = grouping
        self.token_groups = list(token_groups)
        self.groups = sorted({g for g in self.token_groups if g >= 0})
        self.stage = stage
        self.start_percent = float(start_percent)
        self.encoders = frozenset(encoders)
        self.threshold = threshold
        self.negative_value = negative_value
        self.source = f"zero-shot gates [{grouping.describe() or 'no groups'}]"
        # stages per architecture checked (these gates are shared by every model they are applied to)
        self._site_stages: dict[str, dict[SiteKey, str]] = {}
        self._checked: str | None = None
        self._maps: dict[tuple, tuple[Tensor, Tensor]] = {}
        # Called once with a message when sampling finds nothing to gate (set by the node: log + canvas).
        self.notice = None
        self._noticed: set[str] = set()
        self._last_sigma: float | None = None

    @property
    def keeps_a_token_per_row(self) -> bool:
        """A token in no group that is never hidden (the start token) has P = 1 at every location, so no location
        ever keeps nothing and the runtime may skip the empty-row rule (a no-op then)."""
        end = set(self.end_positions) if self.end_tokens == "hide_in_regions" else ()
        return any(g < 0 and p not in end for p, g in enumerate(self.token_groups))

    @property
    def keeps_aggregate(self) -> bool:
        """Whether sampling keeps the run's aggregate (see track_regions)."""
        return self.partition == "aggregate" or self.masks_self_attention or self.track_regions

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

    def _new_run_check(self, info: dict) -> None:
        """Forget what was said when the schedule starts again (a new sampling run): these gates are cached by ComfyUI
        and reused across runs, and each run deserves its notice. Only on the notice path (reading sigma syncs)."""
        sigmas = (info or {}).get("sigmas")
        sigma = float(sigmas.reshape(-1)[0]) if sigmas is not None else None
        if sigma is not None and self._last_sigma is not None and sigma > self._last_sigma:
            self._noticed.clear()
        self._last_sigma = sigma

    def _say_once(self, what: str, message: str) -> None:
        if what in self._noticed:
            return
        self._noticed.add(what)
        if self.notice is not None:
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

    def _cond_rows(self, batch: int, info: dict, device) -> Tensor | None | list:
        """Row indices of this prompt ([] when none; None when every row is it): masks.rows.prompt_rows."""
        return prompt_rows(info, batch, device)

    @staticmethod
    def _repeated_copies(k: Tensor, length: int) -> Tensor | None:
        return repeated_copies(k, length)

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
        rows = self._cond_rows(b, info, q.device)
        if isinstance(rows, list) and not rows:  # an uncond-only call: nothing of ours to gate
            return torch.ones(b, n, t, device=q.device, dtype=torch.float32)
        maps = self._group_tensors(t, q.device)
        if maps is None:
            self._new_run_check(info)
            self._say_once("not found", (
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
        if not self.active or not self.keeps_aggregate:
            return
        b, t = q.shape[0], k.shape[1]
        rows = self._cond_rows(b, info, q.device)
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
        ours = self._repeated_copies(kc, len(self.token_groups))  # [b, T] bool, or None: every token is ours
        if ours is not None:
            attention = attention * ours[:, None, :]
        aggregate = None
        if self.keeps_aggregate:
            self.state.clock(info)
            h, w = latent_hw(n, info)
            aggregate = self.state.add(group_density(attention, onehot), h, w, (bc, len(self.groups)))
        if not self.track_regions:
            self.ran_without_regions = True
        if self.partition == "aggregate":
            density = aggregate
            share = density / density.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        else:  # v1, bit for bit
            mass = attention @ onehot  # [b, N, G]
            density = mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-30)
            share = density / density.sum(dim=-1, keepdim=True).clamp_min(1e-30)
            density = density * n  # (mean 1 over the grid, for the regions)
        hides_end = self.end_tokens == "hide_in_regions" and bool(self.end_positions)
        region = regions(density) if hides_end or (self.track_regions and density is aggregate) else None
        if self.track_regions:  # leakage against the regions the masks show (the aggregate's), whichever partition
            self.state.add_leakage(attention, region if density is aggregate else regions(aggregate), column, grouped,
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
        rows = self._cond_rows(b, info, q.device)
        if isinstance(rows, list) and not rows:
            return None
        bc = b if rows is None else rows.shape[0]
        h, w = latent_hw(n, info)
        density = self.state.at(h, w, (bc, len(self.groups)))
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
        aggregate = self.state.combined()
        if aggregate is None:
            return None
        return image_masks(aggregate, height, width, level=0.0 if cover_background else REGION_LEVEL)

    def leakage(self) -> list[tuple[str, str, float]]:
        """(word, its group, share of its attention inside its group's region) for every grouped word, over the
        last run's gated (and observed) layers, steps and images; empty when no run was seen."""
        if self.state.inside is None:
            return []
        length = len(self.token_groups)
        inside = self.state.inside.reshape(-1, length).sum(0).tolist()
        total = self.state.total.reshape(-1, length).sum(0).tolist()
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
        if g >= 2:
            lines.append(f"# {g} groups, gated at stage {self.stage} from {self.start_percent:.0%} of the schedule "
                         f"(training-free zero-shot gates, not learned MaskAttn gates)")
            lines.append(f"# partition: {self.partition}; end tokens: {self.end_tokens}; self-attention: "
                         f"{self.self_attention}")
        else:
            lines.append(f"# {g} group{'s' if g != 1 else ''} with tokens: nothing to separate, the model runs "
                         f"unchanged")
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
                          end_tokens: str = DEFAULT_END_TOKENS,
                          self_attention: str = DEFAULT_SELF_ATTENTION) -> ZeroShotGates:
    """Prompt text + ComfyUI tokenization (+ an optional user grouping) -> ZeroShotGates."""
    written = any(line.split("#", 1)[0].strip() for line in (groups_text or "").splitlines())
    grouping = grouping_from_text(text, groups_text) if written else group_prompt(text)
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
                         token_kinds=token_kinds(tokens, vocab), word_tokens=word_tokens)
