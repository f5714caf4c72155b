"""Procedural worlds: small RGB images with a caption and the structured description behind it.

Two worlds share the palette, shapes and renderer. The *pairs* world (the benchmark's first, kept as it was) shows
two objects in one of four relations; the *trio* world (`Trio`, `sample_trio`) shows three objects of three colours
packed close together and named without any relation ("a red circle and a blue square and a green diamond"), so
what a model can get wrong is mostly which colour goes with which shape (attribute leakage), not the layout.

Every image shows two objects (a colour and a shape each) on a plain grey background, in one of four relations.
The caption has a fixed grammar::

    "a red circle to the left of a blue square"     # (("red", "circle"), "left of", ("blue", "square"))

Everything is deterministic by seed (``numpy.random.Generator``). Objects are drawn on a 4x supersampled canvas and
box-downsampled, so edges are anti-aliased like a natural image. The two objects always differ in colour (so each
colour names one object) and never overlap; the separation along the relation's axis always dominates the offset
across it, so the four relations are mutually exclusive.

    from benchmarks.compbench import world
    s = world.sample(seed=3)                 # s.image (64, 64, 3) uint8, s.caption, s.triple, s.boxes
    train, heldout = world.split_combos()    # disjoint lists of Triples; held-out objects never seen in train
    t = world.sample_trio(seed=3)            # t.triple is a Trio; t.boxes has "a", "b", "c"
    train3, heldout3 = world.split_trios()   # the same held-out pairings
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Well-separated colours against a mid-grey background: a blend of any colour with the background stays nearer to
# that colour (or the background) than to any other palette colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUND: tuple[int, int, int] = (128, 128, 128)

# relation -> caption phrase, converse relation, unit vector (x right, y down) from the first object to the second
PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
DIRECTION = {"left of": (1, 0), "right of": (-1, 0), "above": (0, 1), "below": (0, -1)}
# Other ways to say each relation, for the phrasings world (prompts the models never saw worded so): "beside" and
# "next to" read left to right, in the order written.
OTHER_PHRASES = {"left of": ("on the left of", "left of", "beside", "next to"), "right of": ("on the right of",
                 "right of"), "above": ("on top of", "over"), "below": ("under", "beneath", "underneath")}

SUPERSAMPLE = 4


@dataclass(frozen=True)
class Triple:
    """(colour, shape) of the first object, the relation, (colour, shape) of the second: "A <relation> B"."""

    colour_a: str
    shape_a: str
    relation: str
    colour_b: str
    shape_b: str
    phrase: str = ""  # how the caption words the relation ("" = PHRASES[relation]; else one of OTHER_PHRASES)

    @property
    def a(self) -> tuple[str, str]:
        return (self.colour_a, self.shape_a)

    @property
    def b(self) -> tuple[str, str]:
        return (self.colour_b, self.shape_b)

    def caption(self) -> str:
        return caption(self)

    def converse(self) -> "Triple":
        """The same scene described from the other object: "B <converse relation> A"."""
        return Triple(self.colour_b, self.shape_b, CONVERSE[self.relation], self.colour_a, self.shape_a)

    def as_tuple(self) -> tuple:
        return (self.a, self.relation, self.b)


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    triple: Triple
    boxes: dict  # "a" / "b" -> (x0, y0, x1, y1) in pixels, float; only the drawn objects
    seed: int


@dataclass(frozen=True)
class _ThreeObjects:
    """Three (colour, shape) objects of three different colours, in caption order."""

    objects: tuple  # ((colour, shape), (colour, shape), (colour, shape))

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.objects)

    @property
    def shapes(self) -> tuple[str, ...]:
        return tuple(s for _, s in self.objects)

    def caption(self) -> str:
        return caption(self)


@dataclass(frozen=True)
class Trio(_ThreeObjects):
    """Three objects named in this order, in no particular layout."""


@dataclass(frozen=True)
class Between(_ThreeObjects):
    """"A between B and C": three objects in a row, B left, A in the middle, C right; `objects` in caption order
    (A, B, C)."""


def caption(triple: "Triple | Trio | Between") -> str:
    """The fixed grammar: "a|an <colour> <shape> <phrase> a|an <colour> <shape>" (pairs), or
    "a|an <colour> <shape> and a|an <colour> <shape> and a|an <colour> <shape>" (a Trio)."""
    if isinstance(triple, Trio):
        return " and ".join(f"{article(c)} {c} {s}" for c, s in triple.objects)
    if isinstance(triple, Between):
        a, b, c = (f"{article(c)} {c} {s}" for c, s in triple.objects)
        return f"{a} between {b} and {c}"
    t = triple
    first = f"{article(t.colour_a)} {t.colour_a} {t.shape_a}"
    second = f"{article(t.colour_b)} {t.colour_b} {t.shape_b}"
    return f"{first} {t.phrase or PHRASES[t.relation]} {second}"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse_caption(text: str) -> "Triple | Trio | Between":
    """Inverse of `caption` (raises ValueError on anything outside the grammar)."""
    words = text.strip().lower().split()
    if "between" in words:
        head, _, rest = " ".join(words).partition(" between ")
        objects = [part.split() for part in [head, *rest.split(" and ")]]
        if len(objects) != 3 or any(len(w) != 3 or w[0] not in ("a", "an") or w[1] not in COLOURS
                                    or w[2] not in SHAPES for w in objects):
            raise ValueError(f"not a caption of this world: {text!r}")
        if len({w[1] for w in objects}) != 3:
            raise ValueError(f"not a caption of this world: {text!r}")
        return Between(tuple((w[1], w[2]) for w in objects))
    if "and" in words:
        parts = " ".join(words).split(" and ")
        objects = []
        for part in parts:
            w = part.split()
            if len(w) != 3 or w[0] not in ("a", "an") or w[1] not in COLOURS or w[2] not in SHAPES:
                raise ValueError(f"not a caption of this world: {text!r}")
            objects.append((w[1], w[2]))
        if len(objects) != 3 or len({c for c, _ in objects}) != 3:
            raise ValueError(f"not a caption of this world: {text!r}")
        return Trio(tuple(objects))
    if len(words) < 7 or words[0] not in ("a", "an"):
        raise ValueError(f"not a caption of this world: {text!r}")
    colour_a, shape_a = words[1], words[2]
    colour_b, shape_b = words[-2], words[-1]
    if words[-3] not in ("a", "an"):
        raise ValueError(f"not a caption of this world: {text!r}")
    phrase = " ".join(words[3:-3])
    relation = {v: k for k, v in PHRASES.items()}.get(phrase)
    other = next((r for r, ways in OTHER_PHRASES.items() if phrase in ways), None)
    if relation is None and other is not None:
        if colour_a in COLOURS and colour_b in COLOURS and shape_a in SHAPES and shape_b in SHAPES:
            return Triple(colour_a, shape_a, other, colour_b, shape_b, phrase)
    if relation is None or colour_a not in COLOURS or colour_b not in COLOURS:
        raise ValueError(f"not a caption of this world: {text!r}")
    if shape_a not in SHAPES or shape_b not in SHAPES:
        raise ValueError(f"not a caption of this world: {text!r}")
    return Triple(colour_a, shape_a, relation, colour_b, shape_b)


# ---------------------------------------------------------------------------------------------------------------------
# combinations and the train / held-out split


def all_combos(colours=None, shapes=None, relations=None) -> list[Triple]:
    """Every triple with two different colours, in a fixed order (shapes may repeat)."""
    colours = list(colours or COLOURS)
    shapes = list(shapes or SHAPES)
    relations = list(relations or RELATIONS)
    objects = [(c, s) for c in colours for s in shapes]
    out = []
    for (ca, sa), (cb, sb) in itertools.product(objects, objects):
        if ca == cb:
            continue
        for r in relations:
            out.append(Triple(ca, sa, r, cb, sb))
    return out


def heldout_pairings(seed: int = 0, per_colour: int = 1, colours=None, shapes=None) -> list[tuple[str, str]]:
    """The (colour, shape) pairings held out of training: `per_colour` shapes for each colour, spread so every shape
    is held out for some colour and still seen in training with the others (a Latin-square-like rotation)."""
    colours = list(colours or COLOURS)
    shapes = list(shapes or SHAPES)
    if not 0 <= per_colour < len(shapes):
        raise ValueError("per_colour must leave at least one shape per colour in training")
    rng = np.random.default_rng(seed)
    shape_order = [shapes[i] for i in rng.permutation(len(shapes))]
    colour_order = [colours[i] for i in rng.permutation(len(colours))]
    held = []
    for i, c in enumerate(colour_order):
        for k in range(per_colour):
            held.append((c, shape_order[(i + k) % len(shapes)]))
    return sorted(held)


def split_combos(seed: int = 0, per_colour: int = 1, mode: str = "pairing", heldout_fraction: float = 0.2,
                 colours=None, shapes=None, relations=None) -> tuple[list[Triple], list[Triple]]:
    """Deterministic (train, held-out) split of `all_combos`, disjoint and together complete.

    mode "pairing" (default): a triple is held out when either object is a held-out (colour, shape) pairing
    (`heldout_pairings`), so held-out images show objects never seen in training at all, built from colours and
    shapes that training does see. mode "triple": a random `heldout_fraction` of the triples (each triple unseen,
    its objects seen).
    """
    combos = all_combos(colours, shapes, relations)
    if mode == "pairing":
        held = set(heldout_pairings(seed, per_colour, colours, shapes))
        heldout = [t for t in combos if t.a in held or t.b in held]
        train = [t for t in combos if not (t.a in held or t.b in held)]
    elif mode == "triple":
        rng = np.random.default_rng(seed)
        n_held = int(round(heldout_fraction * len(combos)))
        pick = set(rng.permutation(len(combos))[:n_held].tolist())
        heldout = [t for i, t in enumerate(combos) if i in pick]
        train = [t for i, t in enumerate(combos) if i not in pick]
    else:
        raise ValueError(f"unknown split mode {mode!r}")
    return train, heldout


def all_trios(colours=None, shapes=None) -> list[Trio]:
    """Every Trio (three different colours, in order; shapes may repeat), in a fixed order: 6*5*4 * 4^3 = 7,680."""
    colours = list(colours or COLOURS)
    shapes = list(shapes or SHAPES)
    out = []
    for cs in itertools.permutations(colours, 3):
        for ss in itertools.product(shapes, repeat=3):
            out.append(Trio(tuple(zip(cs, ss))))
    return out


def split_trios(seed: int = 0, per_colour: int = 1) -> tuple[list[Trio], list[Trio]]:
    """(train, held-out) Trios: held out when any object is a held-out pairing (`heldout_pairings`, the same ones
    as `split_combos`), so one model can be trained on both worlds without ever seeing those pairings."""
    held = set(heldout_pairings(seed, per_colour))
    trios = all_trios()
    heldout = [t for t in trios if any(o in held for o in t.objects)]
    train = [t for t in trios if not any(o in held for o in t.objects)]
    return train, heldout


def random_triple(rng: np.random.Generator, combos: list[Triple] | None = None) -> Triple:
    """One triple drawn uniformly, from `combos` if given, else from every combination."""
    if combos is not None:
        return combos[int(rng.integers(len(combos)))]
    colours, shapes = list(COLOURS), list(SHAPES)
    ia, ib = rng.choice(len(colours), size=2, replace=False)
    return Triple(colours[ia], shapes[int(rng.integers(len(shapes)))], RELATIONS[int(rng.integers(len(RELATIONS)))],
                  colours[ib], shapes[int(rng.integers(len(shapes)))])


# ---------------------------------------------------------------------------------------------------------------------
# rendering


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill) -> None:
    k = SUPERSAMPLE
    cx, cy, h = cx * k, cy * k, size * k / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        # a square of the same visual weight as the circle: slightly smaller than its bounding box
        q = h * 0.9
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif shape == "triangle":  # apex up
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def layout(triple: Triple, rng: np.random.Generator, size: int = 64) -> dict:
    """Centres and sizes of both objects (pixels) for `triple`, with jitter; the relation's axis dominates."""
    scale = size / 64.0
    s_a = rng.uniform(13.0, 19.0) * scale
    s_b = rng.uniform(13.0, 19.0) * scale
    gap = rng.uniform(4.0, 12.0) * scale
    along = (s_a + s_b) / 2 + gap
    across = rng.uniform(-0.3, 0.3) * along
    ux, uy = DIRECTION[triple.relation]
    dx, dy = ux * along + uy * across, uy * along + ux * across  # B - A
    margin = 2.0 * scale
    # place A so that both objects fit inside the canvas
    lo_x = max(margin + s_a / 2, margin + s_b / 2 - dx)
    hi_x = min(size - margin - s_a / 2, size - margin - s_b / 2 - dx)
    lo_y = max(margin + s_a / 2, margin + s_b / 2 - dy)
    hi_y = min(size - margin - s_a / 2, size - margin - s_b / 2 - dy)
    ax = rng.uniform(lo_x, hi_x) if hi_x > lo_x else (lo_x + hi_x) / 2
    ay = rng.uniform(lo_y, hi_y) if hi_y > lo_y else (lo_y + hi_y) / 2
    return {"a": (ax, ay, s_a), "b": (ax + dx, ay + dy, s_b)}


