"""Sampling-time cost of MaskAttn, measured side by side in one process through ComfyUI's real KSampler path.

    python benchmarks/sampling_overhead.py                 # tiny SDXL-topology model on the CPU
    python benchmarks/sampling_overhead.py --sdxl-size     # SDXL-size random weights (on CUDA when present)

Prints, for the untouched model and the patched model (mid stage, all stages): median seconds per sampling run,
the ratio to untouched, and peak memory; rounds are interleaved so drift hits every case alike. Timings are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import busy_time, device_name, interleaved, paired_ratio, print_table  # noqa: E402


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
    ap.add_argument("--low-precision-gate", action="store_true",
                    help="also time the fast path with the gate in the model's dtype (low_precision_gate.py), with "
                         "and without the sync; only where the model is not float32")
    ap.add_argument("--graphs", action="store_true",
                    help="also time the gate replayed as a CUDA graph (GraphExecutor; on the CPU its eager "
                         "replay on the same fixed buffers), and print how many gate calls took each path")
    ap.add_argument("--device-skip", action="store_true",
                    help="also time the exact path without a host sync (device_skip executors: both the masked "
                         "and the unmasked attention run, a device-side select keeps the right one); with --graphs "
                         "also the two combined")
    ap.add_argument("--decompose", action="store_true",
                    help="also time 'hook only' (the patches installed, no gate, no mask) and 'mask only' (a constant "
                         "all-zero bias: the masked attention kernel without the gate)")
    ap.add_argument("--check", action="store_true",
                    help="after timing, sample once more per case and compare the final latents: bit-identical to "
                         "the straightforward path where they must be, max difference where not, NaN/inf anywhere")
    ap.add_argument("--flip-rate", action="store_true",
                    help="sample once per stage and count, on the real features, the gate decisions a float16 or "
                         "bfloat16 gate makes differently from the float32 one")
    ap.add_argument("--count-ops", action="store_true",
                    help="also count torch operator calls per run (noise-free; on a GPU the gate costs launches)")
    ap.add_argument("--breakdown", action="store_true",
                    help="CPU: split one run of each default case (and of the untouched model) into gate, attention "
                         "calls and hook bookkeeping, with wall-clock timers around each (on CUDA see --profile)")
    ap.add_argument("--device-time", action="store_true",
                    help="profile one run per case and print the time the device worked (the union of its kernels' "
                         "spans; on the CPU, of the torch operators'), per step and against the untouched model's "
                         "wall time: the floor a case cannot beat however cheap its host side gets")
    ap.add_argument("--no-zero-shot", action="store_true",
                    help="leave out the zero-shot rows (v1 and v2 at mid and all, v2 with self-attention masking at "
                         "mid; gated from the first step, the most they can cost)")
    ap.add_argument("--no-context", action="store_true",
                    help="leave out the learned context gate rows (masks/context.py: fresh heads at mid and all, "
                         "gated from the first step)")
    ap.add_argument("--profile", action="store_true",
                    help="print a torch.profiler table of one run of the default mid-stage case (and of the "
                         "CUDA-graph one with --graphs)")
    args = ap.parse_args(argv)

    from cli import host, tiny_models

    cuda = torch.cuda.is_available()
    host_path = host.load_host(cpu=not cuda)  # first load decides: GPU when present
    from comfyui_maskattn.masks.gates import MaskAttnGates
    from comfyui_maskattn.masks.topology import select_sites
    from comfyui_maskattn.masks.runtime import EagerExecutor
    from comfyui_maskattn.nodes import hooks
    from comfyui_maskattn.nodes.executor import CUDA_GATE_DEFAULT, cuda_gate_variant
    from low_precision_gate import LowPrecisionExecutor

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if cuda else torch.float32)
    pos = neg = clip = None
    if args.compbench:
        from benchmarks.compbench import tinyt2i

        model, clip, _, _ = tinyt2i.load(ROOT / "benchmarks" / "compbench" / "tiny_t2i.safetensors")
        pos = clip.conditioning(["a red circle to the left of a blue square"])
        neg = clip.conditioning([""])
        size = 8 * 32  # ksample's width in pixels: the latent is 32x32
    elif args.sdxl_size:
        model = tiny_models.tiny_sdxl(seed=0, transformer_depth=(0, 2, 10), context_dim=2048, dtype=dtype,
                                      model_channels=320, num_head_channels=64, device="cuda" if cuda else None)
        size = args.size or 1024
    else:
        model = tiny_models.tiny_sdxl(seed=0, transformer_depth=(0, 2, 10), dtype=dtype,
                                      device="cuda" if cuda else None)
        size = args.size or 128
    if pos is None:
        pos, neg = tiny_models.make_cond(model, seed=1), tiny_models.make_cond(model, seed=2)

    hidden = args.hidden or (128 if args.sdxl_size or args.compbench else 16)
    sites = hooks.model_sites(model)
    cases = {"untouched": model}
    groups = {}  # stage -> {variant: case name}, for --check
    runtimes = {}  # case name -> GateRuntime
    low_precision = args.low_precision_gate and dtype != torch.float32

    def add(stage, variant, name, gates, chosen, setup=None):
        patched, runtime = hooks.install(model, gates, chosen, threshold=0.5, negative_value=-1e4)
        if variant != "fast":  # only the default case takes $MASKATTN_CUDA_GATE's variant; the others set theirs
            runtime.executor = EagerExecutor()
        if setup is not None:
            setup(runtime)
        cases[name], runtimes[name] = patched, runtime
        groups.setdefault(stage, {})[variant] = name

    for stage in ("mid", "all"):
        chosen = select_sites(sites, stage, "encoder_decoder")
        gates = MaskAttnGates.fresh(chosen, hidden_dim=hidden, seed=0, stage=stage)
        add(stage, "fast", f"maskattn {stage} ({len(chosen)} layers)", gates, chosen)
        if args.decompose:
            add(stage, "hook only", f"  hook only {stage}", gates, chosen, _no_gate)
            add(stage, "mask only", f"  mask only {stage}", gates, chosen, _zero_bias)
        if args.graphs:
            add(stage, "cuda graph", f"  cuda-graph gate {stage}", gates, chosen, _variant("graphs"))
        if args.device_skip:
            add(stage, "device skip", f"  device-skip {stage}", gates, chosen, _variant("device_skip"))
            if args.graphs:
                add(stage, "cuda graph device skip", f"  cuda-graph device-skip {stage}", gates, chosen,
                    _variant("graphs+device_skip"))
        if low_precision:
            add(stage, "low-precision gate", f"  {dtype_name(dtype)} gate {stage}", gates, chosen,
                lambda rt: setattr(rt, "executor", LowPrecisionExecutor(dtype)))
        if args.sync_free:
            add(stage, "sync-free", f"  sync-free {stage}", gates, chosen,
                lambda rt: setattr(rt, "skip_unmasked", False))
            if low_precision:
                add(stage, "sync-free low-precision", f"  sync-free {dtype_name(dtype)} gate {stage}", gates, chosen,
                    lambda rt: (setattr(rt, "skip_unmasked", False),
                                setattr(rt, "executor", LowPrecisionExecutor(dtype))))
        if args.straightforward or args.check:  # the spec path line by line, as before the speed work
            add(stage, "straightforward", f"  straightforward {stage}", gates, chosen, _straightforward)

    if not args.no_zero_shot:
        for name, patched in zero_shot_cases(model, sites, pos, clip if args.compbench else None).items():
            cases[name] = patched
    if not args.no_context:
        for name, patched in context_cases(model, sites, hidden).items():
            cases[name] = patched

    def run(m):
        return tiny_models.ksample(m, pos, neg, steps=args.steps, cfg=5.0, width=size, height=size, batch=args.batch)

    # warm-up loads the weights and builds caches
    times, peaks = interleaved({name: (lambda m=m: run(m)) for name, m in cases.items()}, args.rounds)
    print(f"device: {device_name()}; dtype {dtype}; {size}x{size}px (latent /8), batch {args.batch}, "
          f"{args.steps} steps, cfg 5 (cond+uncond batch), gate hidden size {hidden}, median of {args.rounds} "
          f"interleaved rounds; host {host_path}"
          + (f"; default gate variant on CUDA: {cuda_gate_variant()}" if cuda else ""))
    print_table(times, peaks, "untouched")
    if args.graphs:
        print("gate calls by path: " + "; ".join(
            f"{name.strip()}: {rt.stats['graph']} graph, {rt.stats['eager']} eager"
            + (f" (capture failed: {rt.executor.graphs.failed})" if getattr(rt.executor, "graphs", None) is not None
               and rt.executor.graphs.failed else "")
            for name, rt in runtimes.items() if "graph" in name or name.startswith("maskattn")))
    print_fastest_exact(times, groups, cuda_gate_variant() if cuda else CUDA_GATE_DEFAULT)
    if args.check:
        check_latents(cases, groups, run_latent=lambda m: run(m))
    if args.device_time:
        try:
            # (the reference gate's variants; the zero-shot and context rows are timed above)
            learned = {n: m for n, m in cases.items() if not n.startswith(("zero-shot", "learned context"))}
            print_device_time(learned, times, run, args.steps)
        except Exception as error:  # a profiler that cannot trace this device must not cost the rest of the report
            print(f"device time: the profiler failed ({type(error).__name__}: {error})")
    if args.flip_rate:
        for stage in ("mid", "all"):
            chosen = select_sites(sites, stage, "encoder_decoder")
            gates = MaskAttnGates.fresh(chosen, hidden_dim=hidden, seed=0, stage=stage)
            patched, runtime = hooks.install(model, gates, chosen, threshold=0.5, negative_value=-1e4)
            counts = count_flips(runtime, (torch.float16, torch.bfloat16))
            run(patched)
            print(f"flip rate, {stage} stage (fresh gates, float32 decisions as reference): " + "; ".join(
                f"{dtype_name(dt)} gate {c['pairs'] / max(c['total'], 1):.2e} of pairs, "
                f"{c['rows'] / max(c['row_total'], 1):.2e} of rows change" for dt, c in counts.items()))
    if args.count_ops:
        from torch.profiler import ProfilerActivity, profile

        counts = {}
        for name, m in cases.items():
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                run(m)
            events = prof.events()
            counts[name] = (sum(1 for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU"),
                            sum(1 for e in events if e.device_type.name == "CUDA"))
        print(f"{'case':32s} {'aten ops/run':>12s} {'extra':>8s} {'kernels/run':>12s} {'extra':>8s}")
        ops0, kernels0 = counts["untouched"]
        for name, (ops, kernels) in counts.items():
            print(f"{name:32s} {ops:12d} {ops - ops0:8d} {kernels:12d} {kernels - kernels0:8d}")
    if args.breakdown and not cuda:
        default = {name: m for name, m in cases.items() if name == "untouched" or name.startswith("maskattn")}
        print_breakdown(default, runtimes, run)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        profiled = ("cuda-graph gate mid", "cuda-graph device-skip mid")
        for name in [n for n in cases if n.startswith("maskattn mid") or n.strip() in profiled]:
            with profile(activities=acts) as prof:
                run(cases[name])
            print(f"profile of one run of '{name.strip()}':")
            print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                            row_limit=25))
    return 0


def zero_shot_cases(model, sites, pos, clip=None) -> dict:
    """Zero-shot gates (v1: partition "layer"; v2: "aggregate") installed as Apply MaskAttn installs them, gated from
    the first step, keeping the run's aggregate, regions and leakage as they always do. Two groups: with the
    compbench model's CLIP the node builds them from its prompt; on the random models tokens 2-3 and 7-8 of the 77
    ("a red book and a yellow vase") are the groups. "v2 + layout": the prompt's layout ("... to the left of ..."),
    the places alone before 0.2 of the schedule, then combined with the aggregate, as Apply MaskAttn sets it."""
    from comfyui_maskattn.masks.layout import parse_layout
    from comfyui_maskattn.masks.topology import select_sites
    from comfyui_maskattn.masks.prompt import group_prompt
    from comfyui_maskattn.masks.source import HANDOVER_SIGMA
    from comfyui_maskattn.masks.zeroshot import ZeroShotGates
    from comfyui_maskattn.nodes import hooks

    text = "a red circle to the left of a blue square" if clip is not None else "a red book and a yellow vase"
    placed = "a red book to the left of a yellow vase"  # the random models' layout case: groups at 2-3 and 9-10
    tokens = pos[0][0].shape[1]

    def gates(stage, layout=False, **options):
        if clip is not None:
            from comfyui_maskattn.nodes.zeroshot import MaskAttnZeroShotGates

            node = MaskAttnZeroShotGates()
            start = 0.2 if layout else 0.0
            return node.build(clip, text, stage, start, "", layout="from the prompt" if layout else "off",
                              **options)["result"][0]
        token_groups = [-1] * tokens
        token_groups[2:4] = [0, 0]
        if layout:
            token_groups[9:11] = [1, 1]
        else:
            token_groups[7:9] = [1, 1]
        grouping = group_prompt(placed if layout else text)
        kinds = ["start"] + ["text"] * (11 if layout else 9) + ["end"] * (tokens - (12 if layout else 10))
        return ZeroShotGates(grouping, token_groups, stage=stage, start_percent=0.2 if layout else 0.0,
                             token_kinds=kinds, layout=parse_layout(grouping) if layout else None, **options)

    out = {}
    for stage, label, options in (("mid", "v1", {"partition": "layer"}),
                                  ("mid", "v2", {"partition": "aggregate"}),
                                  ("mid", "v2 + self-attention", {"partition": "aggregate",
                                                                  "self_attention": "separate_groups"}),
                                  ("mid", "v2 + layout", {"partition": "aggregate", "layout": True}),
                                  ("all", "v1", {"partition": "layer"}), ("all", "v2", {"partition": "aggregate"}),
                                  ("all", "v2 + layout", {"partition": "aggregate", "layout": True})):
        g = gates(stage, **options)
        g.check_fits(sites)
        chosen = [s for s in select_sites(sites, stage, "encoder_decoder") if g.covers(s.key)]
        patched, _ = hooks.install(model, g, chosen, threshold=0.5, negative_value=-1e4)
        if g.handover_percent is not None:  # as Apply MaskAttn hands it over
            handover = float(model.model.model_sampling.percent_to_sigma(g.handover_percent))
            patched.model_options.setdefault("transformer_options", {})[HANDOVER_SIGMA] = handover
        out[f"zero-shot {label} {stage} ({len(chosen)} layers)"] = patched
    return out


def context_cases(model, sites, hidden: int) -> dict:
    """Learned context gates (fresh heads) installed as Apply MaskAttn installs them, gated from the first step: the
    reference gate plus the per-token aggregate each gated layer reads and feeds, the work zero-shot v2 also does."""
    from comfyui_maskattn.masks.context import ContextGates
    from comfyui_maskattn.masks.topology import select_sites
    from comfyui_maskattn.nodes import hooks

    out = {}
    for stage in ("mid", "all"):
        chosen = select_sites(sites, stage, "encoder_decoder")
        gates = ContextGates.fresh(chosen, hidden_dim=hidden, seed=0, stage=stage)
        patched, _ = hooks.install(model, gates, chosen, threshold=0.5, negative_value=-1e4)
        out[f"learned context {stage} ({len(chosen)} layers)"] = patched
    return out


def print_breakdown(cases, runtimes, run, runs: int = 3):
    """Where the extra time of a patched run goes (CPU, one thread: wall time is the work): timers around the gate,
    the host's attention calls and the two hook objects, each counting its own time only (a timed call inside another
    is subtracted from the outer one), so "hooks" is the bookkeeping of the patch and the replace themselves. Means
    over `runs` runs after a warm-up."""
    import time

    import comfy.ldm.modules.attention as attention
    from comfyui_maskattn.nodes.containers import MaskAttnAttention
    from comfyui_maskattn.nodes.gate_patch import MaskAttnGatePatch

    spent: dict[str, list] = {}
    stack: list[float] = []  # time spent in timed calls nested in the open ones

    def timed(fn, label):
        def wrapper(*args, **kwargs):
            stack.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t
                entry = spent.setdefault(label, [0.0, 0])
                entry[0] += elapsed - stack.pop()
                entry[1] += 1
                if stack:
                    stack[-1] += elapsed
        return wrapper

    targets = [(attention, "optimized_attention", "attention"), (attention, "optimized_attention_masked", "attention"),
               (MaskAttnGatePatch, "__call__", "hooks"), (MaskAttnAttention, "__call__", "hooks")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
    rows = {}
    try:
        for obj, name, label in targets:
            setattr(obj, name, timed(getattr(obj, name), label))
        for name, model in cases.items():
            runtime = runtimes.get(name)
            if runtime is not None:
                runtime.executor.bias = timed(runtime.executor.bias, "gate")
            run(model)
            spent.clear()
            t = time.perf_counter()
            for _ in range(runs):
                run(model)
            rows[name] = ((time.perf_counter() - t) / runs, {k: (v[0] / runs, v[1] // runs) for k, v in spent.items()})
            if runtime is not None:
                del runtime.executor.bias
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    base_total, base = rows.pop("untouched")
    base_attention = base["attention"][0]
    print(f"breakdown (ms per run, mean of {runs}; untouched {base_total * 1e3:.1f} ms, of which attention "
          f"{base_attention * 1e3:.1f} ms):")
    for name, (total, parts) in rows.items():
        gate, calls = parts.get("gate", (0.0, 0))
        extra_attention = parts["attention"][0] - base_attention
        own = parts.get("hooks", (0.0, 0))[0]
        rest = total - base_total - gate - extra_attention - own
        print(f"  {name.strip()}: {(total - base_total) * 1e3:+.1f} ms = gate {gate * 1e3:.1f} "
              f"({gate / max(calls, 1) * 1e6:.0f} us x {calls}) + attention {extra_attention * 1e3:+.1f} + hooks "
              f"{own * 1e3:.1f} + rest {rest * 1e3:+.1f}")


def print_device_time(cases, times, run, steps: int):
    """Per case (the spec path aside), from one profiled run: how long the device worked per step (the union of its
    kernels' spans, memory copies included) and how many kernels it ran, against the untouched model's median wall
    time from the timed rounds. "floor" = busy / untouched wall: the least ratio the case can reach even if its
    host-side work were free; a case whose timed ratio sits well above its floor is host-bound. On the CPU the
    "device" is the torch operators (their union; the rest is Python), inflated by the profiler's own cost per
    operator, so there the columns only compare cases. Kernels a CUDA graph replays count only if the profiler reports
    them: a graph case whose kernels/step is well below its eager twin's was under-counted."""
    import statistics

    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    kind, unit = ("CUDA", "kernels") if cuda else ("CPU", "ops")
    wall = statistics.median(times["untouched"])
    print(f"device time ({'CUDA kernels' if cuda else 'CPU: torch operators, profiler-inflated'}, one profiled run "
          f"per case; floor = busy / untouched wall of {wall / steps * 1e3:.1f} ms per step):")
    print(f"  {'case':32s} {'busy ms/step':>12s} {unit + '/step':>12s} {'floor':>6s} {'busy/own wall':>13s}")
    for name, model in cases.items():
        if name.strip().startswith("straightforward"):
            continue
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            run(model)
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == kind]
        busy = busy_time(spans) / 1e6  # (microseconds)
        print(f"  {name.strip():32s} {busy / steps * 1e3:12.2f} {len(spans) / steps:12.0f} {busy / wall:6.3f} "
              f"{busy / statistics.median(times[name]):13.0%}")


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _no_gate(runtime):
    runtime.bias = lambda *args, **kwargs: None


