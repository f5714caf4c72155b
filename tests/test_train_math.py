"""masks/train.py on its own (no ComfyUI): schedule, randomness, loss, optimiser step, checkpoint/resume."""

import math

import pytest
import torch
from torch import nn

from comfyui_maskattn.masks.train import (
    GateTrainer,
    TrainConfig,
    denoising_loss,
    draw,
    load_state,
    lr_factor,
    prediction_target,
    save_state,
    step_generator,
)


def test_warmup_then_cosine():
    f = [lr_factor(s, 10, 110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))  # warmup rises
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # cosine falls
    assert f[60] == pytest.approx(0.5, abs=1e-9)
    assert lr_factor(110, 10, 110) == pytest.approx(0.0)
    assert lr_factor(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 100) == pytest.approx(1.0)


def test_step_randomness_is_a_function_of_seed_rank_step():
    a = torch.randn(4, generator=step_generator(1, 0, 5))
    assert torch.equal(a, torch.randn(4, generator=step_generator(1, 0, 5)))
    for other in (step_generator(2, 0, 5), step_generator(1, 1, 5), step_generator(1, 0, 6)):
        assert not torch.equal(a, torch.randn(4, generator=other))


def test_draw_shapes_and_sigmas_come_from_the_table():
    table = torch.tensor([0.1, 0.5, 1.0, 5.0])
    d = draw(step_generator(0, 0, 0), 3, 2, table, (4, 2, 2))
    assert d.index.shape == (2,) and len(set(d.index.tolist())) == 2  # without replacement when it fits
    assert all(float(s) in table.tolist() for s in d.sigma)
    assert d.noise.shape == (2, 4, 2, 2)
    assert draw(step_generator(0, 0, 0), 1, 3, table, (4, 2, 2)).index.tolist() == [0, 0, 0]


@pytest.mark.parametrize("kind", ["eps", "v", "edm", "flow"])
def test_loss_from_denoised_equals_the_loss_on_the_raw_output(kind):
    """||D - x0||^2 / c_out^2 == ||F - F*||^2 for each parameterisation (ComfyUI's D = c_skip x_t + c_out F)."""
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    sigma = torch.tensor([0.03, 1.0, 14.0]) if kind != "flow" else torch.tensor([0.1, 0.5, 0.9])
    s = sigma.view(-1, 1, 1, 1)
    sd = 1.0
    if kind == "eps":
        xt, c_skip, c_out = x0 + s * noise, torch.ones_like(s), -s
    elif kind == "v":
        xt = x0 + s * noise
        c_skip, c_out = sd**2 / (s**2 + sd**2), -s * sd / (s**2 + sd**2) ** 0.5
    elif kind == "edm":
        xt = x0 + s * noise
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2) ** 0.5
    else:
        xt, c_skip, c_out = (1 - s) * x0 + s * noise, torch.ones_like(s), -s
    denoised = c_skip * xt + c_out * out
    target = prediction_target(kind, x0, noise, sigma, sd)
    expected = (out - target).pow(2).flatten(1).mean(1).mean()
    got = denoising_loss(denoised, x0, c_out.flatten())
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


def _toy(seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 1)])


def _toy_loss(heads):
    def run(gen):
        x = torch.randn(5, 3, generator=gen)
        y = torch.randn(5, 1, generator=gen)
        return (heads[1](torch.tanh(heads[0](x))) - y).pow(2).mean()

    return run


def test_trainer_descends_clips_and_counts_steps():
    heads = _toy()
    trainer = GateTrainer(heads, TrainConfig(steps=60, lr=3e-2, warmup_steps=5, grad_clip=0.5))
    loss_fn = _toy_loss(heads)
    reports = [trainer.train_step(loss_fn) for _ in range(60)]
    assert trainer.done and trainer.step == 60 and len(trainer.history) == 60
    assert sum(r.loss for r in reports[-10:]) < sum(r.loss for r in reports[:10])
    assert reports[0].lr == pytest.approx(3e-2 / 5)


def test_resume_is_bit_for_bit(tmp_path):
    config = TrainConfig(steps=8, lr=1e-2, warmup_steps=2, seed=3)
    straight = _toy()
    t = GateTrainer(straight, config)
    for _ in range(8):
        t.train_step(_toy_loss(straight))

    first = _toy()
    t1 = GateTrainer(first, config)
    for _ in range(3):
        t1.train_step(_toy_loss(first))
    save_state(t1.state_dict(), tmp_path / "state.pt")
    torch.manual_seed(12345)  # a fresh process has other global RNG state; the checkpoint restores it
    second = _toy(seed=99)  # other initial weights: the checkpoint must overwrite them
    t2 = GateTrainer(second, config)
    t2.load_state_dict(load_state(tmp_path / "state.pt"))
    while not t2.done:
        t2.train_step(_toy_loss(second))
    for a, b in zip(straight.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert t2.history == t.history


def test_resume_refuses_other_settings(tmp_path):
    heads = _toy()
    t = GateTrainer(heads, TrainConfig(steps=4, lr=1e-2))
    t.train_step(_toy_loss(heads))
    state = t.state_dict()
    other = GateTrainer(_toy(), TrainConfig(steps=4, lr=2e-2))
    with pytest.raises(ValueError, match="lr"):
        other.load_state_dict(state)
    longer = GateTrainer(_toy(), TrainConfig(steps=10, lr=1e-2))  # extending a run is allowed
    longer.load_state_dict(state)
    assert longer.step == 1


def test_non_finite_loss_skips_the_update():
    heads = _toy()
    before = [p.detach().clone() for p in heads.parameters()]
    trainer = GateTrainer(heads, TrainConfig(steps=2))
    report = trainer.train_step(lambda gen: heads[0].weight.sum() * float("nan"))
    assert report.skipped and trainer.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, heads.parameters()))


def test_cancel_inside_a_step_changes_nothing():
    heads = _toy()
    before = [p.detach().clone() for p in heads.parameters()]
    trainer = GateTrainer(heads, TrainConfig(steps=2))

    class Stop(Exception):
        pass

    def stop():
        raise Stop

    with pytest.raises(Stop):
        trainer.train_step(_toy_loss(heads), should_stop=stop)
    assert trainer.step == 0 and not trainer.history
    assert all(torch.equal(a, b) for a, b in zip(before, heads.parameters()))
    assert all(p.grad is None for p in heads.parameters())


def test_checkpoint_loads_with_weights_only(tmp_path):
    heads = _toy()
    t = GateTrainer(heads, TrainConfig(steps=3, precision="fp16"))
    state = t.state_dict()
    save_state(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert loaded["format"] == "maskattn-train-state" and math.isfinite(loaded["config"]["lr"])
    assert not (tmp_path / "s.pt.partial").exists()
