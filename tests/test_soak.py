"""A long session loses nothing: the reduced soak on a real server (benchmarks/soak.py), and in one process the three
ways state could outlive a run that it found: an interrupted run's zero-shot aggregate and viewer record, and an
earlier Apply MaskAttn still gating the layers a second one leaves out."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_host import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

TEXT = "a red cube on a blue sphere, a yellow cat"


@pytest.mark.server
def test_reduced_soak_keeps_every_result_equal_to_a_fresh_server(capsys):
    import soak

    assert soak.main(["--prompts", "20", "--fresh", "1", "--window", "15"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    checks = [line for line in out.splitlines() if line.startswith("  ") and ": same" in line]
    assert len(checks) == 4, out  # one sampled prompt, the prompts after two interrupts, the two-model prompt
    assert "failures: 0" in out and "growth" in out
    assert "memory held (RSS less" in out or "memory held: unreadable" in out


@pytest.fixture(scope="module")
def session(host):
    import comfy.model_management
    import comfy.utils
    import nodes
    from comfyui_maskattn.nodes.gates import MaskAttnApply
    from comfyui_maskattn.nodes.zeroshot import MaskAttnZeroShotGates
    from cli.tiny_pack.tiny import TinyCLIP, shrink_large_latents, tiny_sdxl_model

    clip = TinyCLIP(0)
    model = shrink_large_latents(tiny_sdxl_model(0))
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]

    class Session:
        @staticmethod
        def gates(stage="all", self_attention="open", start_percent=0.2):
            """(zero-shot gates, the positive conditioning)."""
            out = MaskAttnZeroShotGates().build(clip, TEXT, stage, start_percent, "", self_attention=self_attention)
            return out["result"][0], out["result"][2]

        @staticmethod
        def apply(base, gates, stage="all"):
            return MaskAttnApply().apply(base, gates, 0.5, 1.0, stage, "encoder_decoder", 0.0, 1.0)[0]

        @staticmethod
        def sample(patched, positive, seed=5, steps=6, stop_after=None):
            """The latent, or None when stopped as ComfyUI's interrupt stops a run: at the progress hook after step
            `stop_after` (0: the first)."""

            def hook(value, total, preview=None):
                if stop_after is not None and value > stop_after:
                    raise comfy.model_management.InterruptProcessingException()

            comfy.utils.set_progress_bar_global_hook(hook)
            try:
                with torch.inference_mode():
                    return nodes.common_ksampler(patched, seed, steps, 5.0, "euler", "normal", positive, negative,
                                                 host.empty_latent(64, 64))[0]["samples"]
            except comfy.model_management.InterruptProcessingException:
                return None
            finally:
                comfy.utils.set_progress_bar_global_hook(None)

    Session.model = model
    return Session


@pytest.mark.parametrize("stop_after", [0, 2])
def test_an_interrupted_zero_shot_run_leaves_nothing_for_the_next(session, stop_after):
    gates, positive = session.gates()
    fresh_gates, _ = session.gates()
    want = session.sample(session.apply(session.model, fresh_gates), positive, seed=6)
    patched = session.apply(session.model, gates)
    assert session.sample(patched, positive, seed=5, stop_after=stop_after) is None
    # the same gates object (ComfyUI's cache hands it to the next prompt), another seed
    assert torch.equal(session.sample(patched, positive, seed=6), want)


def test_the_viewer_record_after_an_interrupt_is_the_next_run_alone(session):
    from comfyui_maskattn.nodes.preview import MaskAttnRecordGates, model_recorder

    def record(gates):
        return MaskAttnRecordGates().record(session.apply(session.model, gates), "all", "all", False, 32, 64)[0]

    gates, positive = session.gates()
    fresh = record(session.gates()[0])
    session.sample(fresh, positive, seed=6, steps=4)
    want = model_recorder(fresh).latest()
    recorded = record(gates)
    assert session.sample(recorded, positive, seed=5, steps=12, stop_after=3) is None  # gating began at step 2
    session.sample(recorded, positive, seed=6, steps=4)
    run = model_recorder(recorded).latest()
    assert [(b.first, b.last, b.sigma_max) for b in run.bins] == [(b.first, b.last, b.sigma_max) for b in want.bins]
    assert run.steps_seen == want.steps_seen
    for key, half in want.bins[-1].entries:
        assert torch.equal(run.bins[-1].entries[(key, half)].hard, want.bins[-1].entries[(key, half)].hard)


def test_a_second_apply_replaces_the_first_at_every_layer(session):
    """The first gates mask every layer (and self-attention), the second only the mid stage: the result is the
    second's alone, not the first's still gating the layers the second leaves out."""
    first, positive = session.gates("all", "separate_groups", start_percent=0.0)
    second, _ = session.gates("mid", start_percent=0.0)
    alone = session.sample(session.apply(session.model, second), positive)
    twice = session.sample(session.apply(session.apply(session.model, first), second), positive)
    assert not torch.equal(alone, session.sample(session.apply(session.model, first), positive))
    assert torch.equal(twice, alone)


def test_memory_held_counts_what_is_kept_and_not_what_was_freed():
    """The soak's goal figure (RSS less the allocator's free blocks) rises by what the process keeps and falls back
    when it frees it, whether or not the allocator returns the pages to the system. In a fresh interpreter: in this
    one, earlier tests leave free blocks that the allocation would reuse without touching RSS."""
    from cli.tiny_pack.memory import readable

    if not readable():
        pytest.skip("the allocator's free blocks are read from glibc's mallinfo2 (Linux, glibc 2.33+)")
    script = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from cli.tiny_pack.memory import process_memory
from soak import held_bytes
size, block = 64 * 2**20, 64 * 2**10  # blocks under glibc's mmap threshold: they come from its heaps
before = process_memory()
kept = [bytearray(b"x" * block) for _ in range(size // block)]
pin = bytearray(b"x" * block)  # above them in the heap: their pages cannot go back to the system when freed
holding = process_memory()
del kept
after = process_memory()
print(json.dumps({"size": size, "rss": after["rss"] - before["rss"],
                  "held_holding": held_bytes(holding) - held_bytes(before),
                  "held_after": held_bytes(after) - held_bytes(before)}))
"""
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script, str(repo), str(repo / "benchmarks")], capture_output=True,
                         text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    size = got["size"]
    assert got["rss"] > 0.5 * size  # freed, but still resident
    assert got["held_holding"] > 0.9 * size
    assert got["held_after"] < 0.1 * size