def _zero_bias(runtime):
    from comfyui_maskattn.masks.runtime import bias_from_gate

    cache = {}

    def bias(key, features, context, rows=None, info=None):
        shape = (features.shape[0], features.shape[1], context.shape[1], features.dtype, features.device)
        if shape not in cache:
            hard = torch.ones(shape[:3], dtype=torch.bool, device=features.device)
            cache[shape] = bias_from_gate(hard, features.dtype, -1e4, padded=features.is_cuda)
        return cache[shape]

    runtime.bias = bias


def _straightforward(runtime):
    runtime.bias = types.MethodType(
        lambda self, key, f, c, rows=None, info=None: self.usable(self.compute(key, f, c, rows, info)), runtime)


def _variant(name: str):
    """Setup for the case that runs the exact variant $MASKATTN_CUDA_GATE calls `name`."""
    from comfyui_maskattn.nodes.executor import CUDA_GATE_VARIANTS

    return lambda rt: setattr(rt, "executor", CUDA_GATE_VARIANTS[name]())


# bit for bit the spec path; the names $MASKATTN_CUDA_GATE gives them ("fast" is the default case: whichever runs)
EXACT_VARIANTS = {"fast": None, "cuda graph": "graphs", "device skip": "device_skip",
                  "cuda graph device skip": "graphs+device_skip"}


