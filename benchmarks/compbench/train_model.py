"""Train the tiny CompBench text-to-image model (tinyt2i.py) from scratch on the procedural world.

    python -m benchmarks.compbench.train_model --out benchmarks/compbench/tiny_t2i.safetensors
    python -m benchmarks.compbench.train_model --minutes 2 --out /tmp/probe.safetensors   # a quick probe
    python -m benchmarks.compbench.train_model --worlds pairs trio --hold-out-pairings \
        --out benchmarks/compbench/tiny_t2i_v2.safetensors                                    # the second model

Data: `world.sample(seed, size=32)` (and with `--worlds pairs trio`, half the examples from `world.sample_trio`), a
fresh image per example. By default every combination (the first model, like SDXL, has seen every colour-shape
pairing); `--hold-out-pairings` draws only from the train splits (`world.split_combos` / `split_trios`), so the
held-out pairings (a "red circle", ...) are never seen by the base model either. 10% of
captions dropped to the empty prompt for classifier-free guidance. Loss: SDXL's epsilon-prediction MSE on its
discrete scaled-linear schedule, through ComfyUI's own UNet and `encode_adm`, with min-SNR-5 loss weights. AdamW,
warmup then cosine decay, an EMA of the weights (saved in fp16). Stops after --steps steps or --minutes minutes,
whichever comes first (the cosine schedule is laid out for --steps).
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.compbench import tinyt2i, world  # noqa: E402


@functools.lru_cache(maxsize=1)
def _train_splits():
    return world.split_combos(seed=0)[0], world.split_trios(seed=0)[0]


def batch_examples(step: int, batch: int, size: int, seed: int, drop: float, worlds=("pairs",),
                   hold_out: bool = False):
    rng = np.random.default_rng([seed, step])
    pairs, trios = _train_splits() if hold_out else (None, None)
    samples = []
    for s in rng.integers(0, 2**62, size=batch):
        if worlds[int(s % len(worlds))] == "trio":
            samples.append(world.sample_trio(int(s), combos=trios, size=size))
        else:
            samples.append(world.sample(int(s), combos=pairs, size=size))
    images = np.stack([s.image for s in samples])
    captions = [s.caption if rng.random() >= drop else "" for s in samples]
    return tinyt2i.encode_images(images), captions


def guard_inplace_adds(unet: torch.nn.Module) -> None:
    """The 2024 host's transformer block adds in place (x += attn(norm(x))) after the norm saved x for backward:
    the norms get a copy, with the pack's own gate-training hook."""
    from comfyui_maskattn.nodes.gate_training import _clone_input_pre_hook, _transformer_blocks

    for block in _transformer_blocks(unet):
        for norm in (block.norm1, block.norm2):
            norm.register_forward_pre_hook(_clone_input_pre_hook)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("tiny_t2i.safetensors")))
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--minutes", type=float, default=50.0, help="wall-clock cap (CPU budget: under an hour)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--depth", default="0,1,1")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--worlds", nargs="+", default=["pairs"], choices=["pairs", "trio"],
                    help="scenes to train on, in equal shares (pairs: two objects and a relation; trio: three "
                         "objects close together)")
    ap.add_argument("--hold-out-pairings", action="store_true",
                    help="train only on the train split: the held-out colour-shape pairings are never seen")
    ap.add_argument("--init", default=None, help="continue from this tiny_t2i file (weights only; a fresh optimiser)")
    ap.add_argument("--x0-weight-cap", type=float, default=0.0,
                    help="> 0: also weight each example by min(sigma^2, cap) where sigma > 1 (the x0 error at high "
                         "noise, which decides the picture's overall colour; epsilon-MSE leaves it loose)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tinyt2i.load_host()

    cfg = tinyt2i.TinyConfig(model_channels=args.channels,
                             transformer_depth=tuple(int(d) for d in args.depth.split(",")))
    base = tinyt2i.build_base_model(cfg)
    unet = base.diffusion_model
    tinyt2i.init_unet_(unet, args.seed)
    guard_inplace_adds(unet)
    torch.manual_seed(args.seed)
    text = tinyt2i.TinyTextEncoder(cfg)
    done_before = {}
    if args.init:
        from safetensors import safe_open

        with safe_open(args.init, framework="pt") as f:
            meta = f.metadata() or {}
            if tinyt2i.TinyConfig.from_json(meta["config"]) != cfg:
                raise SystemExit(f"--init {args.init}: its config differs from --channels/--depth")
            unet.load_state_dict({k[5:]: f.get_tensor(k).float() for k in f.keys() if k.startswith("unet.")})
            text.load_state_dict({k[5:]: f.get_tensor(k).float() for k in f.keys() if k.startswith("text.")})
        done_before = {"steps": int(meta.get("steps", 0)), "seconds": int(meta.get("seconds", 0))}
    unet.train()
    text.train()
    params = list(unet.parameters()) + list(text.parameters())
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    sigmas = base.model_sampling.sigmas.float()
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 20)
    n_unet = sum(p.numel() for p in unet.parameters())
    print(f"tiny t2i: {n_params / 1e6:.2f} M parameters (UNet {n_unet / 1e6:.2f} M), "
          f"{args.steps} steps x batch {args.batch}, cap {args.minutes} min, torch threads {torch.get_num_threads()}",
          flush=True)
    start, losses, step = time.time(), [], 0
    while step < args.steps and time.time() - start < args.minutes * 60:
        x0, captions = batch_examples(step, args.batch, cfg.image_size, args.seed, drop=0.1,
                                      worlds=tuple(args.worlds), hold_out=args.hold_out_pairings)
        t = torch.randint(0, len(sigmas), (args.batch,), generator=gen)
        sigma = sigmas[t]
        noise = torch.randn(x0.shape, generator=gen)
        xt = x0 + noise * sigma[:, None, None, None]
        states, pooled = text.encode(captions)
        y = tinyt2i.size_conditions(base, pooled, cfg.image_size)
        c_in = (sigma**2 + 1).rsqrt()[:, None, None, None]
        eps = unet(xt * c_in, t.float(), context=states, y=y)
        # min-SNR-5 weighting (Hang et al. 2023): the same optimum, much faster convergence at high SNR steps
        weight = sigma.pow(-2).clamp(max=5.0) * sigma.pow(2)
        if args.x0_weight_cap > 0:
            weight = weight * sigma.pow(2).clamp(1.0, args.x0_weight_cap)
        weight = weight[:, None, None, None]
        loss = (weight * (eps.float() - noise).pow(2)).mean()
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(float(loss.detach()))
        step += 1
        if step % args.log_every == 0 or step == 1:
            recent = float(np.mean(losses[-args.log_every:]))
            print(f"step {step:5d}  loss {recent:.4f}  lr {lr:.2e}  {time.time() - start:6.0f} s", flush=True)
    elapsed = time.time() - start
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    extra = {
        "steps": step + done_before.get("steps", 0), "batch": args.batch,
        "seconds": round(elapsed) + done_before.get("seconds", 0), "seed": args.seed,
        "worlds": " ".join(args.worlds), "held_out_pairings": bool(args.hold_out_pairings),
        "phases": (f"{done_before['steps']} steps from scratch, then {step} with --x0-weight-cap "
                   f"{args.x0_weight_cap} (lr {args.lr})" if done_before else f"{step} steps from scratch"),
        "final_loss": round(float(np.mean(losses[-200:])), 5), "parameters": n_params,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }
    tinyt2i.save(args.out, cfg, unet, text, extra)
    size = Path(args.out).stat().st_size
    print(f"saved {args.out} ({size / 1e6:.1f} MB): {step} steps in {elapsed / 60:.1f} min, "
          f"final loss {extra['final_loss']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
