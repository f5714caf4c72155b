"""The CUDA half of the correctness checks (the test suite runs on the CPU): run once on a GPU machine.

    python benchmarks/cuda_check.py

Through ComfyUI's KSampler on a tiny random SDXL-topology model on CUDA, in float16 and bfloat16:
- parity: gates that keep every pair give the untouched model's latents, bit for bit;
- the fast path gives the straightforward spec path's latents, bit for bit (eager, CUDA graph, skip decided on the
  device);
- no NaN/inf and no collapsed (black) output with gating on;
and, on the raw pieces: the padded bias has the same values as the plain one, and SDPA gives the same output
with either. Prints one PASS/FAIL line per check; exits 1 if any failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampling_overhead import _straightforward  # noqa: E402

failures: list[str] = []


def check(name: str, ok: bool, detail: str = ""):
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    dry_run = "--cpu" in args  # the same checks on the CPU, to test this script
    # --quick: sample at 128 px, 2 steps (gpu_check.sh's own dry run, which tests the script, not these checks: a
    # CPU without fast bf16 takes minutes per host at the full 256 px, 4 steps)
    side, steps = (128, 2) if "--quick" in args else (256, 4)
    if not dry_run and not torch.cuda.is_available():
        print("cuda_check: no CUDA device here; nothing to check (--cpu runs the checks on the CPU)")
        return 0
    dev = "cpu" if dry_run else "cuda"
    from cli import host, tiny_models

    host_path = host.load_host(cpu=dry_run)
    from comfyui_maskattn.masks.gates import MaskAttnGates
    from comfyui_maskattn.masks.runtime import EXECUTORS, GraphExecutor, bias_from_gate
    from comfyui_maskattn.masks.topology import select_sites
    from comfyui_maskattn.nodes import hooks

    name = "cpu (dry run)" if dry_run else torch.cuda.get_device_name()
    print(f"device {name}, torch {torch.__version__}, host {host_path}")
    hard = torch.rand(2, 1024, 77, device=dev) > 0.5
    for dtype in (torch.float16, torch.bfloat16):
        plain = bias_from_gate(hard, dtype, -1e4)
        padded = bias_from_gate(hard, dtype, -1e4, padded=True)
        check(f"padded bias values ({dtype})", torch.equal(plain, padded))
        q = torch.randn(2, 10, 1024, 64, device=dev, dtype=dtype)
        k, v = torch.randn(2, 10, 77, 64, device=dev, dtype=dtype), torch.randn(2, 10, 77, 64, device=dev,
                                                                                      dtype=dtype)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=plain.unsqueeze(1))
        b = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=padded.unsqueeze(1))
        check(f"SDPA output with the padded mask ({dtype})", torch.equal(a, b) and bool(torch.isfinite(b).all()),
              f"max |diff| {float((a - b).abs().max()):.3g}")

    for dtype in (torch.float16, torch.bfloat16):
        model = tiny_models.tiny_sdxl(seed=0, transformer_depth=(0, 2, 2), dtype=dtype, device=dev)
        pos, neg = tiny_models.make_cond(model, seed=1), tiny_models.make_cond(model, seed=2)

        def sample(m):
            return tiny_models.ksample(m, pos, neg, steps=steps, cfg=5.0, width=side, height=side).float().cpu()

        base = sample(model)
        chosen = select_sites(hooks.model_sites(model), "all", "encoder_decoder")
        open_gates = MaskAttnGates.fresh(chosen, hidden_dim=16, seed=0, stage="all")
        with torch.no_grad():
            for head in open_gates.heads:
                head.logit_bias.fill_(30.0)  # sigmoid > 0.5 everywhere: every pair kept
        kept_all = sample(hooks.install(model, open_gates, chosen, threshold=0.5, negative_value=-1e4)[0])
        check(f"all-kept gates == untouched ({dtype})", torch.equal(kept_all, base))

        gates = MaskAttnGates.fresh(chosen, hidden_dim=16, seed=0, stage="all")
        fast = sample(hooks.install(model, gates, chosen, threshold=0.5, negative_value=-1e4)[0])
        patched, runtime = hooks.install(model, gates, chosen, threshold=0.5, negative_value=-1e4)
        _straightforward(runtime)
        slow = sample(patched)
        check(f"fast path == straightforward path ({dtype})", torch.equal(fast, slow),
              f"max |diff| {float((fast - slow).abs().max()):.3g}")
        patched, runtime = hooks.install(model, gates, chosen, threshold=0.5, negative_value=-1e4)
        runtime.executor = GraphExecutor()
        replayed = sample(patched)
        check(f"CUDA-graph gate == straightforward path ({dtype})",
              torch.equal(replayed, slow) and runtime.stats["graph"] > 0 and runtime.stats["eager"] == 0,
              f"max |diff| {float((replayed - slow).abs().max()):.3g}, calls {runtime.stats}, "
              f"capture failure: {runtime.executor.graphs.failed}")
        # a head per layer: one graph each, sharing the feature and bias buffers of their shape
        per_layer = MaskAttnGates.fresh(chosen, hidden_dim=16, share_by_stage=False, seed=0, stage="all")
        patched, runtime = hooks.install(model, per_layer, chosen, threshold=0.5, negative_value=-1e4)
        _straightforward(runtime)
        per_layer_slow = sample(patched)
        patched, runtime = hooks.install(model, per_layer, chosen, threshold=0.5, negative_value=-1e4)
        runtime.executor = GraphExecutor()
        replayed = sample(patched)
        check(f"CUDA-graph gate, a head per layer == straightforward path ({dtype})",
              torch.equal(replayed, per_layer_slow) and runtime.stats["eager"] == 0
              and len(runtime.executor.graphs) >= len(per_layer.heads),
              f"max |diff| {float((replayed - per_layer_slow).abs().max()):.3g}, calls {runtime.stats}, "
              f"{len(runtime.executor.graphs)} graphs for {len(per_layer.heads)} heads")
        # the skip decided on the device (no host sync): all-kept layers must still give the untouched bits
        mixed = MaskAttnGates.fresh(chosen, hidden_dim=16, seed=0, stage="all")
        with torch.no_grad():
            mixed.heads[0].logit_bias.fill_(30.0)  # the layers head 0 serves keep every pair; the others mask
        patched, runtime = hooks.install(model, mixed, chosen, threshold=0.5, negative_value=-1e4)
        _straightforward(runtime)
        mixed_slow = sample(patched)
        for graphs in (False, True):
            label = "device-skip" + (" CUDA-graph" if graphs else "") + " gate"
            for name, g, ref in (("all-kept gates", open_gates, base), ("mixed gates", mixed, mixed_slow)):
                patched, runtime = hooks.install(model, g, chosen, threshold=0.5, negative_value=-1e4)
                runtime.executor = EXECUTORS["graphs+device_skip" if graphs else "device_skip"]()
                out = sample(patched)
                check(f"{label}, {name} == {'untouched' if ref is base else 'straightforward path'} ({dtype})",
                      torch.equal(out, ref) and (runtime.stats["eager"] == 0 or not graphs),
                      f"max |diff| {float((out - ref).abs().max()):.3g}, calls {runtime.stats}")
        patched, runtime = hooks.install(model, open_gates, chosen, threshold=0.5, negative_value=-1e4)
        runtime.skip_unmasked = False  # all-kept layers then run the masked kernel with a zero bias
        zero_bias = sample(patched)
        check(f"sync-free all-kept gates ~ untouched ({dtype})", bool(torch.isfinite(zero_bias).all()),
              f"max |diff| {float((zero_bias - base).abs().max()):.3g}, bit-identical {torch.equal(zero_bias, base)}")
        finite = bool(torch.isfinite(fast).all())
        spread = float(fast.std()) / max(float(base.std()), 1e-12)
        check(f"gated latents finite and not collapsed ({dtype})", finite and spread > 0.1,
              f"std ratio to untouched {spread:.3f}; gates changed the result: {not torch.equal(fast, base)}")
        del model
    print(f"cuda_check: {len(failures)} failed" + (f" ({', '.join(failures)})" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