def _jitter_colour(rgb, rng: np.random.Generator, amount: float):
    if amount <= 0:
        return tuple(int(v) for v in rgb)
    j = rng.uniform(-amount, amount, size=3)
    return tuple(int(np.clip(round(v + d), 0, 255)) for v, d in zip(rgb, j))


def render(triple: Triple, rng: np.random.Generator, size: int = 64, colour_jitter: float = 8.0,
           draw_a: bool = True, draw_b: bool = True) -> tuple[np.ndarray, dict]:
    """The image of `triple` (uint8 (size, size, 3)) and the drawn objects' boxes. `draw_a` / `draw_b` False leave
    that object out (the judge's "missing object" check); the layout is drawn from `rng` either way."""
    lay = layout(triple, rng, size)
    col_a = _jitter_colour(COLOURS[triple.colour_a], rng, colour_jitter)
    col_b = _jitter_colour(COLOURS[triple.colour_b], rng, colour_jitter)
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (size * k, size * k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    boxes = {}
    for key, shape, col, on in (("a", triple.shape_a, col_a, draw_a), ("b", triple.shape_b, col_b, draw_b)):
        if not on:
            continue
        cx, cy, s = lay[key]
        _draw_shape(draw, shape, cx, cy, s, col)
        boxes[key] = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
    image = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8).copy(), boxes


