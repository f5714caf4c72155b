"""The gate recorder (masks/record.py) on hand-built gate calls: no ComfyUI needed."""

import copy

import pytest
import torch

from comfyui_maskattn.masks.gate import GateResult
from comfyui_maskattn.masks.record import COND, UNCOND, GateRecorder, latent_hw, site_map

KEY_A, KEY_B = ("input", 4, 0), ("output", 1, 1)


def result(hard, probs=None):
    hard = hard.float()
    return GateResult(probabilities=hard * 0.8 + 0.1 if probs is None else probs, hard=hard, bias=(1 - hard) * -1e4)


def info(sigma, chunks=(1, 0), shape=(1, 4, 16, 16), **extra):
    return {"sigmas": torch.tensor([float(sigma)] * len(chunks)), "cond_or_uncond": list(chunks),
            "original_shape": list(shape), **extra}


def planted(batch=2, h=16, w=16, tokens=77, token=5, box=(2, 6, 8, 12), uncond_token=9):
    """[batch, h*w, T] hard gate: row 0 (uncond, chunk 1) keeps `uncond_token` everywhere; row 1 (cond) keeps
    `token` inside box=(y0, y1, x0, x1) only."""
    hard = torch.zeros(batch, h, w, tokens)
    hard[0, :, :, uncond_token] = 1
    y0, y1, x0, x1 = box
    hard[1, y0:y1, x0:x1, token] = 1
    return hard.reshape(batch, h * w, tokens)


def test_planted_gate_appears_where_planted_cond_half_only():
    rec = GateRecorder(max_side=64)
    rec(KEY_A, result(planted()), info(10.0))
    run = rec.latest()
    assert run.sites == [KEY_A] and run.tokens == 77 and run.batch == 1 and run.hw[KEY_A] == (16, 16)
    m = site_map(run, KEY_A)  # [T, h, w]
    assert m.shape == (77, 16, 16)
    assert torch.equal(m[5, 2:6, 8:12], torch.ones(4, 4))
    assert m[5].sum() == 16 and m.sum() == 16  # nothing anywhere else, and nothing of the uncond row
    assert site_map(run, KEY_A, half=UNCOND) is None
    probs = site_map(run, KEY_A, kind="probabilities")
    assert abs(float(probs[5, 3, 9]) - 0.9) < 0.01 and abs(float(probs[0, 0, 0]) - 0.1) < 0.01


def test_uncond_half_on_request():
    rec = GateRecorder(uncond=True, max_side=64)
    rec(KEY_A, result(planted()), info(10.0))
    run = rec.latest()
    unc = site_map(run, KEY_A, half=UNCOND)
    assert torch.equal(unc[9], torch.ones(16, 16)) and unc.sum() == 256
    assert site_map(run, KEY_A, half=COND)[5].sum() == 16


def test_downsampling_keeps_the_fraction_of_kept_locations():
    rec = GateRecorder(max_side=8)
    rec(KEY_A, result(planted(box=(2, 6, 8, 12))), info(10.0))
    m = site_map(rec.latest(), KEY_A)
    assert m.shape == (77, 8, 8)
    # the 4x4 box covers cells (1..2, 4..5) of the 2x2-pooled map fully
    assert torch.allclose(m[5, 1:3, 4:6], torch.ones(2, 2))
    assert float(m[5].sum()) == pytest.approx(16 / 4, abs=0.02) and float(m.sum()) == pytest.approx(4, abs=0.02)


def test_latent_size_from_the_host_info():
    assert latent_hw(12 * 20, {"original_shape": [1, 4, 12, 20]}) == (12, 20)
    assert latent_hw(6 * 10, {"original_shape": [1, 4, 12, 20]}) == (6, 10)
    assert latent_hw(3 * 5, {"original_shape": [1, 4, 12, 20]}) == (3, 5)
    assert latent_hw(4 * 7, {"original_shape": [1, 4, 13, 25]}) == (4, 7)  # ceil at every halving
    assert latent_hw(6 * 10, {"activations_shape": [2, 64, 6, 10], "original_shape": [1, 4, 99, 99]}) == (6, 10)
    assert latent_hw(64, {}) == (8, 8)


