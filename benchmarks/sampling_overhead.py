"""Sampling-time cost of MaskAttn, measured side by side in one process through ComfyUI's real KSampler path.

    python benchmarks/sampling_overhead.py                 # tiny SDXL-topology model on the CPU
    python benchmarks/sampling_overhead.py --sdxl-size     # SDXL-size random weights (on CUDA when present)

Prints, for the untouched model and the patched model (mid stage, all stages): median seconds per sampling run,
the ratio to untouched, and peak memory; rounds are interleaved so drift hits every case alike. Timings are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import device_name, interleaved, print_table  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdxl-size", action="store_true", help="model_channels 320, depth (0,2,10), context 2048")
    ap.add_argument("--compbench", action="store_true",
                    help="the trained tiny model of benchmarks/compbench (32x32 pixel latents, 11 cross-attention "
                         "layers) with its own text encoder, gate hidden size 128; always float32 on the CPU")
    ap.add_argument("--batch", type=int, default=1, help="images per sampling run")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 128 tiny, 1024 sdxl-size)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=None,
                    help="gate hidden size (default: 128, the method's, for --sdxl-size; 16 for the tiny model, which "
                         "keeps SDXL's gate-to-layer proportion h/C ~ 0.1: the tiny mid stage has C = 128)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--straightforward", action="store_true", help="also time the unoptimised spec path")
    ap.add_argument("--sync-free", action="store_true",
                    help="also time the fast path without its one host sync per gated layer (skip_unmasked=False: "
                         "all-open layers then run the masked kernel with a zero bias instead of the plain one)")
    ap.add_argument("--count-ops", action="store_true",
                    help="also count torch operator calls per run (noise-free; on a GPU the gate costs launches)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one patched run")
    args = ap.parse_args(argv)

    import comfy_host

    cuda = torch.cuda.is_available()
    comfy_host._bootstrap.load_host(comfy_host.HOST_PATH, cpu=not cuda)  # first load decides: GPU when present
    comfy_host.load_host()
    from comfyui_maskattn.masks.gates import MaskAttnGates
    from comfyui_maskattn.masks.topology import select_sites
    from comfyui_maskattn.nodes import hooks

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if cuda else torch.float32)
    pos = neg = None
    if args.compbench:
        from benchmarks.compbench import tinyt2i

        model, clip, _, _ = tinyt2i.load(ROOT / "benchmarks" / "compbench" / "tiny_t2i.safetensors")
        pos = clip.conditioning(["a red circle to the left of a blue square"])
        neg = clip.conditioning([""])
        size = 8 * 32  # ksample's width in pixels: the latent is 32x32
    elif args.sdxl_size:
        model = comfy_host.tiny_sdxl(seed=0, transformer_depth=(0, 2, 10), context_dim=2048, dtype=dtype,
                                     model_channels=320, num_head_channels=64, device="cuda" if cuda else None)
        size = args.size or 1024
    else:
        model = comfy_host.tiny_sdxl(seed=0, transformer_depth=(0, 2, 10), dtype=dtype,
                                     device="cuda" if cuda else None)
        size = args.size or 128
    if pos is None:
        pos, neg = comfy_host.make_cond(model, seed=1), comfy_host.make_cond(model, seed=2)

    hidden = args.hidden or (128 if args.sdxl_size or args.compbench else 16)
    sites = hooks.model_sites(model)
    cases = {"untouched": model}
    for stage in ("mid", "all"):
        chosen = select_sites(sites, stage, "encoder_decoder")
        gates = MaskAttnGates.fresh(chosen, hidden_dim=hidden, seed=0, stage=stage)
        cases[f"maskattn {stage} ({len(chosen)} layers)"] = hooks.install(
            model, gates, chosen, threshold=0.5, negative_value=-1e4)[0]
        if args.sync_free:
            patched, runtime = hooks.install(model, gates, chosen, threshold=0.5, negative_value=-1e4)
            runtime.skip_unmasked = False
            cases[f"  sync-free {stage}"] = patched
        if args.straightforward:  # the spec path line by line, as before the speed work
            patched, runtime = hooks.install(model, gates, chosen, threshold=0.5, negative_value=-1e4)
            runtime.bias = types.MethodType(
                lambda self, key, f, c, rows=None, info=None: self.usable(self.compute(key, f, c, rows, info)), runtime)
            cases[f"  straightforward {stage}"] = patched

    def run(m):
        comfy_host.ksample(m, pos, neg, steps=args.steps, cfg=5.0, width=size, height=size, batch=args.batch)

    # warm-up loads the weights and builds caches
    times, peaks = interleaved({name: (lambda m=m: run(m)) for name, m in cases.items()}, args.rounds)
    print(f"device: {device_name()}; dtype {dtype}; {size}x{size}px (latent /8), batch {args.batch}, "
          f"{args.steps} steps, cfg 5 (cond+uncond batch), gate hidden size {hidden}, median of {args.rounds} "
          f"interleaved rounds; host {comfy_host.HOST_PATH}")
    print_table(times, peaks, "untouched")
    if args.count_ops:
        from torch.profiler import ProfilerActivity, profile

        counts = {}
        for name, m in cases.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(m)
            counts[name] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        print(f"{'case':32s} {'aten ops/run':>12s} {'extra':>8s}")
        for name, n in counts.items():
            print(f"{name:32s} {n:12d} {n - counts['untouched']:8d}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            run(list(cases.values())[-1])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