def print_fastest_exact(times, groups, default_variant: str):
    """The exact variant with the lowest paired ratio per stage, and overall (the lowest geometric mean over the
    stages, as $MASKATTN_CUDA_GATE names it): the candidate for the default on this device."""
    picks, ratios = [], {}
    for stage, variants in groups.items():
        ratios[stage] = {variant: paired_ratio(times[name], times["untouched"])
                         for variant, name in variants.items() if variant in EXACT_VARIANTS}
        best = min(ratios[stage], key=ratios[stage].get)
        picks.append(f"{stage}: {best} ({ratios[stage][best]:.3f}x paired)")
    print("fastest exact variant: " + "; ".join(picks))
    common = set.intersection(*(set(r) for r in ratios.values()))
    score = {v: math.prod(r[v] for r in ratios.values()) ** (1 / len(ratios)) for v in common}
    best = min(score, key=score.get)
    print(f"fastest exact variant overall: {EXACT_VARIANTS[best] or default_variant} ({score[best]:.3f}x geometric "
          f"mean of the stages' paired ratios)")


def check_latents(cases, groups, run_latent):
    """One more sampling run per case: which variants give bit-identical latents, and how far the others are."""
    latents = {name: run_latent(m).float().cpu() for name, m in cases.items()}
    again = run_latent(cases["untouched"]).float().cpu()
    print("check (final latents):")
    print(f"  untouched run twice: max |diff| {float((again - latents['untouched']).abs().max()):.3g}")
    bad = [name for name, x in latents.items() if not torch.isfinite(x).all()]
    print(f"  non-finite latents: {', '.join(bad) if bad else 'none'}")
    for stage, variants in groups.items():
        ref_name = variants.get("straightforward")
        if ref_name is None:
            continue
        ref = latents[ref_name]
        for variant, name in variants.items():
            if variant == "straightforward":
                continue
            # the decomposition cases gate nothing: they are compared with the untouched model
            other = "untouched" if variant in ("hook only", "mask only") else "straightforward"
            target = latents["untouched"] if other == "untouched" else ref
            diff = float((latents[name] - target).abs().max())
            same = "bit-identical" if torch.equal(latents[name], target) else f"max |diff| {diff:.3g}"
            print(f"  {stage} {variant} vs {other}: {same}")
        print(f"  {stage} straightforward vs untouched: max |diff| "
              f"{float((ref - latents['untouched']).abs().max()):.3g} (the gates act)")


