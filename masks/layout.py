"""A layout prior from the prompt's spatial words: "a red cube to the left of a blue sphere" -> where each group goes.

The prompt's entity groups (masks/prompt.py) are read together with the spatial phrases between them:

- relations between groups: left of / right of, above / over / on top of, below / under / beneath / underneath,
  beside / next to (horizontal, in the order written), "A between B and C" (B, A, C from left to right);
- places of one group: on the left / right, at the top / bottom, in the middle, in a corner ("in the bottom right
  corner").

Each axis is solved on its own: the relations on it order the groups (a group's rank is the length of the longest
chain of groups before it), the ranks split the axis into equal bands, and a place names its band directly. A group
with nothing said about an axis spans all of it. Depth ("behind", "in front of") says nothing about the image
plane, and a contradiction (A left of B and B left of A) gives no prior at all; `Layout.notes` says why.

`layout_prior` draws the bands on a grid as soft masks: a band's inner edges are logistic ramps whose width is a
fixed share of the grid's shorter side, so the feather is the same in pixels along both axes whatever the aspect
ratio, and edges on the image border stay open. Pure torch, no ComfyUI import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .prompt import Grouping
from .spatial import FRAME_WORDS, PLACE_PHRASES, POSSESSIVES, RELATION_PHRASES

# The feather: the logistic ramp's scale, as a share of the grid's shorter side (10% to 90% over about 4.4 scales).
DEFAULT_FEATHER = 0.03
FULL = (0.0, 1.0)
AXES = ("x", "y")


@dataclass
class Layout:
    """Where each group goes: per group index, an (x band, y band) pair of fractions of the image (0 = left / top),
    FULL where nothing was said; `notes` explains what gave no prior."""

    labels: list[str]
    bands: dict[int, tuple[tuple[float, float], tuple[float, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """Whether any group has a place narrower than the whole image."""
        return any(band != (FULL, FULL) for band in self.bands.values())

    def band_of(self, group: int) -> tuple[tuple[float, float], tuple[float, float]]:
        return self.bands.get(group, (FULL, FULL))

    def summary_lines(self, groups: list[int] | None = None) -> list[str]:
        """One line per group ("red cube: left half"; `groups`: these only), then the notes; empty when nothing was
        found or said."""
        if not self.active:
            return list(self.notes)
        shown = range(len(self.labels)) if groups is None else groups
        return [f"{self.labels[g]}: {describe_band(*self.band_of(g))}" for g in shown] + list(self.notes)

    def summary(self) -> str:
        return "\n".join(self.summary_lines())


def describe_band(x: tuple[float, float], y: tuple[float, float]) -> str:
    """A band pair in words: "left half", "top-right quarter", "middle third", "anywhere"."""
    horizontal, vertical = _axis_words(x, ("left", "centre", "right")), _axis_words(y, ("top", "middle", "bottom"))
    if horizontal and vertical:
        (hw, hs), (vw, vs) = horizontal, vertical
        if (hw, vw) == ("centre", "middle"):
            return "the middle"
        if hs == vs == "half" and hw != "centre" and vw != "middle":
            return f"{vw}-{hw} quarter"
        return f"{vw} {vs}, {hw} {hs}"
    if horizontal or vertical:
        word, size = horizontal or vertical
        return f"{word} {size}"
    return "anywhere"


def _axis_words(band: tuple[float, float], names: tuple[str, str, str]) -> tuple[str, str] | None:
    lo, hi = band
    if (lo, hi) == FULL:
        return None
    width = hi - lo
    parts = round(1 / width) if width > 0 else 0
    centre = (lo + hi) / 2
    if parts in (2, 3) or abs(parts * width - 1) > 1e-6:
        size = {2: "half", 3: "third"}.get(parts, f"{width:.0%}")
        return (names[0] if centre < 0.45 else names[2] if centre > 0.55 else names[1]), size
    nth = round(lo * parts) + 1
    ordinal = {1: "1st", 2: "2nd", 3: "3rd"}.get(nth, f"{nth}th")
    return ordinal, f"of {parts} from the {names[0]}"


# --- the prompt's spatial words -> constraints ------------------------------------------------------------------------
@dataclass
class _Phrase:
    start: int  # item index of its first word
    end: int  # one past its last word
    words: str  # normalised
    meaning: str  # a RELATION_PHRASES or PLACE_PHRASES value


def _phrases(grouping: Grouping) -> list[_Phrase]:
    """The spatial phrases of the prompt, in order (longest match at each word). A place of something else ("at the
    top of the stairs") is left out; a place or relation of the picture itself ("on the left of the image") reads as
    the place it names."""
    items = grouping.items
    words = [(i, it.norm) for i, it in enumerate(items) if it.kind == "word"]
    table = {**{tuple(p.split()): m for p, m in RELATION_PHRASES.items()},
             **{tuple(p.split()): m for p, m in PLACE_PHRASES.items()}}
    longest = max(len(p) for p in table)
    out, k = [], 0
    while k < len(words):
        for n in range(min(longest, len(words) - k), 0, -1):
            key = tuple(w for _, w in words[k:k + n])
            contiguous = words[k + n - 1][0] - words[k][0] == n - 1  # no mark between the words
            if key in table and contiguous and all(items[i].role == "sep" for i, _ in words[k:k + n]):
                phrase = _Phrase(words[k][0], words[k + n - 1][0] + 1, " ".join(key), table[key])
                k += n
                after = [w for _, w in words[k:k + 3]]
                tail = after[1:] if after[:1] == ["of"] else after if key[-1] == "of" else []
                of_frame = any(w in FRAME_WORDS for w in tail[:2])
                if of_frame and phrase.meaning in FRAME_PLACES:
                    phrase.meaning = FRAME_PLACES[phrase.meaning]
                elif phrase.meaning.startswith("place:") and after[:1] == ["of"]:
                    break  # "at the top of the stairs": a place in something else
                out.append(phrase)
                break
        else:
            k += 1
    return out


# A relation to the picture itself is a place: "a cat to the left of the image".
FRAME_PLACES = {"left of": "place:left", "right of": "place:right", "above": "place:top", "below": "place:bottom",
                **{f"place:{p}": f"place:{p}" for p in ("left", "right", "top", "bottom", "middle")}}


def _neighbour(grouping: Grouping, start: int, step: int, stop: str = "break") -> tuple[int, bool, int]:
    """The nearest group from item `start` in direction `step` (-1, +1): (group or -1, whether a content word in no
    group was passed, the group's item). It stops at a hard break; `stop` "words" also at a separator word ("and",
    "with"), "any" at any separator, word or mark."""
    items, i, loose = grouping.items, start, False
    while 0 <= i < len(items):
        it = items[i]
        if it.role == "break":
            break
        if it.group >= 0:
            return it.group, loose, i
        if it.kind in ("word", "embedding") and it.role == "":
            loose = True
        if it.role == "sep" and (stop == "any" or (stop == "words" and it.kind == "word")):
            break
        i += step
    return -1, loose, -1


def _placed_group(grouping: Grouping, phrase: _Phrase) -> int:
    """The group a place phrase places: the object right after it ("on the left a red cube"), else right before it
    ("a red cube on the left"), else across a comma, after then before ("on the left, a red cube")."""
    for start, step, stop in ((phrase.end, 1, "any"), (phrase.start - 1, -1, "any"),
                              (phrase.end, 1, "words"), (phrase.start - 1, -1, "words")):
        group = _neighbour(grouping, start, step, stop)[0]
        if group >= 0:
            return group
    return -1


def parse_layout(grouping: Grouping) -> Layout:
    """The layout the prompt's words give its groups (see the module docstring)."""
    labels = [" ".join(words) for words in grouping.group_words()]
    layout = Layout(labels)
    order: dict[str, list[tuple[int, int]]] = {"x": [], "y": []}  # (before, after) pairs per axis
    places: dict[int, dict[str, tuple[float, float]]] = {}
    previous: tuple[int, int] | None = None  # (subject, the item after its last object) of the last relation
    for phrase in _phrases(grouping):
        if phrase.meaning in ("behind", "in front of"):
            layout.notes.append(f"'{phrase.words}' is about depth, not the image plane: no layout from it")
            continue
        if phrase.meaning.startswith("place:"):
            group = _placed_group(grouping, phrase)
            if group < 0:
                layout.notes.append(f"'{phrase.words}' names no object of the prompt: no layout from it")
                continue
            for axis, band in zip(AXES, PLACES[phrase.meaning]):
                if band == FULL:
                    continue
                if places.get(group, {}).get(axis, band) != band:
                    layout.notes.append(f"'{labels[group]}' is given two places: no layout prior")
                    layout.bands = {}
                    return layout
                places.setdefault(group, {})[axis] = band
            continue
        sides = _sides(grouping, phrase, 3 if phrase.meaning == "between" else 2, previous)
        if isinstance(sides, str):
            layout.notes.append(sides)
            continue
        (subject, *objects), end = sides
        previous = (subject, end)
        axis, pairs = RELATIONS[phrase.meaning]([subject, *objects])
        order[axis].extend(pairs)
    return _solve(layout, order, places)


def _solve(layout: Layout, order: dict, places: dict) -> Layout:
    """Bands per axis from the relations' order and the places (see the module docstring)."""
    labels = layout.labels
    groups = range(len(labels))
    bands = {g: {"x": FULL, "y": FULL} for g in groups}
    for axis in AXES:
        ranks = _ranks(order[axis], len(labels))
        if ranks is None:
            names = sorted({labels[g] for pair in order[axis] for g in pair})
            layout.notes.append(f"the relations contradict each other ({', '.join(names)}): no layout prior")
            layout.bands = {}
            return layout
        levels = max(ranks.values(), default=-1) + 1
        for g, r in ranks.items():
            bands[g][axis] = (r / levels, (r + 1) / levels)
        for g, where in places.items():
            if axis in where:
                bands[g][axis] = where[axis]
        for a, b in order[axis]:  # a place must not undo a relation
            if sum(bands[a][axis]) >= sum(bands[b][axis]):
                layout.notes.append(f"'{labels[a]}' and '{labels[b]}': the places and relations contradict each "
                                    f"other: no layout prior")
                layout.bands = {}
                return layout
    layout.bands = {g: (bands[g]["x"], bands[g]["y"]) for g in groups}
    return layout


def _sides(grouping: Grouping, phrase: _Phrase, count: int,
           previous: tuple[int, int] | None) -> tuple[list[int], int] | str:
    """([the group before, the group(s) after] a relation, the item after its last object), or why they cannot be
    told. A relation that follows the last one's object across "and" or a comma shares its subject ("a cat left of a
    dog and right of a bird")."""
    items = grouping.items
    before, loose_before, _ = _neighbour(grouping, phrase.start - 1, -1)
    between = items[previous[1]:phrase.start] if previous is not None else []
    if any(it.norm in ("and", ",") for it in between) and all(it.role in ("sep", "stop") for it in between):
        before = previous[0]
    after, loose_after, i = [], False, phrase.end
    while len(after) < count - 1:
        g, loose, at = _neighbour(grouping, i, 1)
        loose_after |= loose
        if g < 0:
            break
        if any(items[j].norm in POSSESSIVES for j in range(i, at)):
            return f"'{phrase.words}' places a part of something ('{items[at].text}'): no layout from it"
        after.append(g)
        i = at
        while i < len(items) and items[i].group == g:
            i += 1
    if before >= 0 and len(after) == count - 1 and before not in after and len(set(after)) == len(after):
        return [before] + after, i
    if loose_before or loose_after:
        return (f"'{phrase.words}' relates a word that is in no group: no layout from it (add the word to a group "
                f"in 'groups')")
    return f"'{phrase.words}': cannot tell which objects it relates: no layout from it"


def _ranks(pairs: list[tuple[int, int]], groups: int) -> dict[int, int] | None:
    """Longest-chain rank of each group that takes part in `pairs` (a before b); None when they form a cycle."""
    involved = {g for pair in pairs for g in pair}
    rank = {g: 0 for g in involved}
    for _ in range(groups + 1):
        changed = False
        for a, b in pairs:
            if rank[b] < rank[a] + 1:
                rank[b] = rank[a] + 1
                changed = True
        if not changed:
            return rank
    return None


RELATIONS = {  # meaning -> (sides) -> (axis, [(before, after)])
    "left of": lambda s: ("x", [(s[0], s[1])]),
    "right of": lambda s: ("x", [(s[1], s[0])]),
    "above": lambda s: ("y", [(s[0], s[1])]),
    "below": lambda s: ("y", [(s[1], s[0])]),
    "beside": lambda s: ("x", [(s[0], s[1])]),
    "between": lambda s: ("x", [(s[1], s[0]), (s[0], s[2])]),
}
_CENTRE = (1 / 4, 3 / 4)
PLACES = {  # place -> (x band, y band)
    "place:left": ((0.0, 0.5), FULL), "place:right": ((0.5, 1.0), FULL),
    "place:top": (FULL, (0.0, 0.5)), "place:bottom": (FULL, (0.5, 1.0)),
    "place:middle": (_CENTRE, _CENTRE),
    "place:top left": ((0.0, 0.5), (0.0, 0.5)), "place:top right": ((0.5, 1.0), (0.0, 0.5)),
    "place:bottom left": ((0.0, 0.5), (0.5, 1.0)), "place:bottom right": ((0.5, 1.0), (0.5, 1.0)),
}


# --- the prior on a grid ----------------------------------------------------------------------------------------------
def _profile(band: tuple[float, float], cells: int, scale: float) -> Tensor:
    """[cells] soft band: logistic ramps at inner edges (in cell units), open at the image border."""
    lo, hi = band
    centre = torch.arange(cells, dtype=torch.float64) + 0.5
    out = torch.ones(cells, dtype=torch.float64)
    if lo > 0.0:
        out = out * torch.sigmoid((centre - lo * cells) / scale)
    if hi < 1.0:
        out = out * torch.sigmoid((hi * cells - centre) / scale)
    return out


def layout_prior(layout: Layout, groups: list[int], height: int, width: int,
                 feather: float = DEFAULT_FEATHER) -> Tensor:
    """[len(groups), height, width] float32 in (0, 1]: each listed group's soft place on a height x width grid (1
    inside its band, feathered at inner edges; all ones for a group with no place)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"layout_prior: the grid must not be empty, got {height}x{width}")
    scale = max(feather * min(height, width), 1e-3)
    maps = []
    for g in groups:
        x, y = layout.band_of(g)
        maps.append(_profile(y, height, scale)[:, None] * _profile(x, width, scale)[None, :])
    return torch.stack(maps).float() if maps else torch.zeros(0, height, width)