def test_batch_items_are_kept_apart():
    hard = torch.zeros(4, 64, 77)  # chunks [1, 0], 2 latents each: cond rows are 2 and 3
    hard[2, :, 1] = 1
    hard[3, :, 2] = 1
    rec = GateRecorder()
    rec(KEY_A, result(hard), info(5.0, shape=(2, 4, 8, 8)))
    run = rec.latest()
    assert run.batch == 2
    assert site_map(run, KEY_A, batch_index=0)[1].mean() == 1 and site_map(run, KEY_A, batch_index=0)[2].sum() == 0
    assert site_map(run, KEY_A, batch_index=1)[2].mean() == 1


def test_steps_means_and_filters():
    rec = GateRecorder(sites={KEY_A}, steps={0, 2})
    for step, sigma in enumerate([10.0, 5.0, 1.0]):
        hard = torch.zeros(2, 64, 77)
        hard[1, :, step] = 1
        rec(KEY_A, result(hard), info(sigma, shape=(1, 4, 8, 8)))
        rec(KEY_B, result(hard), info(sigma, shape=(1, 4, 8, 8)))  # not a recorded site
    run = rec.latest()
    assert run.steps_seen == 3 and [b.first for b in run.bins] == [0, 2] and run.sites == [KEY_A]
    assert site_map(run, KEY_A, step=0)[0].mean() == 1
    assert site_map(run, KEY_A, step="last")[2].mean() == 1 and site_map(run, KEY_A, step="last")[1].sum() == 0
    mean = site_map(run, KEY_A, step="mean")
    assert mean[0].mean() == pytest.approx(0.5, abs=0.01) and mean[2].mean() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(IndexError, match="2 step bins"):
        site_map(run, KEY_A, step=5)


def test_runs_never_mix():
    rec = GateRecorder()
    hard = torch.zeros(2, 64, 77)
    hard[1, :, 3] = 1
    for sigma in (10.0, 1.0):
        rec(KEY_A, result(hard), info(sigma, shape=(1, 4, 8, 8)))
    first = rec.latest()
    base = first.run_id
    assert first.steps_seen == 2
    # the next queued prompt starts again from the top of its schedule: a new run
    hard2 = torch.zeros(2, 64, 77)
    hard2[1, :, 7] = 1
    rec(KEY_A, result(hard2), info(10.0, shape=(1, 4, 8, 8)))
    second = rec.latest()
    assert second is not first and second.run_id == base + 1 and first.finished and rec.last is first
    assert site_map(second, KEY_A)[3].sum() == 0 and site_map(second, KEY_A)[7].mean() == 1
    assert site_map(first, KEY_A)[7].sum() == 0  # the first run's record is untouched
    # a one-step run repeated with the same sigma: the same site at the same sigma again is a new run
    rec(KEY_A, result(hard), info(10.0, shape=(1, 4, 8, 8)))
    assert rec.latest().run_id == base + 2
    # a viewer that read a run closes it; the next call starts a new one even at a lower sigma
    assert rec.finish().run_id == base + 2 and rec.current is None
    rec(KEY_A, result(hard), info(0.5, shape=(1, 4, 8, 8)))
    assert rec.latest().run_id == base + 3
    # newer hosts: a new schedule object is a new run
    sched_a, sched_b = torch.tensor([10.0, 1.0, 0.0]), torch.tensor([10.0, 1.0, 0.0])
    rec(KEY_A, result(hard), info(0.4, shape=(1, 4, 8, 8), sample_sigmas=sched_a))
    run5 = rec.latest()
    rec(KEY_A, result(hard), info(0.3, shape=(1, 4, 8, 8), sample_sigmas=sched_a))
    assert rec.latest() is run5 and run5.steps_seen == 2
    rec(KEY_A, result(hard), info(0.2, shape=(1, 4, 8, 8), sample_sigmas=sched_b))
    assert rec.latest().run_id == run5.run_id + 1