def _seed_for(seed: int, salt: str) -> int:
    digest = hashlib.blake2b(f"compbench:{salt}:{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample(seed: int, triple: Triple | None = None, combos: list[Triple] | None = None, size: int = 64,
           colour_jitter: float = 8.0, omit: str | None = None) -> Sample:
    """One image + caption, deterministic by `seed`. The triple is `triple` if given, else drawn from `combos`
    (or from every combination) with the same seed; the layout (sizes, positions, colour jitter) depends on the seed
    only. `omit` "a" or "b" leaves that object out of the image (the caption still names both)."""
    rng = np.random.default_rng(_seed_for(seed, "sample"))
    drawn = random_triple(rng, combos)  # always drawn, so the layout depends on the seed alone
    triple = drawn if triple is None else triple
    image, boxes = render(triple, rng, size=size, colour_jitter=colour_jitter,
                          draw_a=(omit != "a"), draw_b=(omit != "b"))
    return Sample(image=image, caption=caption(triple), triple=triple, boxes=boxes, seed=int(seed))


def trio_layout(rng: np.random.Generator, size: int = 64, tries: int = 200) -> list[tuple[float, float, float]]:
    """Centres and sizes (pixels) of three objects packed close together: sizes 12-16 px (at 64 px), every pair at
    least 2 px apart (box to box) so colours never touch, each object within 2-6 px of one already placed."""
    scale = size / 64.0
    margin, gap_min, gap_max = 2.0 * scale, 2.0 * scale, 6.0 * scale
    sizes = rng.uniform(12.0, 16.0, size=3) * scale

    def separation(p, q):  # box-to-box distance (Chebyshev), negative when overlapping
        return max(abs(p[0] - q[0]), abs(p[1] - q[1])) - (p[2] + q[2]) / 2

    for _ in range(tries):
        s0 = sizes[0]
        placed = [(rng.uniform(margin + s0 / 2, size - margin - s0 / 2),
                   rng.uniform(margin + s0 / 2, size - margin - s0 / 2), s0)]
        for k in (1, 2):
            anchor = placed[int(rng.integers(len(placed)))]
            angle = rng.uniform(0, 2 * np.pi)
            gap = rng.uniform(gap_min, gap_max)
            ux, uy = np.cos(angle), np.sin(angle)
            reach = (anchor[2] + sizes[k]) / 2 + gap  # along the dominant axis, so box separation = gap
            d = reach / max(abs(ux), abs(uy))
            cand = (anchor[0] + ux * d, anchor[1] + uy * d, sizes[k])
            inside = all(margin + cand[2] / 2 <= v <= size - margin - cand[2] / 2 for v in cand[:2])
            if not inside or any(separation(cand, p) < gap_min - 1e-6 for p in placed):
                break
            placed.append(cand)
        if len(placed) == 3:
            return placed
    raise RuntimeError("trio_layout: no layout found")  # not reached for sizes >= 24 px


