"""Measure the judge's own accuracy on ground-truth images: it must accept true captions and reject wrong ones.

    python -m benchmarks.compbench.judge_accuracy                 # N = 2000 per condition (about 30 s each)
    python benchmarks/compbench/judge_accuracy.py --n 300 --conditions clean mild

For each of N ground-truth images (world.sample(seed), uniform over all colour-shape-relation combinations) the judge
scores:
- true: the image's own caption (must accept); true_converse: the same scene described from the other object
  ("B right of A" for "A left of B"; must accept);
- swap_colours: the two colours exchanged; swap_shapes: the two shapes exchanged (only images whose two shapes
  differ); wrong_colour: one object's colour replaced by a colour absent from the image; wrong_shape: one object's
  shape replaced by another; flip_relation: the opposite relation; missing_object: the same scene re-drawn with only
  one of the two objects, scored against the full caption (all must be rejected).
Conditions: clean images, "mild" (Gaussian blur 0.8 px, noise std 10, colour shift +-8: what a small generative model
might produce) and "strong" (blur 1.2 px, noise 16, shift 12: a stress test). Rates come with 95% Wilson intervals.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks.compbench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.compbench import judge, world  # noqa: E402
else:
    from . import judge, world

CONDITIONS = {
    "clean": None,
    "mild": {"blur": 0.8, "noise": 10.0, "shift": 8.0},
    "strong": {"blur": 1.2, "noise": 16.0, "shift": 12.0},
}
TRUE_KINDS = ("true", "true_converse")
WRONG_KINDS = ("swap_colours", "swap_shapes", "wrong_colour", "wrong_shape", "flip_relation", "missing_object")
FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def wrong_triples(t: world.Triple, rng: np.random.Generator) -> dict[str, world.Triple]:
    """Wrong descriptions of the scene `t` (each differs from what the image shows)."""
    out = {"swap_colours": world.Triple(t.colour_b, t.shape_a, t.relation, t.colour_a, t.shape_b)}
    if t.shape_a != t.shape_b:
        out["swap_shapes"] = world.Triple(t.colour_a, t.shape_b, t.relation, t.colour_b, t.shape_a)
    absent = [c for c in world.COLOURS if c not in (t.colour_a, t.colour_b)]
    new_colour = absent[int(rng.integers(len(absent)))]
    if rng.integers(2):
        out["wrong_colour"] = world.Triple(new_colour, t.shape_a, t.relation, t.colour_b, t.shape_b)
    else:
        out["wrong_colour"] = world.Triple(t.colour_a, t.shape_a, t.relation, new_colour, t.shape_b)
    if rng.integers(2):
        others = [s for s in world.SHAPES if s != t.shape_a]
        out["wrong_shape"] = world.Triple(t.colour_a, others[int(rng.integers(len(others)))], t.relation,
                                          t.colour_b, t.shape_b)
    else:
        others = [s for s in world.SHAPES if s != t.shape_b]
        out["wrong_shape"] = world.Triple(t.colour_a, t.shape_a, t.relation, t.colour_b,
                                          others[int(rng.integers(len(others)))])
    out["flip_relation"] = world.Triple(t.colour_a, t.shape_a, FLIP[t.relation], t.colour_b, t.shape_b)
    return out


def missing_object_image(s: world.Sample, drop: str) -> np.ndarray:
    """The scene of `s` re-drawn (same layout and colours) without object `drop` ("a" or "b")."""
    return world.sample(s.seed, triple=s.triple, size=s.image.shape[0], omit=drop).image


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def measure(n: int = 2000, seed: int = 0, conditions=("clean", "mild", "strong"), cfg=judge.DEFAULT,
            size: int = 64) -> dict:
    """{condition: {kind: [ok, total]}}; ok = accepted for true kinds, rejected for wrong kinds."""
    results = {}
    for cond in conditions:
        params = CONDITIONS[cond]
        counts = {k: [0, 0] for k in TRUE_KINDS + WRONG_KINDS}
        for i in range(n):
            s = world.sample(seed * 1_000_003 + i, size=size)
            rng = np.random.default_rng(world._seed_for(s.seed, "judge-accuracy:" + cond))

            def look(img):
                return img if params is None else world.degrade(img, rng, **params)

            image = look(s.image)
            objects = judge.detect(image, cfg)
            t = s.triple
            for kind, target in (("true", t), ("true_converse", t.converse())):
                counts[kind][0] += judge.score(image, target, cfg, objects=objects).correct
                counts[kind][1] += 1
            for kind, target in wrong_triples(t, rng).items():
                counts[kind][0] += not judge.score(image, target, cfg, objects=objects).correct
                counts[kind][1] += 1
            drop = "a" if i % 2 == 0 else "b"
            lone = look(missing_object_image(s, drop))
            counts["missing_object"][0] += not judge.score(lone, t, cfg).correct
            counts["missing_object"][1] += 1
        results[cond] = counts
    return results


def table(results: dict) -> str:
    kinds = TRUE_KINDS + WRONG_KINDS
    lines = ["| condition | " + " | ".join(kinds) + " | all true | all wrong |",
             "|---" * (len(kinds) + 3) + "|"]
    for cond, counts in results.items():
        cells = []
        for k in kinds:
            ok, tot = counts[k]
            cells.append(f"{100 * ok / tot:.1f}" if tot else "-")
        for group in (TRUE_KINDS, WRONG_KINDS):
            ok = sum(counts[k][0] for k in group)
            tot = sum(counts[k][1] for k in group)
            lo, hi = wilson(ok, tot)
            cells.append(f"{100 * ok / tot:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]")
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))
    totals = [str(first[k][1]) for k in kinds]
    totals += [str(sum(first[k][1] for k in g)) for g in (TRUE_KINDS, WRONG_KINDS)]
    lines.append("| cases per condition | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="ground-truth images per condition (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (the tiny model draws 32)")
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = measure(args.n, args.seed, args.conditions, size=args.size)
    dt = time.perf_counter() - t0
    print(f"judge accuracy, % (true kinds: accepted; wrong kinds: rejected); N = {args.n} images per condition, "
          f"seed {args.seed}, {args.size} px; [95% Wilson interval]")
    print(table(results))
    print(f"\n{dt:.1f} s on {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
