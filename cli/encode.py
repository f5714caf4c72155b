"""The command-line trainer's model inputs: the checkpoint through ComfyUI's own loader, every image and caption
encoded once (cached in RUN_DIR/cache, per rank's shard), and the object masks mapped to the captions' tokens."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path


def _load_factory(spec: str):
    target, _, func = spec.partition(":")
    if target.endswith(".py"):
        s = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, func)


def load_components(args):
    """(MODEL, CLIP, VAE) through ComfyUI's own checkpoint loader (or a test factory)."""
    if args.model_factory:
        return _load_factory(args.model_factory)()
    if not args.checkpoint:
        raise SystemExit("--checkpoint is required")
    import comfy.sd
    import folder_paths

    path = Path(args.checkpoint).expanduser()
    if not path.is_file():
        found = folder_paths.get_full_path("checkpoints", args.checkpoint)
        if not found:
            raise SystemExit(
                f"checkpoint {args.checkpoint!r} not found (neither a file nor a name in models/checkpoints)"
            )
        path = Path(found)
    out = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
    )
    return out[0], out[1], out[2]


def encode_dataset(args, examples, model, clip, vae, fingerprint: str, dist):
    """Latents and text states of this rank's examples, computed once and cached in RUN_DIR/cache."""
    import torch
    from safetensors.torch import load_file, save_file

    from comfyui_maskattn.cli.dataset import load_image
    from comfyui_maskattn.nodes.training_examples import TrainingExamples, prepare_examples

    cache_dir = Path(args.output) / "cache"
    cache = cache_dir / f"{fingerprint}-r{dist.rank}of{dist.world}.safetensors"
    if cache.is_file():
        try:
            t = load_file(str(cache))
            n = int(t["count"])
            extras = {}
            for key in t:
                if key.startswith("extra."):
                    prefix, i = key.rsplit(".", 1)
                    extras.setdefault(prefix[len("extra.") :], {})[int(i)] = t[key]
            return TrainingExamples(
                t["latents"],
                [t[f"context.{i}"] for i in range(n)],
                {k: [v[i] for i in range(n)] for k, v in extras.items()},
            )
        except Exception as e:  # a damaged cache is rebuilt
            print(f"[rank {dist.rank}] cache {cache.name} unusable ({e}); encoding again", flush=True)
    res = args.resolution
    latents, conds = [], []
    with torch.inference_mode():
        for ex in examples:
            pixels = load_image(ex.image, res)
            latents.append(vae.encode(pixels[:, :, :, :3]).float().cpu())
            tokens = clip.tokenize(ex.caption)
            cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
            conds.append(
                [
                    cond.float().cpu(),
                    {
                        "pooled_output": pooled.float().cpu(),
                        "width": res,
                        "height": res,
                        "crop_w": 0,
                        "crop_h": 0,
                        "target_width": res,
                        "target_height": res,
                    },
                ]
            )
    prepared = prepare_examples(model, {"samples": torch.cat(latents)}, conds)
    tensors = {"latents": prepared.latents.contiguous(), "count": torch.tensor(len(prepared))}
    for i, c in enumerate(prepared.contexts):
        tensors[f"context.{i}"] = c.contiguous()
    for name, values in prepared.extras.items():
        for i, v in enumerate(values):
            tensors[f"extra.{name}.{i}"] = v.contiguous()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".partial")
    save_file(tensors, str(tmp))
    os.replace(tmp, cache)
    return prepared


def encode_objects(examples, clip, resolution: int):
    """ObjectMasks per example (None without objects): masks cropped like the images, phrases mapped to tokens."""
    from comfyui_maskattn.cli.dataset import load_object_mask
    from comfyui_maskattn.masks.supervised import object_masks
    from comfyui_maskattn.nodes.tokens import clip_tokens

    out = []
    for ex in examples:
        if not ex.objects:
            out.append(None)
            continue
        tokens, vocab = clip_tokens(clip, ex.caption)
        planes = [load_object_mask(ex, obj, resolution) for obj in ex.objects]
        try:
            out.append(object_masks(ex.caption, [o.phrase for o in ex.objects], planes, tokens, vocab))
        except ValueError as e:
            raise SystemExit(f"error: {ex.image.name}: object masks: {e}") from None
    return out