def count_flips(runtime, dtypes):
    """Wrap runtime.bias: beside each float32 decision, make the low-precision ones from the same inputs and
    count the (location, token) pairs and the locations whose kept set differs."""
    import dataclasses

    from comfyui_maskattn.masks.runtime import EagerExecutor
    from low_precision_gate import LowPrecisionExecutor

    def shadow(executor):  # the same gates and settings, never skipping, with its own caches
        return dataclasses.replace(runtime, skip_unmasked=False, executor=executor, observers=[])

    shadows = {dt: shadow(LowPrecisionExecutor(dt)) for dt in dtypes}
    counts = {dt: {"pairs": 0, "total": 0, "rows": 0, "row_total": 0} for dt in dtypes}
    exact = shadow(EagerExecutor())
    original = runtime.bias

    def bias(key, features, context, cond_rows=None, info=None):
        reference = exact.bias(key, features, context, cond_rows) != 0
        for dt, shadow in shadows.items():
            differs = (shadow.bias(key, features, context, cond_rows) != 0) != reference
            c = counts[dt]
            c["pairs"] += int(differs.sum())
            c["total"] += differs.numel()
            c["rows"] += int(differs.any(-1).sum())
            c["row_total"] += differs[..., 0].numel()
        return original(key, features, context, cond_rows, info)

    runtime.bias = bias
    return counts


if __name__ == "__main__":
    raise SystemExit(main())
