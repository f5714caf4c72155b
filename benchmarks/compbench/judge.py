"""Programmatic judge for the CompBench world: does an image show what a caption says?

Pipeline (numpy only):

1. Colour segmentation. The background colour is estimated from the image border (median). Each pixel gets the
   nearest palette colour (world.COLOURS) if that colour is nearer than the background, within `max_dist` (RGB,
   0-255) and clearly nearer than the runner-up palette colour (`ambiguity` ratio); otherwise it is background /
   ambiguous. Anti-aliased or blurred edges between an object and the background are thus split at about the
   half-way blend, and the thin fringes that could look like a third colour are dropped.
2. Objects. 8-connected components of each colour's mask; a component counts as an object when it has at least
   `min_area` pixels and survives a 3x3 erosion with at least `min_core` pixels (fringes and noise specks do not).
3. Shape. Blur-aware template fit. Each pixel's soft coverage by the object's colour (its position on the line from
   the background colour to the palette colour, 0..1) is taken in a window around the component; for each shape a
   template (4x supersampled coverage) of the same mass and centroid is blurred by each of a few Gaussian widths
   (0 to 1.4 px) and compared by mean squared error; the best shape wins, or "unknown" when even the best fit is
   poor (`max_fit_error`: elongated blobs, rings, crosses). Blur preserves mass and centroid, so a blurred diamond
   still matches a blurred diamond better than a blurred circle. (`soft=False`: binary template IoU, no blur model;
   it loses diamonds to circles under strong blur.)
4. Position. Centroids. "A left of B" holds when B's centroid is to the right of A's by at least `min_sep` pixels
   and the horizontal offset exceeds the vertical one (likewise for the other relations), so the four relations are
   mutually exclusive.

Score per image and caption (or world.Triple): `presence` (an object of each named colour), `binding` (each named
colour's object has the named shape; per colour the largest object is taken), `relation` (the relation holds between
those two objects). `correct` is all three.

    from benchmarks.compbench import judge, world
    s = world.sample(0)
    judge.score(s.image, s.caption).correct      # True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from . import world


@dataclass
class Detection:
    colour: str
    shape: str
    area: int
    centroid: tuple[float, float]  # (x, y) pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive
    features: dict = field(default_factory=dict)


@dataclass
class Score:
    presence: bool
    binding: bool
    relation: bool
    objects: list  # all Detections found
    matched: dict  # "a" / "b" -> Detection or None

    @property
    def correct(self) -> bool:
        return self.presence and self.binding and self.relation


@dataclass
class JudgeConfig:
    max_dist: float = 95.0  # a pixel further than this from every palette colour is background / ambiguous
    ambiguity: float = 0.85  # nearest palette colour must be < ambiguity * runner-up palette distance
    min_area: int = 20  # pixels (at 64x64; scaled by image area)
    min_core: int = 4  # pixels left after a 3x3 erosion (scaled likewise)
    min_sep: float = 2.0  # pixels along the relation's axis (scaled by image side)
    soft: bool = True  # shape by the blur-aware soft template fit (else the binary template IoU)
    max_fit_error: float = 0.05  # soft fit: best mean squared error above this: "unknown" (ground truth <= 0.03)
    denoise: int = 0  # median filter size applied before segmentation (0 or 1: none; 3 measured worse)


DEFAULT = JudgeConfig()

_PALETTE_NAMES = list(world.COLOURS)
_PALETTE = np.array([world.COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)


def estimate_background(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]], axis=0)
    return np.median(border, axis=0)


def segment(image: np.ndarray, cfg: JudgeConfig = DEFAULT) -> np.ndarray:
    """(H, W) int array: index into world.COLOURS' order, or -1 for background / ambiguous."""
    img = np.asarray(image)[..., :3]
    if cfg.denoise and cfg.denoise > 1:
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.MedianFilter(cfg.denoise)))
    img = img.astype(np.float32)
    bg = estimate_background(img)
    d = np.linalg.norm(img[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, K)
    d_bg = np.linalg.norm(img - bg, axis=-1)
    order = np.argsort(d, axis=-1)
    nearest = order[..., 0]
    d1 = np.take_along_axis(d, order[..., :1], axis=-1)[..., 0]
    d2 = np.take_along_axis(d, order[..., 1:2], axis=-1)[..., 0]
    ok = (d1 < d_bg) & (d1 < cfg.max_dist) & (d1 < cfg.ambiguity * d2)
    return np.where(ok, nearest, -1)


def coverage(image: np.ndarray) -> np.ndarray:
    """(K, H, W): per palette colour, each pixel's position on the line from the background to that colour (0 at the
    background, 1 at the colour), clipped to 0..1: the soft coverage of the pixel by an object of that colour."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    bg = estimate_background(img)
    v = _PALETTE - bg  # (K, 3)
    a = np.einsum("hwc,kc->khw", img - bg, v) / (v * v).sum(axis=1)[:, None, None]
    return np.clip(a, 0.0, 1.0)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for s in _shift_stack(mask):
        out |= s
    return out


def _shift_stack(mask: np.ndarray) -> list[np.ndarray]:
    """The 8 neighbours of every pixel (False outside the image)."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    return [p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for s in _shift_stack(mask):
        out &= s
    return out


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as boolean masks (label propagation, numpy only)."""
    h, w = mask.shape
    if not mask.any():
        return []
    labels = np.where(mask, np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w), 0)
    while True:
        p = np.pad(labels, 1)
        new = labels.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    np.maximum(new, p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], out=new)
        new = np.where(mask, new, 0)
        if np.array_equal(new, labels):
            break
        labels = new
    return [labels == v for v in np.unique(labels[labels > 0])]


_SUB = 4  # supersampling of the shape templates, per pixel side


def _template(shape: str, cx: float, cy: float, area: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Coverage (0..1) of pixels at (xs, ys) (their top-left corners) by `shape` of the given area and centroid."""
    off = (np.arange(_SUB) + 0.5) / _SUB
    px = xs[..., None, None] + off[None, None, :]  # (N, 1, SUB)
    py = ys[..., None, None] + off[None, :, None]  # (N, SUB, 1)
    dx, dy = px - cx, py - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= area / np.pi
    elif shape == "square":
        h = np.sqrt(area) / 2
        inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "diamond":
        h = np.sqrt(area / 2)
        inside = np.abs(dx) + np.abs(dy) <= h
    elif shape == "triangle":  # apex up; base = height = s; the centroid sits s/3 above the base
        s = np.sqrt(2 * area)
        t = dy + 2 * s / 3  # 0 at the apex, s at the base
        inside = (t >= 0) & (t <= s) & (np.abs(dx) <= t / 2)
    else:
        raise ValueError(shape)
    return inside.mean(axis=(-1, -2))


def shape_features(comp: np.ndarray) -> dict:
    """Per shape, the IoU of the component with that shape's template of the same area and centroid, plus the
    component's bounding box."""
    ys, xs = np.nonzero(comp)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    n = len(xs)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    r = int(np.ceil(np.sqrt(2 * n))) + 2
    h, w = comp.shape
    gx0, gx1, gy0, gy1 = max(0, int(cx) - r), min(w, int(cx) + r + 1), max(0, int(cy) - r), min(h, int(cy) + r + 1)
    gy, gx = np.mgrid[gy0:gy1, gx0:gx1]
    window = comp[gy0:gy1, gx0:gx1].astype(np.float32)
    out = {}
    for shape in world.SHAPES:
        cover = _template(shape, cx, cy, float(n), gx.astype(np.float32), gy.astype(np.float32))
        inter = np.minimum(cover, window).sum()
        union = np.maximum(cover, window).sum()
        out[shape] = float(inter / max(union, 1e-6))
    out["bbox"] = (int(x0), int(y0), int(x1), int(y1))
    return out


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    idx = np.arange(n, dtype=np.float32)
    if sigma <= 0:
        return np.eye(n, dtype=np.float32)
    g = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def soft_shape_fit(alpha: np.ndarray, sigmas=(0.0, 0.6, 1.0, 1.4)) -> dict:
    """Per shape, the least mean squared error between the soft coverage map `alpha` (window, 0..1) and that shape's
    template of the same mass and centroid, blurred by the best of `sigmas` (pixels): blur-aware template fit."""
    h, w = alpha.shape
    mass = float(alpha.sum())
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = float((alpha * (gx + 0.5)).sum() / mass)
    cy = float((alpha * (gy + 0.5)).sum() / mass)
    mats = [(_blur_matrix(h, s), _blur_matrix(w, s)) for s in sigmas]
    out = {}
    for shape in world.SHAPES:
        cover = _template(shape, cx, cy, mass, gx, gy)
        out[shape] = min(float(np.mean((my @ cover @ mx.T - alpha) ** 2)) for my, mx in mats)
    return out


def classify_shape(f: dict, cfg: "JudgeConfig" = None) -> str:
    """The shape whose template fits best."""
    return max(world.SHAPES, key=lambda s: f[s])


def detect(image: np.ndarray, cfg: JudgeConfig = DEFAULT) -> list[Detection]:
    """Every object in the image, largest first."""
    seg = segment(image, cfg)
    h, w = seg.shape
    alpha = coverage(image) if cfg.soft else None
    area_scale = (h * w) / (64.0 * 64.0)
    out = []
    for k in np.unique(seg[seg >= 0]):
        mask = seg == k
        core = erode(mask)
        for comp in components(mask):
            n = int(comp.sum())
            if n < cfg.min_area * area_scale or int((core & comp).sum()) < cfg.min_core * area_scale:
                continue
            f = shape_features(comp)
            if cfg.soft:
                region = comp.copy()
                for _ in range(3):
                    region = region | _dilate(region)
                region &= (seg == k) | (seg < 0)
                a = alpha[int(k)] * region
                ys0, xs0 = np.nonzero(region)
                win = a[ys0.min():ys0.max() + 1, xs0.min():xs0.max() + 1]
                fit = soft_shape_fit(win)
                f.update({"sse_" + s: v for s, v in fit.items()})
            ys, xs = np.nonzero(comp)
            if cfg.soft:
                shape = min(world.SHAPES, key=lambda s: f["sse_" + s])
                if f["sse_" + shape] > cfg.max_fit_error:
                    shape = "unknown"
            else:
                shape = classify_shape(f, cfg)
            out.append(Detection(colour=_PALETTE_NAMES[int(k)], shape=shape, area=n,
                                 centroid=(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5), bbox=f.pop("bbox"),
                                 features=f))
    out.sort(key=lambda d: -d.area)
    return out


def relation_holds(a: Detection, b: Detection, relation: str, min_sep: float = 2.0) -> bool:
    """Does "a <relation> b" hold between the centroids?"""
    ux, uy = world.DIRECTION[relation]
    dx, dy = b.centroid[0] - a.centroid[0], b.centroid[1] - a.centroid[1]
    along = dx * ux + dy * uy
    across = abs(dx * uy + dy * ux)
    return along >= min_sep and along > across


def score(image: np.ndarray, target, cfg: JudgeConfig = DEFAULT, objects: list[Detection] | None = None) -> Score:
    """Score `image` against `target`: a caption string, a world.Triple (its two colours must differ) or a
    world.Trio (no relation: `relation` is True whenever all three colours are present)."""
    t = world.parse_caption(target) if isinstance(target, str) else target
    if isinstance(t, (world.Trio, world.Between)):
        return score_trio(image, t, cfg, objects)
    if t.colour_a == t.colour_b:
        raise ValueError("the judge names objects by colour: the two colours must differ")
    if objects is None:
        objects = detect(image, cfg)
    by_colour: dict[str, Detection] = {}
    for d in objects:  # largest first: keep the largest per colour
        by_colour.setdefault(d.colour, d)
    a, b = by_colour.get(t.colour_a), by_colour.get(t.colour_b)
    presence = a is not None and b is not None
    binding = presence and a.shape == t.shape_a and b.shape == t.shape_b
    side = np.asarray(image).shape[1]
    relation = presence and relation_holds(a, b, t.relation, cfg.min_sep * side / 64.0)
    return Score(presence=bool(presence), binding=bool(binding), relation=bool(relation), objects=objects,
                 matched={"a": a, "b": b})


def score_trio(image: np.ndarray, t: "world.Trio | world.Between", cfg: JudgeConfig = DEFAULT,
               objects: list[Detection] | None = None) -> Score:
    """Three objects: presence = an object of each named colour; binding = each colour's largest object has its
    shape; relation: for a Between, B left of A left of C (centroids), for a Trio whenever all are present;
    `matched` "a", "b", "c" in caption order."""
    if len(set(t.colours)) != len(t.colours):
        raise ValueError("the judge names objects by colour: the colours must differ")
    if objects is None:
        objects = detect(image, cfg)
    by_colour: dict[str, Detection] = {}
    for d in objects:
        by_colour.setdefault(d.colour, d)
    found = [by_colour.get(c) for c in t.colours]
    presence = all(d is not None for d in found)
    binding = presence and all(d.shape == s for d, s in zip(found, t.shapes))
    relation = presence
    if presence and isinstance(t, world.Between):  # B left of A left of C
        a, b, c = found
        sep = cfg.min_sep * np.asarray(image).shape[1] / 64.0
        relation = relation_holds(b, a, "left of", sep) and relation_holds(a, c, "left of", sep)
    return Score(presence=bool(presence), binding=bool(binding), relation=bool(relation), objects=objects,
                 matched=dict(zip("abc", found)))


def read_scene(image: np.ndarray, cfg: JudgeConfig = DEFAULT) -> world.Triple | None:
    """The triple the image shows, read back from its two largest objects (None unless exactly two colours are
    found among them and one relation holds): useful for diversity counts."""
    objects = detect(image, cfg)
    if len(objects) < 2 or objects[0].colour == objects[1].colour:
        return None
    a, b = objects[0], objects[1]
    if a.centroid[0] > b.centroid[0]:  # name the left-most object first, for one canonical form
        a, b = b, a
    side = np.asarray(image).shape[1]
    for r in world.RELATIONS:
        if relation_holds(a, b, r, cfg.min_sep * side / 64.0):
            return world.Triple(a.colour, a.shape, r, b.colour, b.shape)
    return None
