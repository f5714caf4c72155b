"""The prompt as text: emphasis syntax, entity groups, and the words' token positions. Pure Python + torch.

1. items: the prompt as words, embeddings and marks, ComfyUI's weighting syntax `(word:1.2)`, `((word))`, escaped
   `\\(` read the way ComfyUI's tokenizer reads it (`weighted_segments`, `prompt_items`);
2. entity groups: an object with its attributes ("a red book and a yellow vase" -> {red, book}, {yellow, vase}),
   split at commas, "and", "with", spatial phrases ("next to", "on the left of", ...), BREAK and "|"; style and
   quality words ("masterpiece", "photo of", "by <artist>") belong to no group (`group_prompt`). The grouping is
   shown to the user in a small text format ("red book | yellow vase") that can be edited and fed back
   (`grouping_from_text`);
3. token positions: the words aligned with the tokens ComfyUI's own tokenizer produced (both SDXL encoders, prompts
   over 77 tokens: chunk c occupies positions 77c .. 77c+76) (`token_group_map`).

Used by the prompt-built gate sources (masks/zeroshot.py, masks/region.py) and the layout prior (masks/layout.py).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from .spatial import PLACE_PHRASES, RELATION_PHRASES
from .tokens import host_pieces, pretokens


class GroupingError(ValueError):
    """A user-written grouping does not fit the prompt (a word that is not in it, an empty group)."""


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

_PLACES = {tuple(p.split()) for p in PLACE_PHRASES}

# Multi-word relations first (longest match wins). Single words after.
SEPARATOR_PHRASES = sorted({tuple(p.split()) for p in (*RELATION_PHRASES, *PLACE_PHRASES)} | {
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
}, key=lambda p: (-len(p), p))

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
                if phrase in _PLACES and _describes_next(items, words[k + len(phrase) - 1][0]):
                    continue  # "in the left hand", "the top shelf": a side word as an adjective, not a place
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


def _describes_next(items: list[Item], last: int) -> bool:
    """Whether the word after item `last` follows it directly and names a thing ("left" in "the left hand")."""
    nxt = items[last + 1] if last + 1 < len(items) else None
    if nxt is None or nxt.kind != "word":
        return False
    return nxt.norm not in STOPWORDS and not any(p[0] == nxt.norm for p in SEPARATOR_PHRASES)


def grouping_for(text: str, groups_text: str = "") -> Grouping:
    """The prompt's groups: the user's own (`groups_text`, when it has any words outside comments) or automatic."""
    written = any(line.split("#", 1)[0].strip() for line in (groups_text or "").splitlines())
    return grouping_from_text(text, groups_text) if written else group_prompt(text)


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
