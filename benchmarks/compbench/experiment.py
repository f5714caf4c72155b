"""The CompBench experiment: does MaskAttn gating improve binding in the tiny world, and at what cost?

    python -m benchmarks.compbench.experiment                       # the published table (12 min on 2 CPU cores)
    python -m benchmarks.compbench.experiment --prompts 24 --seeds 2 --gate-steps 50   # a smoke run (~1 min)

Conditions, all sampled through ComfyUI's KSampler (`nodes.common_ksampler`, euler / normal, 20 steps, cfg 4) on the
tiny SDXL-architecture model (`tinyt2i.py`), with this pack's nodes:

- base: the model as trained;
- learned: "Train MaskAttn Gates" (the part-3 trainer, the model frozen) on --gate-captions captions drawn from the
  *train* split of `world.split_combos()`, images rendered by the world, then "Apply MaskAttn" (stage mid);
- zero-shot: "MaskAttn Zero-Shot Gates" (part 5, no training) built from the prompt, then "Apply MaskAttn".

Evaluation prompts come from the *held-out* split only (every one contains a colour-shape pairing that never occurs
in gate training); each prompt is sampled with the same --seeds noise seeds in every condition, so comparisons are
paired. The judge (`judge.py`) scores presence, binding, relation and all three; intervals are 95% percentile
bootstraps over prompts (seeds stay together), differences are paired the same way. Quality/diversity proxies:
the share of images with exactly two objects the judge can read, and the per-prompt diversity across seeds (mean
pairwise RMS pixel distance; ground-truth renders of the same prompts give the reference value).

Writes results.json, results.md and samples.png (a few prompts, every condition) into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.compbench import judge, tinyt2i, world  # noqa: E402

HERE = Path(__file__).resolve().parent
METRICS = ("presence", "binding", "relation", "correct")
CONDITIONS = ("base", "learned", "zero-shot")


def load_pack() -> dict:
    """The ComfyUI host (CPU, PyTorch attention) and this pack's NODE_CLASS_MAPPINGS."""
    import importlib

    tinyt2i.load_host()
    return importlib.import_module("comfyui_maskattn.nodes").NODE_CLASS_MAPPINGS


