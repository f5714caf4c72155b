"""The CompBench experiment: gate sources side by side with their ceilings, per failure mode, at stages with authority.

    python -m benchmarks.compbench.experiment --quick                # the smoke run CI uses (about 1 min, 1 thread)
    python -m benchmarks.compbench.experiment                        # the full design: 400 prompts x 4 seeds, stages
                                                                     # high and all (the README's commands and sizes)

Every arm is sampled through ComfyUI's KSampler (`nodes.common_ksampler`, euler / normal, 20 steps, cfg 4) on the
tiny SDXL-architecture model (`tinyt2i.py`) with this pack's own nodes; an arm is one entry of `ARMS` (a class with
`model_for(ctx, prompt indices, seed)`), so a new gate source is one more entry, not a fork of the experiment:

- base: the model as trained;
- learned: "Train MaskAttn Gates" (the pack's trainer, model frozen) on captions of the *train* split, then Apply;
- zero-shot: "MaskAttn Zero-Shot Gates" (training-free), then Apply;
- region oracle: "MaskAttn Region Gates" fed each object's true box (the ground-truth layout drawn for that prompt
  and seed), its colour + shape words kept only there; end/padding tokens kept everywhere ("keep");
- region oracle, end hidden: the same with end/padding tokens hidden inside the boxes ("hide_in_regions");
- layout mask: Region Gates with half-image masks from the caption alone (A's words in the half the relation names);
- attention couple: one prompt per region ("a red circle", "a blue square") on the same boxes, cross-attention
  outputs blended by the masks (`couple.py`, a restatement of the public algorithm), at every cross-attention layer.

Gated arms run at each --stages entry; base and attention couple do not depend on the stage and are sampled once.
The tiny model draws 32 px pixel latents: stage high is its 16x16 map, mid and low are 8x8 (why high and all, not
mid: see the README). Evaluation prompts are held-out combinations (every one contains a colour-shape pairing never
seen in gate training), balanced over the four relations; each prompt is sampled with the same noise seeds in every
arm, so comparisons are paired. Metrics per failure mode (see `score_image`), 95% percentile bootstrap intervals over
prompts (a prompt's seeds stay together; ratios are ratios of sums, so "given both present" rates are weighted by
how often both are present), paired differences against base on the same resamples, and the share of the way from
base to the region oracle. Writes results.json, results.md, samples.png and spotcheck_base.png into --out (default
results/<model>/latest/, which git ignores; RESULTS.md says where a kept study goes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.compbench import judge, tinyt2i, world  # noqa: E402

HERE = Path(__file__).resolve().parent
# name -> (label, higher is better); each metric is a ratio of per-image (numerator, denominator) sums
METRICS = {
    "presence": ("all colours present", True),
    "binding_given_present": ("binding given all present", True),
    "colour_leak": ("colour leak", False),
    "shape": ("shape right (per object present)", True),
    "relation_given_present": ("relation given all present", True),
    "correct": ("all correct", True),
    "two_objects": ("only the named objects, readable", True),
}
HEADLINE = ("correct", "binding_given_present", "colour_leak", "relation_given_present")
CEILING = "region oracle"
QUICK = {"prompts": 8, "seeds": 2, "steps": 10, "gate_captions": 64, "gate_steps": 20, "gate_batch": 8,
         "stages": ["high"]}


def load_pack() -> dict:
    """The ComfyUI host (CPU, PyTorch attention) and this pack's NODE_CLASS_MAPPINGS."""
    import importlib

    tinyt2i.load_host()
    return importlib.import_module("comfyui_maskattn.nodes").NODE_CLASS_MAPPINGS


WORLDS = ("pairs", "trio", "phrasings")
PAIRINGS = ("unseen", "seen")