def sample_trio(seed: int, trio: Trio | None = None, combos: list[Trio] | None = None, size: int = 64,
                colour_jitter: float = 8.0, omit: str | None = None) -> Sample:
    """One three-object image + caption, deterministic by `seed` (the layout depends on the seed alone). The Trio
    is `trio` if given, else drawn from `combos` (or from every Trio). `omit` "a", "b" or "c" leaves that one out.
    `Sample.triple` holds the Trio; `Sample.boxes` "a", "b", "c" in caption order."""
    rng = np.random.default_rng(_seed_for(seed, "trio"))
    if combos is not None:
        drawn = combos[int(rng.integers(len(combos)))]
    else:
        cs = rng.choice(len(COLOURS), size=3, replace=False)
        drawn = Trio(tuple((list(COLOURS)[int(c)], SHAPES[int(rng.integers(len(SHAPES)))]) for c in cs))
    trio = drawn if trio is None else trio
    lay = trio_layout(rng, size)
    cols = [_jitter_colour(COLOURS[c], rng, colour_jitter) for c in trio.colours]
    image, boxes = _draw_three(lay, trio.shapes, cols, size, omit)
    return Sample(image=image, caption=caption(trio), triple=trio, boxes=boxes, seed=int(seed))


def _draw_three(lay, shapes, cols, size: int, omit: str | None) -> tuple[np.ndarray, dict]:
    """Three objects (centre x, centre y, size) drawn supersampled and box-downsampled; boxes "a", "b", "c" of those
    drawn (`omit` leaves one out)."""
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (size * k, size * k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    boxes = {}
    for key, (cx, cy, s), shape, col in zip("abc", lay, shapes, cols):
        if omit == key:
            continue
        _draw_shape(draw, shape, cx, cy, s, col)
        boxes[key] = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.uint8).copy(), boxes