def evaluation_prompts(n: int, seed: int) -> list[world.Triple]:
    """n held-out triples, balanced over the four relations, in a seeded order."""
    _, heldout = world.split_combos(seed=0)
    rng = np.random.default_rng(seed)
    by_relation = {r: [t for t in heldout if t.relation == r] for r in world.PHRASES}
    picked = []
    for r, triples in by_relation.items():
        order = rng.permutation(len(triples))
        picked += [triples[i] for i in order[: (n + len(by_relation) - 1) // len(by_relation)]]
    return sorted(picked[:n], key=lambda t: (t.relation, world.caption(t)))


def structure(t: world.Triple) -> str:
    """Prompts with the same word positions share one zero-shot grouping ("to the left of" is 4 words, "above" 1)."""
    return "horizontal" if t.relation in ("left of", "right of") else "vertical"


def sample(model, clip, triples, seeds, steps, cfg, size) -> dict:
    """(prompt index, seed) -> uint8 image, sampling every prompt of one structure in one batch per seed."""
    import nodes

    out = {}
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(triples):
        groups.setdefault(structure(t), []).append(i)
    for _, idx in sorted(groups.items()):
        pos = clip.conditioning([world.caption(triples[i]) for i in idx])
        neg = clip.conditioning([""] * len(idx))
        for s in seeds:
            latent = {"samples": torch.zeros(len(idx), 4, size, size)}
            with torch.inference_mode():
                (res,) = nodes.common_ksampler(model, s, steps, cfg, "euler", "normal", pos, neg, latent)
            for i, img in zip(idx, tinyt2i.decode_latents(res["samples"])):
                out[(i, s)] = img
    return out


def zero_shot_models(nodes_map, model, clip, triples, stage):
    """One zero-shot-gated model per prompt structure (token positions of the groups are the same within one)."""
    build = nodes_map["MaskAttnZeroShotGates"]()
    apply = nodes_map["MaskAttnApply"]()
    models, groupings = {}, {}
    for t in triples:
        key = structure(t)
        if key in models:
            continue
        result = build.build(clip, world.caption(t), stage, 0.2)["result"]
        gates, groupings[key] = result
        (models[key],) = apply.apply(model, gates, 0.5, 1.0, stage, "encoder_decoder", 0.0, 1.0)
    return models, groupings


def train_gates(nodes_map, model, clip, n_captions, steps, batch, lr, stage, seed):
    train_split, _ = world.split_combos(seed=0)
    data = world.dataset(n_captions, seed=1000 + seed, combos=train_split, size=32)
    latents = {"samples": tinyt2i.encode_images(np.stack([d.image for d in data]))}
    cond = clip.conditioning([d.caption for d in data])
    t0 = time.time()
    gates, _curve = nodes_map["MaskAttnTrainGates"]().train(model, latents, cond, steps, batch, lr, stage,
                                                             "encoder_decoder", 128, seed)
    return gates, time.time() - t0, len({d.caption for d in data})


def watch_kept(model) -> list:
    """Collects, per gated layer call while sampling, the fraction of (location, token) pairs the gate kept."""
    from comfyui_maskattn.nodes import hooks

    kept: list = []
    hooks.installed_runtime(model).observers.append(lambda key, result, info: kept.append(float(result.hard.mean())))
    return kept


def score_images(images: dict, triples) -> list[dict]:
    rows = []
    for (i, s), img in sorted(images.items()):
        sc = judge.score(img, triples[i])
        readable = [o for o in sc.objects if o.shape != "unknown"]
        rows.append({"prompt": i, "seed": s, **{m: bool(getattr(sc, m)) for m in METRICS},
                     "two_objects": len(sc.objects) == 2 and len(readable) == 2})
    return rows


def per_prompt(rows: list[dict], key: str, n_prompts: int) -> np.ndarray:
    total, count = np.zeros(n_prompts), np.zeros(n_prompts)
    for r in rows:
        total[r["prompt"]] += r[key]
        count[r["prompt"]] += 1
    return total / np.maximum(count, 1)


def bootstrap(values: np.ndarray, n: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile interval over prompts (values: one per prompt, seeds already averaged)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def diversity(images: dict, n_prompts: int, seeds) -> np.ndarray:
    """Per prompt: mean pairwise RMS distance (pixels in [0, 1]) between its images across seeds."""
    out = np.zeros(n_prompts)
    for i in range(n_prompts):
        imgs = [images[(i, s)].astype(np.float32) / 255.0 for s in seeds]
        d = [np.sqrt(((a - b) ** 2).mean()) for k, a in enumerate(imgs) for b in imgs[k + 1:]]
        out[i] = float(np.mean(d)) if d else 0.0
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
        verdict = "".join(f"{m[0].upper()}{'+' if getattr(sc, m) else '-'} " for m in METRICS[:3])
        draw.text((x + side + 4, y + 2), f"#{n}", fill=(0, 0, 0))
        draw.text((x + side + 4, y + 16), verdict, fill=(0, 0, 0))
        words = world.caption(triples[i]).split()
        draw.text((x, y + side + 2), " ".join(words[:5]), fill=(0, 0, 0))
        draw.text((x, y + side + 14), " ".join(words[5:]) + f"  | judge: {seen}"[:60], fill=(90, 90, 90))
    canvas.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(HERE / "tiny_t2i.safetensors"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts, balanced over relations")
    ap.add_argument("--seeds", type=int, default=4, help="noise seeds per prompt (the same in every condition)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--stage", default="mid")
    ap.add_argument("--gate-captions", type=int, default=1000)
    ap.add_argument("--gate-steps", type=int, default=600)
    ap.add_argument("--gate-batch", type=int, default=16)
    ap.add_argument("--gate-lr", type=float, default=1e-3)
    ap.add_argument("--gate-seeds", type=int, default=1, help="independent gate trainings (each evaluated)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    nodes_map = load_pack()
    model, clip, cfg, meta = tinyt2i.load(args.model)
    size = cfg.image_size
    triples = evaluation_prompts(args.prompts, seed=7)
    seeds = list(range(args.seeds))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings, images, extra = {}, {}, {}

    t0 = time.time()
    images["base"] = sample(model, clip, triples, seeds, args.steps, args.cfg, size)
    timings["sample base"] = time.time() - t0

    for g in range(args.gate_seeds):
        name = "learned" if args.gate_seeds == 1 else f"learned (gate seed {g})"
        gates, seconds, distinct = train_gates(nodes_map, model, clip, args.gate_captions, args.gate_steps,
                                               args.gate_batch, args.gate_lr, args.stage, g)
        timings[f"train gates {g}"] = seconds
        extra[name] = {"distinct_captions": distinct}
        (gated,) = nodes_map["MaskAttnApply"]().apply(model, gates, 0.5, 1.0, args.stage, "encoder_decoder", 0.0, 1.0)
        kept = watch_kept(gated)
        t0 = time.time()
        images[name] = sample(gated, clip, triples, seeds, args.steps, args.cfg, size)
        extra[name]["kept_fraction"] = round(float(np.mean(kept)), 4) if kept else None
        timings[f"sample {name}"] = time.time() - t0

    zs_models, groupings = zero_shot_models(nodes_map, model, clip, triples, args.stage)
    extra["zero-shot"] = {"groupings": {k: v.splitlines()[0] for k, v in groupings.items()}}
    kept = [watch_kept(m) for m in zs_models.values()]
    t0 = time.time()
    zs_images = {}
    for key, m in zs_models.items():
        subset = [i for i, t in enumerate(triples) if structure(t) == key]
        part = sample(m, clip, [triples[i] for i in subset], seeds, args.steps, args.cfg, size)
        zs_images.update({(subset[j], s): img for (j, s), img in part.items()})
    images["zero-shot"] = zs_images
    timings["sample zero-shot"] = time.time() - t0
    values = [v for k in kept for v in k]
    extra["zero-shot"]["kept_fraction"] = round(float(np.mean(values)), 4) if values else None

    truth = {(i, s): world.sample(10_000 * i + s, triple=t, size=size).image
             for i, t in enumerate(triples) for s in seeds}
    images_all = {"ground truth": truth, **images}

    t0 = time.time()
    n = len(triples)
    results = {}
    base_rows = None
    for name, imgs in images_all.items():
        rows = score_images(imgs, triples)
        entry = {m: bootstrap(per_prompt(rows, m, n)) for m in (*METRICS, "two_objects")}
        entry["diversity"] = bootstrap(diversity(imgs, n, seeds))
        if name == "base":
            base_rows = rows
        elif name != "ground truth" and base_rows is not None:
            entry["vs_base"] = {m: bootstrap(per_prompt(rows, m, n) - per_prompt(base_rows, m, n))
                                for m in (*METRICS, "two_objects")}
        results[name] = entry
    timings["judge"] = time.time() - t0

    show = [i for i in range(0, n, max(1, n // 8))][:8]
    grid(images_all, triples, seeds, show, out_dir / "samples.png")
    spotcheck_sheet(images["base"], triples, out_dir / "spotcheck_base.png")
    report = {
        "model": {"file": Path(args.model).name, **{k: meta.get(k) for k in ("steps", "batch", "seconds",
                                                                            "parameters", "final_loss")}},
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out")},
        "prompts": [world.caption(t) for t in triples],
        "results": results,
        "extra": extra,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.time() - started, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    (out_dir / "results.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _fmt(v, pct=True):
    mean, lo, hi = v
    k = 100.0 if pct else 1.0
    d = 1 if pct else 3
    return f"{mean * k:.{d}f} [{lo * k:.{d}f}, {hi * k:.{d}f}]"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"{len(report['prompts'])} held-out prompts x {s['seeds']} seeds, {s['steps']} steps euler/normal, "
             f"cfg {s['cfg']}, gates at stage {s['stage']}. Rates in % with 95% bootstrap intervals over prompts.",
             "", "| condition | presence | binding | relation | all correct | two readable objects | diversity |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r[m]) for m in (*METRICS, "two_objects"))
                     + f" | {_fmt(r['diversity'], pct=False)} |")
    lines += ["", "Paired differences against base (percentage points, 95% bootstrap intervals over prompts):", "",
              "| condition | presence | binding | relation | all correct | two readable objects |",
              "|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        if "vs_base" in r:
            lines.append(f"| {name} | " + " | ".join(_fmt(r["vs_base"][m]) for m in (*METRICS, "two_objects"))
                         + " |")
    kept = {k: v.get("kept_fraction") for k, v in report.get("extra", {}).items() if v.get("kept_fraction")}
    if kept:
        lines += ["", "Share of (location, token) pairs the gates kept, over gated layer calls (cond and uncond): "
                  + ", ".join(f"{k} {100 * v:.1f}%" for k, v in kept.items()) + "."]
    lines += ["", "Times (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items())
              + f"; total {report['total_s']} s on {report['machine']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