def evaluation_prompts(n: int, seed: int, scenes: str = "pairs", pairings: str = "unseen") -> list:
    """n prompts of the `scenes` world ("pairs": Triples balanced over the four relations; "trio": Trios;
    "phrasings": the pairs worded as the models never saw them, `world.OTHER_PHRASES`, and a quarter "A between B
    and C"), from the held-out split ("unseen": every prompt names at least one held-out colour-shape pairing) or
    the train split ("seen"), in a seeded order."""
    if scenes == "phrasings":
        return phrasing_prompts(n, seed, pairings)
    train, heldout = world.split_trios(seed=0) if scenes == "trio" else world.split_combos(seed=0)
    pool = heldout if pairings == "unseen" else train
    rng = np.random.default_rng(seed)
    if scenes == "trio":
        return sorted((pool[i] for i in rng.permutation(len(pool))[:n]), key=world.caption)
    by_relation = {r: [t for t in pool if t.relation == r] for r in world.PHRASES}
    picked = []
    for r, triples in by_relation.items():
        order = rng.permutation(len(triples))
        picked += [triples[i] for i in order[: (n + len(by_relation) - 1) // len(by_relation)]]
    return sorted(picked[:n], key=lambda t: (t.relation, world.caption(t)))


def phrasing_prompts(n: int, seed: int, pairings: str = "unseen") -> list:
    """The phrasings world: n // 4 "between" prompts from the trios' split, the rest pairs of the four relations
    with each other phrase of `world.OTHER_PHRASES` in turn, in a seeded order."""
    between = evaluation_prompts(n // 4, seed, "trio", pairings)
    pairs = evaluation_prompts(n - len(between), seed, "pairs", pairings)
    ways = {r: list(w) for r, w in world.OTHER_PHRASES.items()}
    seen: dict[str, int] = {}
    worded = []
    for t in pairs:
        k = seen[t.relation] = seen.get(t.relation, -1) + 1
        worded.append(dataclasses.replace(t, phrase=ways[t.relation][k % len(ways[t.relation])]))
    return sorted(worded, key=lambda t: (t.relation, t.phrase, world.caption(t))) + [
        world.Between(t.objects) for t in between]


def structure(t) -> str:
    """Prompts of one structure share token positions and what the caption says of the layout, so one gate set
    built from the first of them serves all (a layout read from "left of" would misplace "right of")."""
    if isinstance(t, (world.Trio, world.Between)):
        return type(t).__name__.lower()
    return f"{t.relation}: {t.phrase}" if t.phrase else t.relation


def structure_groups(triples) -> dict[str, list[int]]:
    """structure -> indices of the triples with it, in order (one batch shares token positions)."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(triples):
        groups.setdefault(structure(t), []).append(i)
    return groups


def objects_of(t) -> list[tuple[str, str]]:
    """(colour, shape) per named object, in caption order."""
    return list(t.objects) if isinstance(t, (world.Trio, world.Between)) else [t.a, t.b]


def scene(t, seed: int, size: int, omit: str | None = None) -> world.Sample:
    """The ground-truth scene of prompt `t` for a world seed (Triple or Trio)."""
    if isinstance(t, world.Trio):
        return world.sample_trio(seed, trio=t, size=size, omit=omit)
    if isinstance(t, world.Between):
        return world.sample_between(seed, t, size=size, omit=omit)
    return world.sample(seed, triple=t, size=size, omit=omit)


# --- the layouts the region arms are given --------------------------------------------------------------------------
def layout_seed(prompt: int, seed: int) -> int:
    """The world seed of the ground-truth scene for (prompt, noise seed): its boxes feed the oracle arms."""
    return 10_000 * prompt + seed


def box_mask(box, size: int) -> torch.Tensor:
    """[size, size] 0/1: pixels whose centre lies in the box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    c = torch.arange(size, dtype=torch.float32) + 0.5
    inside_x = (c >= x0) & (c <= x1)
    inside_y = (c >= y0) & (c <= y1)
    return (inside_y[:, None] & inside_x[None, :]).float()


def half_masks(relation: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A's half, B's half) for "A <relation> B": the layout a caption alone implies."""
    first = torch.zeros(size, size)
    half = size // 2
    if relation == "left of":
        first[:, :half] = 1
    elif relation == "right of":
        first[:, half:] = 1
    elif relation == "above":
        first[:half] = 1
    else:
        first[half:] = 1
    return first, 1.0 - first


def region_masks(ctx: "Context", idx: list[int], seed: int, kind: str) -> tuple[torch.Tensor, ...]:
    """Per-image masks of each named object ([len(idx), size, size] each, caption order): true boxes or the caption's
    layout: halves, or thirds for "A between B and C" (B, A, C from the left). A Trio names no layout."""
    per_object = []
    for i in idx:
        t = ctx.triples[i]
        if kind == "boxes":
            boxes = scene(t, layout_seed(i, seed), ctx.size).boxes
            per_object.append([box_mask(boxes[k], ctx.size) for k in "abc"[: len(objects_of(t))]])
        elif isinstance(t, world.Between):
            thirds = [torch.zeros(ctx.size, ctx.size) for _ in range(3)]
            edges = [round(k * ctx.size / 3) for k in range(4)]
            for mask, column in zip(thirds, (1, 0, 2)):  # A in the middle, B left, C right
                mask[:, edges[column]:edges[column + 1]] = 1
            per_object.append(thirds)
        else:
            per_object.append(list(half_masks(t.relation, ctx.size)))
    return tuple(torch.stack(masks) for masks in zip(*per_object))


# --- arms -----------------------------------------------------------------------------------------------------------
@dataclass
class Context:
    nodes: dict
    model: object
    clip: object
    triples: list
    seeds: list
    size: int
    args: argparse.Namespace
    stage: str = "all"
    info: dict = field(default_factory=dict)  # per-arm notes for the report
    cache: dict = field(default_factory=dict)  # work arms share (the distillation set)

    def apply(self, gates, start_percent: float = 0.0):
        (patched,) = self.nodes["MaskAttnApply"]().apply(self.model, gates, 0.5, 1.0, self.stage, "encoder_decoder",
                                                         start_percent, 1.0)
        return patched


class Arm:
    """One condition of the experiment. `model_for` returns the MODEL to sample prompts `idx` (one structure) with
    noise seed `seed`; `prepare` runs once per stage (e.g. gate training)."""

    name = ""
    staged = True  # gated at a stage (sampled once per --stages entry); False: sampled once
    gated = True  # has a gate runtime whose kept share is reported

    def prepare(self, ctx: Context) -> None:
        pass

    def supports(self, ctx: Context) -> bool:
        """False: this arm has no meaning for ctx's world (e.g. a caption layout for Trios); it is left out."""
        return True

    def model_for(self, ctx: Context, idx: list[int], seed: int):
        raise NotImplementedError


class BaseArm(Arm):
    name, staged, gated = "base", False, False

    def model_for(self, ctx, idx, seed):
        return ctx.model


class LearnedArm(Arm):
    """"Train MaskAttn Gates" (the node, model frozen) on --gate-captions images of the train split, then Apply.

    objective: a name of masks/objectives.OBJECTIVES (None: the trainer's default); init: logit bias of the fresh
    heads (None: the objective's own); lr: None for --gate-lr; masks: leading steps trained on per-object masks
    (each object's colour + shape words kept in its mask), -1 = every step, "half" = the first half, 0 = none;
    mask_source: "boxes", the train images' true boxes (world.sample(...).boxes), or "zero-shot v2", a distillation:
    the train captions are sampled with zero-shot gates v2 and the heads are trained on those images and the
    regions v2 found in them (the aggregate partition, `region_masks`), so no box is needed, or "zero-shot v2
    decision", the same images with every location given to the group that wins it in v2's aggregate (no
    background), so the target is v2's own decision: the winner's words kept, the other's closed; outside: the
    trainer's mask_outside ("keep": an object's words closed only inside the other's mask; "close", the arms'
    default, is what the earlier arms measured, where the trainer's own default is "keep"); seed: the heads' init,
    example order and noise of the training run; start: Apply MaskAttn's start_percent (0.2 gates from where
    zero-shot gates start: the first fifth of the schedule, where the layout forms, runs ungated); head: the trainer's
    gate head, "reference" (the paper's) or "context" (masks/context.py: also reads the run's attention aggregate)."""

    def __init__(self, name: str = "learned", objective: str | None = None, seed: int = 0, init: float | None = None,
                 lr: float | None = None, masks: int | str = 0, mask_source: str = "boxes", start: float = 0.0,
                 outside: str = "close", head: str = "reference"):
        self.name, self.objective, self.seed, self.init, self.lr, self.masks = name, objective, seed, init, lr, masks
        self.mask_source, self.start, self.outside, self.head = mask_source, start, outside, head

    def prepare(self, ctx):
        from comfyui_maskattn.masks.train import TRAIN_DEFAULTS

        a = ctx.args
        train_split, _ = world.split_combos(seed=0)
        data = world.dataset(a.gate_captions, seed=1000, combos=train_split, size=ctx.size)
        captions = [d.caption for d in data]
        distilled = self.masks and self.mask_source.startswith("zero-shot v2")
        if distilled:
            t0 = time.time()
            key = ("zero-shot v2 regions", ctx.stage, a.gate_captions, self.seed)
            cached = key in ctx.cache
            if not cached:
                ctx.cache[key] = zero_shot_v2_regions(ctx, [d.triple for d in data], seed=self.seed)
            samples, regions, partition, kept = ctx.cache[key]
            mask_a, mask_b = (partition if self.mask_source == "zero-shot v2 decision" else regions).unbind(1)
            ctx.info.setdefault(self.name, {}).update(distill_s=round(time.time() - t0, 1), distill_cached=cached,
                                                      distill_images=len(kept), distill_captions=len(data))
            data, captions = [data[i] for i in kept], [captions[i] for i in kept]
            latents = {"samples": samples}
        else:
            latents = {"samples": tinyt2i.encode_images(np.stack([d.image for d in data]))}
            mask_a = mask_b = None  # the true boxes, made below only when mask supervision is on
        cond = ctx.clip.conditioning(captions)
        objective = self.objective or TRAIN_DEFAULTS["objective"]
        mask_steps = a.gate_steps // 2 if self.masks == "half" else self.masks
        lr = a.gate_lr if self.lr is None else self.lr
        extra = {"objective": objective, "head": self.head}
        if self.init is not None:
            from comfyui_maskattn.nodes.gate_training import new_gates

            extra["maskattn"] = new_gates(ctx.model, ctx.stage, "encoder_decoder", TRAIN_DEFAULTS["hidden"],
                                          self.seed, self.init, self.head)
        if mask_steps:
            if mask_a is None:
                mask_a = torch.stack([box_mask(d.boxes["a"], ctx.size) for d in data])
                mask_b = torch.stack([box_mask(d.boxes["b"], ctx.size) for d in data])
            extra.update(clip=ctx.clip, captions="\n".join(captions), mask_steps=mask_steps, mask_outside=self.outside,
                         phrases="\n".join(f"{d.triple.colour_a} {d.triple.shape_a} | {d.triple.colour_b} "
                                           f"{d.triple.shape_b}" for d in data),
                         mask_1=mask_a, mask_2=mask_b)
        t0 = time.time()
        gates, _curve = ctx.nodes["MaskAttnTrainGates"]().train(ctx.model, latents, cond, a.gate_steps, a.gate_batch,
                                                                lr, ctx.stage, "encoder_decoder",
                                                                TRAIN_DEFAULTS["hidden"], self.seed, **extra)
        self.gated_model = ctx.apply(gates, self.start)
        ctx.info.setdefault(self.name, {}).update(start_percent=self.start,
            train_s=round(time.time() - t0, 1), distinct_captions=len(set(captions)), objective=objective, lr=lr,
            seed=self.seed, init_bias=self.init, mask_steps=mask_steps, steps=a.gate_steps, batch=a.gate_batch,
            head=self.head,
            **({"mask_source": self.mask_source, "mask_outside": self.outside} if mask_steps else {}))

    def model_for(self, ctx, idx, seed):
        return self.gated_model

    def supports(self, ctx):
        return ctx.args.world == "pairs"  # its training data and box masks are the pairs world's


#: Training variants measured for issue 19 (name -> LearnedArm keywords): the paper's recipe (reference init 0, its
#: lr 1e-4), objectives at --gate-lr, mask supervision on the true boxes (alone, followed by soft_x0, and applied
#: from 20% of the schedule) or on zero-shot v2's regions or decision (distilled, applied from 20% as v2 is), with the
#: background closed (the arms' default) or kept ("outside kept"); a seed suffix sN trains with gate seed N; "learned
#: context ..." are the same recipes with context heads (masks/context.py). Run by name with --arms (ABLATIONS), not in
#: the default design.
LEARNED_VARIANTS = {
    **{f"learned paper recipe s{k}": dict(objective="paper", init=0.0, lr=1e-4, seed=k) for k in range(3)},
    "learned paper_open s0": dict(objective="paper_open"),
    "learned soft_x0 s0": dict(objective="soft_x0"),
    "learned soft_backward s0": dict(objective="soft_backward"),
    "learned sparse s0": dict(objective="sparse"),
    "learned concrete s0": dict(objective="concrete"),
    "learned box masks s0": dict(masks=-1),
    "learned box masks then soft_x0 s0": dict(objective="soft_x0", masks="half"),
    "learned box masks from 0.2 s0": dict(masks=-1, start=0.2),
    "learned v2 regions s0": dict(masks=-1, mask_source="zero-shot v2", start=0.2),
    "learned v2 regions then soft_x0 s0": dict(objective="soft_x0", masks="half", mask_source="zero-shot v2",
                                               start=0.2),
    "learned v2 regions outside kept s0": dict(masks=-1, mask_source="zero-shot v2", start=0.2, outside="keep"),
    **{f"learned v2 decision s{k}": dict(masks=-1, mask_source="zero-shot v2 decision", start=0.2, seed=k)
       for k in range(3)},
    "learned box masks outside kept s0": dict(masks=-1, start=0.2, outside="keep"),
    **{f"learned context v2 decision s{k}": dict(masks=-1, mask_source="zero-shot v2 decision", start=0.2, seed=k,
                                                 head="context") for k in range(3)},
    "learned context box masks outside kept s0": dict(masks=-1, start=0.2, outside="keep", head="context"),
    "learned context v2 regions outside kept s0": dict(masks=-1, mask_source="zero-shot v2", start=0.2,
                                                       outside="keep", head="context"),
}


def zero_shot_v2_regions(ctx: Context, triples: list, seed: int, chunk: int = 128) -> tuple:
    """The distillation set: each caption sampled through the KSampler with "MaskAttn Zero-Shot Gates" (v2, the
    node's defaults) at ctx.stage, and the region v2 found for each object. The noise seeds lie above any evaluation
    seed (--seeds), so no training image starts from an evaluated image's noise; the images are decoded to uint8
    and encoded again, as the box arms' training images are. Prompts of one structure share token positions, so
    one gates object serves a chunk of them, as in the zero-shot arm.

    Returns (latents [N, 4, S, S], regions [N, 2, S, S], partition [N, 2, S, S], the caption indices of those N):
    regions are v2's regions (background in neither), partition gives every pixel to the group winning it in v2's
    aggregate. Images where v2 found no region for an object are left out (an empty mask cannot supervise)."""
    import nodes

    latents = torch.zeros(len(triples), 4, ctx.size, ctx.size)
    masks = torch.zeros(len(triples), 2, ctx.size, ctx.size)
    partition = torch.zeros(len(triples), 2, ctx.size, ctx.size)
    for g, (_, members) in enumerate(sorted(structure_groups(triples).items())):
        for start in range(0, len(members), chunk):
            idx = members[start:start + chunk]
            captions = [world.caption(triples[i]) for i in idx]
            gates = ctx.nodes["MaskAttnZeroShotGates"]().build(ctx.clip, captions[0], ctx.stage, 0.2)["result"][0]
            if len(gates.groups) != 2:
                raise ValueError(f"zero-shot v2 grouped {captions[0]!r} as {gates.group_labels()}: expected the two "
                                 f"objects")
            pos, neg = ctx.clip.conditioning(captions), ctx.clip.conditioning([""] * len(idx))
            empty = {"samples": torch.zeros(len(idx), 4, ctx.size, ctx.size)}
            with torch.inference_mode():
                (res,) = nodes.common_ksampler(ctx.apply(gates), 1_000_003 * (seed + 1) + 104729 * g + start,
                                               ctx.args.steps, ctx.args.cfg, "euler", "normal", pos, neg, empty)
            regions = gates.region_masks(ctx.size, ctx.size)
            if regions is None or regions.shape[:2] != (len(idx), 2):
                raise RuntimeError(f"zero-shot v2 kept no regions for {len(idx)} prompts: "
                                   f"{None if regions is None else tuple(regions.shape)}")
            latents[idx] = tinyt2i.encode_images(tinyt2i.decode_latents(res["samples"]))
            masks[idx] = regions.float()
            partition[idx] = gates.region_masks(ctx.size, ctx.size, cover_background=True).float()
    kept = [i for i in range(len(triples)) if bool((masks[i].flatten(1) > 0).any(1).all())]
    return latents[kept], masks[kept], partition[kept], kept


class ZeroShotArm(Arm):
    """"MaskAttn Zero-Shot Gates" with the given start and options (v1: partition "layer", start 0.2)."""

    def __init__(self, name: str = "zero-shot", start: float = 0.2, memory: float | None = None,
                 observe_early: bool = True, handover: str | None = None, floor: float | None = None, **options):
        self.name, self.start = name, start
        self.options = {"layout": "off", **(options or {"partition": "layer"})}
        # settings the node does not expose: v2's memory, the early observation, the layout's handover
        self.memory, self.observe_early, self.handover, self.floor = memory, observe_early, handover, floor

    def prepare(self, ctx):
        self.models = {}

    def model_for(self, ctx, idx, seed):
        key = structure(ctx.triples[idx[0]])
        if key not in self.models:
            caption = world.caption(ctx.triples[idx[0]])
            result = ctx.nodes["MaskAttnZeroShotGates"]().build(ctx.clip, caption, ctx.stage, self.start,
                                                                **self.options)["result"]
            hidden = {name: value for name, value in (("memory", self.memory), ("layout_handover", self.handover),
                                                      ("layout_floor", self.floor)) if value is not None}
            if not self.observe_early:
                hidden["observe_before_start"] = False
            if hidden:  # the same gates built with the settings the node does not expose
                from comfyui_maskattn.masks.zeroshot import build_zero_shot_gates
                from comfyui_maskattn.nodes.tokens import clip_tokens

                tokens, vocab = clip_tokens(ctx.clip, caption)
                result = (build_zero_shot_gates(caption, tokens, vocab, stage=ctx.stage, start_percent=self.start,
                                                **self.options, **hidden),) + tuple(result[1:])
            self.models[key] = ctx.apply(result[0])
            ctx.info.setdefault(self.name, {})[key] = result[1].splitlines()[0]
        return self.models[key]


class RegionArm(Arm):
    """MaskAttn Region Gates (the node) with one mask per object: true boxes (oracle) or caption halves."""

    def __init__(self, name: str, masks: str, end_tokens: str):
        self.name, self.masks, self.end_tokens = name, masks, end_tokens

    def model_for(self, ctx, idx, seed):
        from comfyui_maskattn.masks.region import phrase_tokens

        first = ctx.triples[idx[0]]
        text = world.caption(first)
        phrases = [f"{c} {s}" for c, s in objects_of(first)]
        # every prompt of one structure puts its object words at the same token positions: one gate set serves all
        vocab = ctx.clip.tokenizer.clip_l.inv_vocab
        expected = phrase_tokens(text, phrases, ctx.clip.tokenize(text, return_word_ids=True), vocab)
        for i in idx[1:]:
            t = ctx.triples[i]
            other = world.caption(t)
            got = phrase_tokens(other, [f"{c} {s}" for c, s in objects_of(t)],
                                ctx.clip.tokenize(other, return_word_ids=True), vocab)
            assert got == expected, (text, other)
        masks = region_masks(ctx, idx, seed, self.masks)
        gates, _ = ctx.nodes["MaskAttnRegionGates"]().build(
            ctx.clip, text, "\n".join(phrases), ctx.stage, self.end_tokens,
            **{f"mask_{k + 1}": m for k, m in enumerate(masks)})["result"]
        return ctx.apply(gates)

    def supports(self, ctx):
        return self.masks == "boxes" or ctx.args.world in ("pairs", "phrasings")


class CoupleArm(Arm):
    """Attention couple on the true boxes: one prompt per object, outputs blended by the masks (`couple.py`)."""

    name, staged, gated = "attention couple", False, False

    def model_for(self, ctx, idx, seed):
        from benchmarks.compbench.couple import couple_model

        masks = region_masks(ctx, idx, seed, "boxes")
        per_object = zip(*(objects_of(ctx.triples[i]) for i in idx))  # object k of every prompt
        contexts = [ctx.clip.conditioning([f"{world.article(c)} {c} {s}" for c, s in objs])[0][0]
                    for objs in per_object]
        return couple_model(ctx.model, torch.stack(contexts), torch.stack(masks))


ARMS = {
    "base": BaseArm,
    "learned": LearnedArm,
    "zero-shot": ZeroShotArm,
    "zero-shot v2": lambda: ZeroShotArm("zero-shot v2", 0.2, partition="aggregate"),
    "region oracle": lambda: RegionArm("region oracle", "boxes", "keep"),
    "region oracle, end hidden": lambda: RegionArm("region oracle, end hidden", "boxes", "hide_in_regions"),
    "layout mask": lambda: RegionArm("layout mask", "halves", "keep"),
    "zero-shot v2 layout": lambda: ZeroShotArm("zero-shot v2 layout", 0.2, partition="aggregate",
                                               layout="from the prompt"),
    "zero-shot v2 layout window": lambda: ZeroShotArm("zero-shot v2 layout window", 0.2, partition="aggregate",
                                                      layout="from the prompt", handover="window"),
    "attention couple": CoupleArm,
}
# Zero-shot v2 ablations (issue 20), each one change; run by name with --arms (not in the default design); the
# first ones ran with memory 0.8, the default before they measured 0.5 better
ABLATIONS = {
    "zs layout floor 0.05": lambda: ZeroShotArm("zs layout floor 0.05", 0.2, partition="aggregate",
                                                layout="from the prompt", floor=0.05),
    "zs layout start 0.5": lambda: ZeroShotArm("zs layout start 0.5", 0.5, partition="aggregate",
                                               layout="from the prompt"),
    "zs agg": lambda: ZeroShotArm("zs agg", 0.2, memory=0.8, partition="aggregate"),
    "zs agg start0": lambda: ZeroShotArm("zs agg start0", 0.0, memory=0.8, partition="aggregate"),
    "zs agg start0.1": lambda: ZeroShotArm("zs agg start0.1", 0.1, memory=0.8, partition="aggregate"),
    "zs agg end hidden": lambda: ZeroShotArm("zs agg end hidden", 0.2, memory=0.8, partition="aggregate",
                                             end_tokens="hide_in_regions"),
    "zs agg self": lambda: ZeroShotArm("zs agg self", 0.2, memory=0.8, partition="aggregate",
                                       self_attention="separate_groups"),
    "zs layer end hidden": lambda: ZeroShotArm("zs layer end hidden", 0.2, partition="layer",
                                               end_tokens="hide_in_regions"),
    "zs layer self": lambda: ZeroShotArm("zs layer self", 0.2, partition="layer", self_attention="separate_groups"),
    "zs agg m0.5": lambda: ZeroShotArm("zs agg m0.5", 0.2, memory=0.5, partition="aggregate"),
    "zs agg gated steps only": lambda: ZeroShotArm("zs agg gated steps only", 0.2, observe_early=False,
                                                   memory=0.8, partition="aggregate"),
}
# the training variants are run by name too: as default arms each would train gates in the CI smoke run
ABLATIONS.update({name: (lambda name=name, kw=kw: LearnedArm(name, **kw)) for name, kw in LEARNED_VARIANTS.items()})


# --- sampling -------------------------------------------------------------------------------------------------------
def watch_kept(model, kept: dict) -> None:
    """Adds, per gated layer call, the share of (location, token) pairs of the positive rows the gate kept, by
    stage of the layer (into kept[stage] = [sum, count])."""
    from comfyui_maskattn.masks.rows import prompt_rows
    from comfyui_maskattn.nodes import hooks

    runtime = hooks.installed_runtime(model)
    if runtime is None or getattr(runtime, "_compbench_watched", None) is kept:
        return
    runtime._compbench_watched = kept
    stages = {s.key: s.stage for s in hooks.model_sites(model)}

    def observe(key, result, info):
        hard = result.hard
        rows = prompt_rows(info, hard.shape[0], hard.device)  # (the prompt's own rows, also behind a couple)
        if isinstance(rows, list):  # no positive row in this call (an uncond-only batch): nothing to count
            return
        entry = kept.setdefault(stages.get(key, "?"), [0.0, 0])
        entry[0] += float((hard if rows is None else hard.index_select(0, rows)).float().mean())
        entry[1] += 1

    runtime.observers.append(observe)


def sample_arm(arm: Arm, ctx: Context) -> tuple[dict, dict]:
    """(prompt index, seed) -> uint8 image, every prompt of one structure in one batch per seed; and the kept
    pairs by stage of the layer, stage -> [sum of per-call kept shares, calls]."""
    import nodes

    images, kept = {}, {}
    for _, idx in sorted(structure_groups(ctx.triples).items()):
        pos = ctx.clip.conditioning([world.caption(ctx.triples[i]) for i in idx])
        neg = ctx.clip.conditioning([""] * len(idx))
        for s in ctx.seeds:
            model = arm.model_for(ctx, idx, s)
            if arm.gated:
                watch_kept(model, kept)
            latent = {"samples": torch.zeros(len(idx), 4, ctx.size, ctx.size)}
            with torch.inference_mode():
                (res,) = nodes.common_ksampler(model, s, ctx.args.steps, ctx.args.cfg, "euler", "normal", pos, neg,
                                               latent)
            for i, img in zip(idx, tinyt2i.decode_latents(res["samples"])):
                images[(i, s)] = np.ascontiguousarray(img)  # (a view's float sums differ in order)
    return images, kept


# --- scoring --------------------------------------------------------------------------------------------------------
def score_image(image: np.ndarray, t) -> dict:
    """Per metric (numerator, denominator) for one image of a Triple (or a Trio: three objects, no relation):

    presence: every named colour found; binding_given_present: every named colour's largest object has the named
    shape, among images with all present; colour_leak (lower is better): an object drawn in one named colour with
    *another* named object's shape (e.g. a blue circle for "a red circle ... a blue square"), among prompts whose
    shapes differ; shape: per named object whose colour is found, its shape is right; relation_given_present: the
    centroids' relation holds, among images with both present (a Trio has no relation: 0/0, "n/a"); correct: all
    three; two_objects: exactly the named number of objects, all shapes readable (a quality proxy)."""
    sc = judge.score(image, t)
    present = int(sc.presence)
    named = objects_of(t)
    found = [(sc.matched.get(k), shape) for k, (_, shape) in zip("abc", named)]
    found = [(d, shape) for d, shape in found if d is not None]
    wrong = {(c, other) for c, s in named for _, other in named if other != s}  # a colour with another's shape
    differ = len({s for _, s in named}) > 1
    leak = differ and any((d.colour, d.shape) in wrong for d in sc.objects)
    readable = [o for o in sc.objects if o.shape != "unknown"]
    trio = isinstance(t, world.Trio)  # (a Between has a relation: B, A, C from the left)
    return {
        "presence": (present, 1),
        "binding_given_present": (int(sc.binding), present),
        "colour_leak": (int(leak), int(differ)),
        "shape": (sum(d.shape == shape for d, shape in found), len(found)),
        "relation_given_present": (0, 0) if trio else (int(sc.relation), present),
        "correct": (int(sc.correct), 1),
        "two_objects": (int(len(sc.objects) == len(named) and len(readable) == len(named)), 1),
    }


def per_prompt_counts(images: dict, triples) -> dict[str, np.ndarray]:
    """metric -> [prompts, 2] (numerator, denominator) summed over a prompt's seeds."""
    out = {m: np.zeros((len(triples), 2)) for m in METRICS}
    for (i, _s), img in images.items():
        for m, (num, den) in score_image(img, triples[i]).items():
            out[m][i] += (num, den)
    return out


def resamples(n_prompts: int, n: int = 4000, seed: int = 0) -> np.ndarray:
    """The bootstrap's prompt indices, shared by every arm so differences are paired."""
    return np.random.default_rng(seed).integers(0, n_prompts, size=(n, n_prompts))


def ratio(counts: np.ndarray, index: np.ndarray | None = None) -> np.ndarray | float:
    if index is None:
        num, den = counts[:, 0].sum(), counts[:, 1].sum()
        return float(num / den) if den else float("nan")
    num, den = counts[index, 0].sum(axis=1), counts[index, 1].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def interval(point: float, draws: np.ndarray) -> list:
    draws = draws[np.isfinite(draws)]
    if not draws.size or not np.isfinite(point):
        return [point, float("nan"), float("nan")]
    return [float(point), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def diversity(images: dict, n_prompts: int, seeds) -> np.ndarray:
    """Per prompt: mean pairwise RMS distance (pixels in [0, 1]) between its images across seeds."""
    out = np.zeros(n_prompts)
    for i in range(n_prompts):
        imgs = [images[(i, s)].astype(np.float32) / 255.0 for s in seeds]
        d = [np.sqrt(((a - b) ** 2).mean()) for k, a in enumerate(imgs) for b in imgs[k + 1:]]
        out[i] = float(np.mean(d)) if d else 0.0
    return out


def summarise(images_by_arm: dict, triples, seeds, ceiling: str | None) -> dict:
    """Per arm: each metric with its interval, the paired difference against base, and the share of the way from
    base to `ceiling` (same resamples throughout)."""
    idx = resamples(len(triples))
    counts = {name: per_prompt_counts(imgs, triples) for name, imgs in images_by_arm.items()}
    out = {}
    for name, c in counts.items():
        entry = {m: interval(ratio(c[m]), ratio(c[m], idx)) for m in METRICS}
        div = diversity(images_by_arm[name], len(triples), seeds)
        entry["diversity"] = interval(float(div.mean()), div[idx].mean(axis=1))
        if name not in ("base", "ground truth") and "base" in counts:
            b = counts["base"]
            entry["vs_base"] = {m: interval(ratio(c[m]) - ratio(b[m]), ratio(c[m], idx) - ratio(b[m], idx))
                                for m in METRICS}
            if ceiling in counts:
                top = counts[ceiling]
                share = {}
                for m in HEADLINE:
                    with np.errstate(invalid="ignore", divide="ignore"):
                        gap, gaps = ratio(top[m]) - ratio(b[m]), ratio(top[m], idx) - ratio(b[m], idx)
                        point = (ratio(c[m]) - ratio(b[m])) / gap if abs(gap) > 1e-9 else float("nan")
                        share[m] = interval(point, (ratio(c[m], idx) - ratio(b[m], idx)) / gaps)
                entry["share_of_ceiling"] = share
        out[name] = entry
    return out


def grid(images_by_condition: dict, triples, seeds, prompts: list[int], path: Path, scale: int = 3):
    from PIL import Image, ImageDraw

    names = list(images_by_condition)
    s = next(iter(images_by_condition.values()))[(prompts[0], seeds[0])].shape[0] * scale
    label_w = 250
    canvas = Image.new("RGB", (label_w + s * len(names) * len(seeds[:2]), (s + 4) * len(prompts) + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        draw.text((label_w + c * s * len(seeds[:2]) + 2, 2), name, fill=(0, 0, 0))
    for r, i in enumerate(prompts):
        y = 16 + r * (s + 4)
        draw.text((2, y + s // 2 - 6), world.caption(triples[i]), fill=(0, 0, 0))
        for c, name in enumerate(names):
            for k, seed in enumerate(seeds[:2]):
                img = Image.fromarray(images_by_condition[name][(i, seed)]).resize((s, s), Image.NEAREST)
                canvas.paste(img, (label_w + (c * len(seeds[:2]) + k) * s, y))
    canvas.save(path)


def spotcheck_sheet(images: dict, triples, path: Path, count: int = 36, scale: int = 4):
    """The first `count` (prompt, seed 0) images with their caption and the judge's verdict, for checking by eye."""
    from PIL import Image, ImageDraw

    keys = sorted(k for k in images if k[1] == min(s for _, s in images))[:count]
    side = next(iter(images.values())).shape[0] * scale
    cols, cell_w, cell_h = 4, 300, side + 30
    rows = (len(keys) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for n, (i, s) in enumerate(keys):
        x, y = (n % cols) * cell_w, (n // cols) * cell_h
        canvas.paste(Image.fromarray(images[(i, s)]).resize((side, side), Image.NEAREST), (x, y))
        sc = judge.score(images[(i, s)], triples[i])
        seen = "; ".join(f"{o.colour} {o.shape}" for o in sc.objects) or "nothing"
        verdict = "".join(f"{m[0].upper()}{'+' if getattr(sc, m) else '-'} " for m in ("presence", "binding",
                                                                                     "relation"))
        draw.text((x + side + 4, y + 2), f"#{n}", fill=(0, 0, 0))
        draw.text((x + side + 4, y + 16), verdict, fill=(0, 0, 0))
        words = world.caption(triples[i]).split()
        draw.text((x, y + side + 2), " ".join(words[:5]), fill=(0, 0, 0))
        draw.text((x, y + side + 14), " ".join(words[5:]) + f"  | judge: {seen}"[:60], fill=(90, 90, 90))
    canvas.save(path)



def build(args: argparse.Namespace, seeds: list) -> tuple:
    """The host, the model, the prompts and the arms for `seeds`: (Context, arms, arms left out, prompt rows per
    --pairings kind, the model's metadata)."""
    nodes_map = load_pack()
    model, clip, cfg, meta = tinyt2i.load(args.model)
    clip.encoder.drop_unknown = args.world == "phrasings"  # the model reads a phrasing it never saw as no relation
    subsets, triples = {}, []
    for kind in args.pairings:
        subsets[kind] = list(range(len(triples), len(triples) + args.prompts))
        triples += evaluation_prompts(args.prompts, 7, args.world, kind)
    ctx = Context(nodes_map, model, clip, triples, seeds, cfg.image_size, args)
    arms = [{**ARMS, **ABLATIONS}[name]() for name in args.arms]
    left_out = [a.name for a in arms if not a.supports(ctx)]
    return ctx, [a for a in arms if a.supports(ctx)], left_out, subsets, meta


def sample_all(ctx: Context, arms: list) -> tuple[dict, dict, dict]:
    """Every arm at every stage on ctx.seeds: images by arm name (staged arms by (stage, name)), kept sums by
    "stage: name", seconds by phase."""
    timings, kept, images = {}, {}, {}
    for arm in [a for a in arms if not a.staged]:
        t0 = time.time()
        images[arm.name], _ = sample_arm(arm, ctx)
        timings[f"sample {arm.name}"] = time.time() - t0
    for stage in ctx.args.stages:
        ctx.stage = stage
        for arm in [a for a in arms if a.staged]:
            t0 = time.time()
            arm.prepare(ctx)
            images[(stage, arm.name)], kept[f"{stage}: {arm.name}"] = sample_arm(arm, ctx)
            timings[f"{stage}: {arm.name}"] = time.time() - t0
    return images, kept, timings


def _job(args: argparse.Namespace, seeds: list) -> tuple:
    torch.set_num_threads(args.threads)
    ctx, arms, _, _, _ = build(args, seeds)
    return (*sample_all(ctx, arms), ctx.info)


def sample_in_jobs(args: argparse.Namespace, seed_shares: list[list], info: dict) -> tuple[dict, dict, dict]:
    """sample_all in one process per share of the seeds (each with its own host and --threads), merged. An image
    depends only on its prompt group and seed, so the result is the same as one job's; arms that train gates train
    them once per job (the same gates: training is seeded), which costs that time again."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(len(seed_shares), mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_job, [args] * len(seed_shares), seed_shares))
    images, kept, timings = {}, {}, {}
    for part_images, part_kept, part_timings, part_info in parts:
        for key, imgs in part_images.items():
            images.setdefault(key, {}).update(imgs)
        for key, sums in part_kept.items():
            for stage, (total, calls) in sums.items():
                entry = kept.setdefault(key, {}).setdefault(stage, [0.0, 0])
                entry[0] += total
                entry[1] += calls
        for key, seconds in part_timings.items():  # wall-clock: the jobs run side by side
            timings[key] = max(timings.get(key, 0.0), seconds)
        for name, note in part_info.items():
            info.setdefault(name, note)
    return images, kept, timings


#: Result folders are named by model ("model2", not a version suffix a gate source also uses).
MODEL_LABELS = {"tiny_t2i.safetensors": "model1", "tiny_t2i_v2.safetensors": "model2"}


def default_out(model_path) -> Path:
    """results/<model>/latest/: a run's own folder that never overwrites a kept study (see RESULTS.md)."""
    name = Path(model_path).name
    return HERE / "results" / MODEL_LABELS.get(name, Path(name).stem) / "latest"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(HERE / "tiny_t2i.safetensors"))
    ap.add_argument("--out", default=None, help="output folder (default: results/<model>/latest/, e.g. "
                                                "results/model1/latest/ for tiny_t2i.safetensors)")
    ap.add_argument("--quick", action="store_true",
                    help=f"the smoke run: {', '.join(f'{k}={v}' for k, v in QUICK.items())} (explicit flags win)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=[*ARMS, *ABLATIONS])
    ap.add_argument("--stages", nargs="+", default=None, help="gated stages to run (default: high all)")
    ap.add_argument("--world", default="pairs", choices=WORLDS,
                    help="pairs: two objects and a relation (the first world); trio: three objects close together, "
                         "no relation (attribute leakage); phrasings: the pairs worded otherwise ('on top of', "
                         "'beside', ...) and 'A between B and C', words the model never saw (it reads without them)")
    ap.add_argument("--pairings", nargs="+", default=["unseen"], choices=PAIRINGS,
                    help="prompts naming a held-out colour-shape pairing (unseen) and/or only trained ones (seen); "
                         "with both, --prompts of each and one table per kind")
    ap.add_argument("--prompts", type=int, default=None,
                    help="prompts per --pairings kind, balanced over relations (400)")
    ap.add_argument("--seeds", type=int, default=None, help="noise seeds per prompt, the same in every arm (4)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (20)")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--gate-captions", type=int, default=None, help="images for gate training (1000)")
    ap.add_argument("--gate-steps", type=int, default=None, help="gate training steps (600)")
    ap.add_argument("--gate-batch", type=int, default=None, help="gate training batch (16)")
    ap.add_argument("--gate-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes sampling side by side, each with a share of the seeds (one per free core); the "
                         "images are the same as with one job")
    args = ap.parse_args(argv)
    defaults = {"prompts": 400, "seeds": 4, "steps": 20, "gate_captions": 1000, "gate_steps": 600, "gate_batch": 16,
                "stages": ["high", "all"]}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick and key in QUICK else value)
    torch.set_num_threads(args.threads)
    started = time.time()
    seeds = list(range(args.seeds))
    out_dir = Path(args.out) if args.out else default_out(args.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx, arms, left_out, subsets, meta = build(args, seeds)
    triples = ctx.triples
    jobs = max(1, min(args.jobs, len(seeds)))
    if jobs == 1:
        images, kept_sums, timings = sample_all(ctx, arms)
    else:
        images, kept_sums, timings = sample_in_jobs(args, [seeds[k::jobs] for k in range(jobs)], ctx.info)
    kept = {key: {stage: round(v[0] / max(v[1], 1), 4) for stage, v in sorted(sums.items())}
            for key, sums in kept_sums.items()}

    truth = {(i, s): scene(t, layout_seed(i, s), ctx.size).image for i, t in enumerate(triples) for s in seeds}
    t0 = time.time()
    tables = {}
    for stage in args.stages:
        by_arm = {"ground truth": truth}
        by_arm.update({a.name: images[a.name if not a.staged else (stage, a.name)] for a in arms})
        for kind, rows in subsets.items():
            key = stage if len(subsets) == 1 else f"{stage} · {kind} pairings"
            position = {i: r for r, i in enumerate(rows)}
            part = {name: {(position[i], s): img for (i, s), img in imgs.items() if i in position}
                    for name, imgs in by_arm.items()}
            tables[key] = summarise(part, [triples[i] for i in rows], seeds, CEILING if CEILING in by_arm else None)
    timings["judge"] = time.time() - t0

    first = args.stages[0]
    shown = {"ground truth": truth, **{a.name: images[a.name if not a.staged else (first, a.name)] for a in arms}}
    n = len(triples)
    grid(shown, triples, seeds, [i for i in range(0, n, max(1, n // 8))][:8], out_dir / "samples.png")
    if "base" in images:
        spotcheck_sheet(images["base"], triples, out_dir / "spotcheck_base.png")
    report = {
        "model": {"file": Path(args.model).name, **{k: meta.get(k) for k in ("steps", "batch", "seconds",
                                                                            "parameters", "final_loss")}},
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out")},
        "arms_left_out": left_out,
        "prompts": [world.caption(t) for t in triples],
        "tables": tables,
        "kept_fraction": kept,
        "arm_notes": ctx.info,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.time() - started, 1),
        "machine": f"{platform.processor() or platform.machine()}, {jobs} job(s) of {torch.get_num_threads()} torch "
                   f"thread(s), torch {torch.__version__}",
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    (out_dir / "results.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _fmt(v, scale=100.0, digits=1, signed=False):
    mean, lo, hi = v
    if not np.isfinite(mean):
        return "n/a"
    sign = "+" if signed else ""
    if not np.isfinite(lo):
        return f"{mean * scale:{sign}.{digits}f}"
    return f"{mean * scale:{sign}.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def markdown(report: dict) -> str:
    s = report["settings"]
    kinds = " and ".join(s.get("pairings", ["unseen"]))
    lines = [f"World {s.get('world', 'pairs')}, model {report['model']['file']}: {s['prompts']} prompts per kind "
             f"({kinds} pairings) x {s['seeds']} seeds, {s['steps']} steps euler/normal, cfg {s['cfg']}. Rates in % "
             "with 95% bootstrap intervals over prompts; colour leak: lower is better.",
             "Ceiling for \"% of the way\": the region oracle (Region Gates on the true boxes)."]
    if report.get("arms_left_out"):
        lines.append(f"Left out (no meaning in this world): {', '.join(report['arms_left_out'])}.")
    names = list(METRICS)
    for key, table in report["tables"].items():
        stage = key.split(" · ")[0]
        lines += ["", f"### Stage {key}", "",
                  "| arm | " + " | ".join(METRICS[m][0] for m in names) + " | diversity |",
                  "|---" * (len(names) + 2) + "|"]
        for arm, r in table.items():
            lines.append(f"| {arm} | " + " | ".join(_fmt(r[m]) for m in names)
                         + f" | {_fmt(r['diversity'], 1.0, 3)} |")
        lines += ["", "Paired differences against base (percentage points):", "",
                  "| arm | " + " | ".join(METRICS[m][0] for m in names) + " |", "|---" * (len(names) + 1) + "|"]
        for arm, r in table.items():
            if "vs_base" in r:
                lines.append(f"| {arm} | " + " | ".join(_fmt(r["vs_base"][m], signed=True) for m in names) + " |")
        shares = {arm: r["share_of_ceiling"] for arm, r in table.items() if "share_of_ceiling" in r}
        if shares:
            lines += ["", "Share of the way from base to the region oracle (%; 100 = the oracle):", "",
                      "| arm | " + " | ".join(METRICS[m][0] for m in HEADLINE) + " |",
                      "|---" * (len(HEADLINE) + 1) + "|"]
            for arm, sh in shares.items():
                lines.append(f"| {arm} | " + " | ".join(_fmt(sh[m], digits=0) for m in HEADLINE) + " |")
        kept = {k.split(": ", 1)[1]: v for k, v in report["kept_fraction"].items() if k.startswith(f"{stage}: ")}
        if kept:
            lines += ["", "Kept share of (location, token) pairs of the positive prompt, per gated layer call, by the "
                      "stage of the layer: " + "; ".join(
                          f"{arm} " + ", ".join(f"{st} {100 * v:.1f}%" for st, v in by.items())
                          for arm, by in kept.items() if by) + "."]
    lines += ["", "Times (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items())
              + f"; total {report['total_s']} s on {report['machine']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
