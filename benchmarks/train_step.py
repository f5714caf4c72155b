"""Cost of a MaskAttn gate-training step against a plain forward+backward of the same frozen model, side by side.

    python benchmarks/train_step.py                  # tiny SDXL-topology model on the CPU, 64 px
    python benchmarks/train_step.py --sdxl-size      # SDXL-size random weights, 1024 px, batch 1 (CUDA when present)

"plain": the untouched model, forward + backward to its input (the UNet frozen, as in training).
"gated": one full training step (nodes/gate_training.py): gate heads at the chosen stage, masked attention
on the differentiable path, denoising loss, backward to the gates, clipping and the AdamW update.
Rounds are interleaved so drift hits both alike; prints the median seconds, the ratio and the peak memory (CUDA:
max allocated; CPU: not measured). Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import device_name, interleaved, print_table  # noqa: E402


def build_model(sdxl_size: bool, dtype, device):
    """An SDXL-architecture ModelPatcher with random weights: real SDXL size, or a tiny one (channels 32)."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    from cli.tiny_models import init_random_weights_, sdxl_unet_config

    channels, depth, context, heads_ch = (320, (0, 2, 10), 2048, 64) if sdxl_size else (32, (0, 2, 2), 64, 16)
    cfg = dict(sdxl_unet_config(channels, depth, context, pooled_dim=1280 if sdxl_size else None), dtype=dtype)
    model_config = comfy.supported_models.SDXL(cfg)
    model_config.unet_config["num_head_channels"] = heads_ch
    model_config.set_inference_dtype(dtype, None)
    base = comfy.model_base.SDXL(model_config, device=device)
    init_random_weights_(base.diffusion_model, 0)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdxl-size", action="store_true", help="SDXL-size random weights (channels 320, depth 0/2/10)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 64 tiny, 1024 sdxl-size)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--stage", default="mid", choices=["mid", "high", "low", "all"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="model weights (default: bfloat16 on CUDA, float32 on the CPU)",
    )
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--head", default="reference", choices=["reference", "context"], help="gate head to train")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: as cli/host.py finds it)")
    args = ap.parse_args(argv)

    from cli.host import load_host, register_pack

    register_pack()
    host = load_host(args.comfyui)
    from comfyui_maskattn.masks.train import GateTrainer, TrainConfig
    from comfyui_maskattn.nodes import gate_training as T
    from comfyui_maskattn.nodes.training_examples import prepare_examples

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    size = args.size or (1024 if args.sdxl_size else 64)
    model = build_model(args.sdxl_size, dtype, device)
    ctx_dim = int(model.model.model_config.unet_config["context_dim"])
    pooled_dim = int(model.model.model_config.unet_config["adm_in_channels"]) - 1536
    gen = torch.Generator().manual_seed(0)
    n = max(2, args.batch)
    latent = {"samples": torch.randn(n, 4, size // 8, size // 8, generator=gen)}
    conds = [
        [
            torch.randn(1, 77, ctx_dim, generator=gen),
            {"pooled_output": torch.randn(1, pooled_dim, generator=gen), "width": size, "height": size},
        ]
        for _ in range(n)
    ]
    examples = prepare_examples(model, latent, conds, device=device)
    gates = T.new_gates(model, args.stage, "encoder_decoder", 128, seed=0, head=args.head)
    config = TrainConfig(steps=10**6, batch_size=args.batch, lr=1e-4, head=args.head)

    with T.TrainingSession(model, gates, device, gradient_checkpointing=args.gradient_checkpointing) as session:
        trainer = GateTrainer(gates.heads, config, device=session.device)
        loss_fn = session.loss_fn(examples, args.batch)
        objective = session.objective
        plain_options = model.model_options.get("transformer_options", {})

        def plain():
            x0, context, extras = examples.batch(torch.arange(args.batch))
            sigma = objective.sigma_table[torch.full((args.batch,), len(objective.sigma_table) // 2)].to(device)
            xt = objective.noisy(sigma, torch.randn(x0.shape), x0).requires_grad_(True)
            with torch.enable_grad():
                out = model.model.apply_model(
                    xt, sigma, c_crossattn=context, transformer_options=dict(plain_options), **extras
                )
                (out.float() - x0).pow(2).mean().backward()

        def gated():
            trainer.train_step(loss_fn)

        cases = {"plain forward+backward": plain, f"gated training step ({args.stage}, {args.head})": gated}
        times, peaks = interleaved(cases, args.rounds, warmup=2)
    print(
        f"device: {device_name()}; weights {dtype}; {'SDXL-size' if args.sdxl_size else 'tiny'} random UNet; "
        f"{size}x{size}px, batch {args.batch}; {len(gates.site_heads)} gated layers; median of {args.rounds} "
        f"interleaved rounds; host {host}"
    )
    print_table(times, peaks, "plain forward+backward", unit="s/step", width=34)
    print(f"time per 1k gated steps: {statistics.median(times[list(cases)[1]]) * 1000 / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