def between_layout(rng: np.random.Generator, size: int = 64) -> list[tuple[float, float, float]]:
    """Centres and sizes (pixels) of B, A, C in a row from left to right (sizes 11-15 px at 64 px, gaps 3-7 px, a
    small vertical jitter), returned in caption order (A, B, C)."""
    scale = size / 64.0
    sizes = rng.uniform(11.0, 15.0, size=3) * scale
    gaps = rng.uniform(3.0, 7.0, size=2) * scale
    row = [sizes[1], sizes[0], sizes[2]]  # B, A, C from left to right
    width = sum(row) + gaps.sum()
    x = rng.uniform(2.0 * scale, size - 2.0 * scale - width)
    cy = rng.uniform(size * 0.3, size * 0.7)
    centres = []
    for k, s in enumerate(row):
        centres.append((x + s / 2, cy + rng.uniform(-2.0, 2.0) * scale, s))
        x += s + (gaps[k] if k < 2 else 0.0)
    b, a, c = centres
    return [a, b, c]


def sample_between(seed: int, between: Between, size: int = 64, colour_jitter: float = 8.0,
                   omit: str | None = None) -> Sample:
    """One "A between B and C" image, deterministic by `seed`; `boxes` "a", "b", "c" in caption order."""
    rng = np.random.default_rng(_seed_for(seed, "between"))
    lay = between_layout(rng, size)
    cols = [_jitter_colour(COLOURS[c], rng, colour_jitter) for c in between.colours]
    image, boxes = _draw_three(lay, between.shapes, cols, size, omit)
    return Sample(image=image, caption=caption(between), triple=between, boxes=boxes, seed=int(seed))


def dataset(n: int, seed: int = 0, combos: list[Triple] | None = None, size: int = 64,
            colour_jitter: float = 8.0) -> list[Sample]:
    """`n` samples; sample i uses seed (seed * 1_000_003 + i), so prefixes of a dataset agree across n."""
    return [sample(seed * 1_000_003 + i, combos=combos, size=size, colour_jitter=colour_jitter) for i in range(n)]


def degrade(image: np.ndarray, rng: np.random.Generator, blur: float = 0.8, noise: float = 10.0,
            shift: float = 8.0) -> np.ndarray:
    """What a small generative model might produce instead: Gaussian blur (radius `blur` px), a per-image colour
    shift (uniform +-`shift` per channel) and per-pixel Gaussian noise (std `noise`, 0-255 scale)."""
    out = Image.fromarray(image)
    if blur > 0:
        from PIL import ImageFilter

        out = out.filter(ImageFilter.GaussianBlur(radius=blur))
    arr = np.asarray(out, dtype=np.float32)
    if shift > 0:
        arr = arr + rng.uniform(-shift, shift, size=(1, 1, 3)).astype(np.float32)
    if noise > 0:
        arr = arr + rng.normal(0.0, noise, size=arr.shape).astype(np.float32)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