def test_a_cloned_model_shares_the_recorder_and_copies_no_tensor():
    rec = GateRecorder()
    rec(KEY_A, result(planted()), info(10.0))
    options = {"transformer_options": {"maskattn_recorder": rec}}
    cloned = copy.deepcopy(options)
    assert cloned["transformer_options"]["maskattn_recorder"] is rec


def test_memory_cap_merges_older_steps_and_never_grows_past_it():
    per_entry = 2 * 77 * 8 * 8  # hard + probabilities, uint8, one latent, 8x8 cells
    cap = per_entry * 2 * 6 + 10  # room for 6 steps of 2 sites
    rec = GateRecorder(cap_bytes=cap)
    steps = 20
    for step in range(steps):
        hard = torch.zeros(2, 64, 77)
        hard[1, :, 0] = float(step % 2)  # token 0 kept on odd steps only
        for key in (KEY_A, KEY_B):
            rec(key, result(hard), info(100.0 - step, shape=(1, 4, 8, 8)))
        assert rec.latest().nbytes <= cap
    run = rec.latest()
    assert run.steps_seen == steps and run.peak_nbytes <= cap and run.dropped == 0 and run.merges > 0
    assert len(run.bins) <= 6 and run.bins[-1].steps == 1  # the newest step keeps its own bin
    assert [b.first for b in run.bins] == sorted(b.first for b in run.bins)
    assert sum(b.steps for b in run.bins) == steps  # merged, not dropped: every step is still accounted for
    # averages stay weighted by steps: token 0 was kept half of the time
    assert float(site_map(run, KEY_A)[0].mean()) == pytest.approx(0.5, abs=0.02)
    assert float(site_map(run, KEY_B, step=0)[0].mean()) == pytest.approx(
        sum(s % 2 for s in range(run.bins[0].first, run.bins[0].last + 1)) / run.bins[0].steps, abs=0.02)


def test_a_step_larger_than_the_cap_drops_sites_instead_of_growing():
    rec = GateRecorder(cap_bytes=2 * 77 * 64 + 100)  # one site of one step fits, a second does not
    hard = torch.zeros(2, 64, 77)
    rec(KEY_A, result(hard), info(1.0, shape=(1, 4, 8, 8)))
    rec(KEY_B, result(hard), info(1.0, shape=(1, 4, 8, 8)))
    run = rec.latest()
    assert run.sites == [KEY_A] and run.dropped == 1 and run.nbytes <= run.cap_bytes
    assert "cap reached" in run.summary()


def test_sdxl_sized_run_stays_under_the_default_cap():
    """50 mid-stage layers of SDXL at 1024x1024 (32x32 latent cells, 77 tokens), cond+uncond, 30 steps."""
    rec = GateRecorder()  # defaults: 64 MiB, max_side 32
    hard = (torch.rand(2, 1024, 77, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    res = result(hard)
    keys = [("input", 7, i) for i in range(10)] + [("output", o, i) for o in range(3) for i in range(10)] + [
        ("input", 8, i) for i in range(10)]
    for step in range(30):
        inf = info(30.0 - step, shape=(1, 4, 128, 128))
        for key in keys:
            rec(key, res, inf)
    run = rec.latest()
    assert run.peak_nbytes <= 64 * 2**20 and run.dropped == 0 and run.steps_seen == 30
    assert len(run.sites) == 50 and run.hw[keys[0]] == (32, 32)
    print(f"\nSDXL-sized record: {run.summary()}; peak {run.peak_nbytes / 2**20:.1f} MiB, {run.merges} merges")
