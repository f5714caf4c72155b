"""The training objectives and mask supervision on their own (pure torch, no ComfyUI): masks/objectives.py and
masks/supervised.py."""

import pytest
import torch
from torch import nn

from comfyui_maskattn.masks.gate import GateHead
from comfyui_maskattn.masks.objectives import (
    OBJECTIVES,
    GateRecord,
    Objective,
    TrainingGate,
    get_objective,
    noise_scale,
    sigma_band_table,
)
from comfyui_maskattn.masks import supervised
from comfyui_maskattn.masks.supervised import ObjectMasks, mask_agreement, mask_loss, object_masks
from comfyui_maskattn.masks.train import TRAIN_DEFAULTS, TrainConfig, resolve_warmup


class FixedLogits(nn.Module):
    """A "head" whose logits are a free parameter [1, N, T] (what a gate head's output is, without the MLPs)."""

    def __init__(self, logits):
        super().__init__()
        self.value = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32).clone())

    def logits(self, features, tokens):
        return self.value


def _layer(seed=0, n=4, t=3, heads=2, d=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, heads * d, generator=g)
    k = torch.randn(1, t, heads * d, generator=g)
    v = torch.randn(1, t, heads * d, generator=g)
    return q, k, v, heads


def _gate(name, head, step=0, total=10):
    gate = TrainingGate(get_objective(name), heads_for=lambda key: head, grid_of=lambda n, info: (2, n // 2))
    gate.begin_step(step, total, noise_seed=5)
    return gate


def _forward(gate, q, k, v, heads):
    result = gate.compute("site", torch.zeros(1, q.shape[1], 1), torch.zeros(1, k.shape[1], 1))
    return gate.attention(q, k, v, heads, mask=result.bias.unsqueeze(1)), result


CLOSED = (0, 1)  # (location, token) of the pair that starts closed


def _start_logits(n=4, t=3):
    logits = torch.full((1, n, t), 3.0)
    logits[0, CLOSED[0], CLOSED[1]] = -1.0  # P = 0.27: suppressed
    return logits


def _target(q, k, v, heads):
    """The output of the same layer with every pair kept: the closed pair *should* open."""
    from comfyui_maskattn.masks.attention import explicit_attention

    return explicit_attention(q, k, v, heads)


def test_the_soft_backward_gives_a_closed_pair_a_gradient_and_the_ste_does_not():
    q, k, v, heads = _layer()
    target = _target(q, k, v, heads)
    grads, outs = {}, {}
    for name in ("paper", "soft_backward"):
        head = FixedLogits(_start_logits())
        out, result = _forward(_gate(name, head), q, k, v, heads)
        assert float(result.hard[0, CLOSED[0], CLOSED[1]]) == 0.0
        (out - target).pow(2).sum().backward()
        grads[name], outs[name] = head.value.grad[0], out.detach()
    assert torch.equal(outs["paper"], outs["soft_backward"])  # the same exact hard forward
    assert float(grads["paper"][CLOSED]) == 0.0  # the reference's one-way ratchet
    assert float(grads["soft_backward"][CLOSED]) < 0.0  # descending raises the logit: the pair wants to open
    assert bool((grads["soft_backward"][CLOSED[0]] != 0).all())  # every pair of the wrong row reports
    assert float(grads["soft_backward"][1:].abs().sum()) == 0.0  # rows that are already right: nothing to learn


def test_a_closed_pair_that_should_open_does_under_the_soft_backward_and_stays_closed_under_the_ste():
    q, k, v, heads = _layer(seed=1)
    target = _target(q, k, v, heads)
    final = {}
    for name in ("paper", "soft_backward"):
        head = FixedLogits(_start_logits())
        opt = torch.optim.SGD(head.parameters(), lr=2.0)
        for _ in range(60):
            opt.zero_grad()
            out, _ = _forward(_gate(name, head), q, k, v, heads)
            (out - target).pow(2).sum().backward()
            opt.step()
        final[name] = float(head.value.detach()[0, CLOSED[0], CLOSED[1]])
    assert final["paper"] == pytest.approx(-1.0)  # never moved
    assert final["soft_backward"] > 0.0  # opened (P > 0.5)


def test_concrete_gate_draws_reproducible_noise_that_anneals_to_the_exact_gate():
    q, k, v, heads = _layer(seed=2, n=8, t=5)
    logits = torch.randn(1, 8, 5, generator=torch.Generator().manual_seed(3))
    head = FixedLogits(logits)
    a = _gate("concrete", head, step=0, total=10).compute("site", torch.zeros(1, 8, 1), torch.zeros(1, 5, 1))
    b = _gate("concrete", head, step=0, total=10).compute("site", torch.zeros(1, 8, 1), torch.zeros(1, 5, 1))
    assert torch.equal(a.hard, b.hard)  # same (seed, site, step): same draw, so resume and recompute agree
    exact = (torch.sigmoid(logits) > 0.5).float()
    assert not torch.equal(a.hard, exact)  # noise at the start explores
    last = _gate("concrete", head, step=9, total=10).compute("site", torch.zeros(1, 8, 1), torch.zeros(1, 5, 1))
    assert noise_scale(9, 10) == 0.0 and torch.equal(last.hard, exact)
    # the concrete estimator's gradient also reaches closed pairs
    gate = _gate("concrete", FixedLogits(_start_logits()), step=9, total=10)
    out, _ = _forward(gate, *_layer())
    (out - _target(*_layer())).pow(2).sum().backward()
    assert float(gate.heads_for("site").value.grad[0][CLOSED]) != 0.0


def test_sparsity_prior_pushes_every_pair_towards_closing():
    head = FixedLogits(torch.zeros(1, 4, 3))
    gate = _gate("sparse", head)
    _forward(gate, *_layer())
    gate.sparsity_term().backward()
    assert bool((head.value.grad > 0).all())  # gradient descent lowers every keep-probability
    assert _gate("paper", head).sparsity_term() is None


def test_sigma_band_picks_the_upper_part_of_the_table():
    table = torch.linspace(0.1, 10.0, 100)
    assert torch.equal(sigma_band_table(table, None), table)
    band = sigma_band_table(table, (0.3, 1.0))
    assert len(band) == 70 and float(band[0]) == pytest.approx(float(table[30]))
    assert len(sigma_band_table(table, (0.999, 1.0))) == 1
    with pytest.raises(ValueError, match="sigma_band"):
        Objective("bad", "soft", sigma_band=(0.5, 0.4))


def test_objectives_and_defaults_are_one_table():
    assert {"paper", "soft_backward", "sparse", "concrete", "soft_x0"} <= set(OBJECTIVES)
    paper = OBJECTIVES["paper"]
    assert (paper.estimator, paper.loss_space, paper.sigma_band, paper.sparsity, paper.init_bias) == (
        "ste", "eps", None, 0.0, 0.0)
    assert TrainConfig().objective == TRAIN_DEFAULTS["objective"] and TrainConfig().steps == TRAIN_DEFAULTS["steps"]
    assert resolve_warmup(-1, 200) == round(TRAIN_DEFAULTS["warmup_fraction"] * 200)
    assert resolve_warmup(50, 20) == 20
    with pytest.raises(ValueError, match="unknown training objective"):
        TrainConfig(objective="nope")
    with pytest.raises(ValueError, match="mask_steps"):
        TrainConfig(steps=3, mask_steps=4)


# --- mask supervision ---------------------------------------------------------------------------------------------
def _halves(h=8, w=8):
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1
    return torch.stack([left, 1 - left])


def test_object_mask_targets():
    objects = ObjectMasks(owner=torch.tensor([-1, 0, 0, 1, -1]), masks=_halves())
    target, weight = objects.targets(2, 2, 10)  # a context repeated twice (a batch of other lengths)
    assert target.shape == (4, 10) and weight.shape == (4, 10)
    assert weight[0].tolist() == [0, 1, 1, 1, 0] * 2
    assert target[:, 1].tolist() == [1, 0, 1, 0] and target[:, 3].tolist() == [0, 1, 0, 1]
    half = ObjectMasks(owner=torch.tensor([0]), masks=torch.ones(1, 4, 4) * torch.tensor([1.0, 1, 0, 0]))
    assert half.cell_coverage(1, 2).tolist() == [[1.0], [0.0]]
    small = torch.zeros(1, 8, 8)
    small[0, 0, 0] = 1  # 1/64 of the image: its cell keeps it on a coarse grid (region gates' coverage)
    assert ObjectMasks(owner=torch.tensor([0]), masks=small).cell_coverage(2, 2)[:, 0].tolist() == [1.0, 0, 0, 0]
    with pytest.raises(ValueError, match="repetition"):
        objects.targets(2, 2, 7)


def test_object_mask_targets_keep_words_open_where_no_object_is():
    """outside="keep": an object's words are closed only where another object covers the cell; in the background
    every object's words stay open; where both objects overlap each keeps its own coverage."""
    masks = torch.zeros(2, 4, 4)
    masks[0, :, 0] = 1  # object 0: column 0
    masks[1, :, 3] = 1  # object 1: column 3
    masks[1, 0, 0] = 1  # ... and the top-left cell, shared with object 0
    objects = ObjectMasks(owner=torch.tensor([-1, 0, 1, -1]), masks=masks)
    closed, weight = objects.targets(4, 4, 4, outside="close")
    kept, weight_kept = objects.targets(4, 4, 4)
    assert torch.equal(weight, weight_kept)
    grid = lambda target, token: target[:, token].reshape(4, 4)  # noqa: E731
    assert grid(closed, 1)[:, 1:3].eq(0).all() and grid(kept, 1)[:, 1:3].eq(1).all()  # background
    assert grid(kept, 1)[1:, 3].eq(0).all() and grid(kept, 2)[1:, 0].eq(0).all()  # the other object's cells
    assert grid(kept, 1)[:, 0].eq(1).all() and grid(kept, 2)[:, 3].eq(1).all()  # its own
    assert grid(kept, 1)[0, 0] == 1 and grid(kept, 2)[0, 0] == 1  # both there: both kept
    assert torch.equal(closed[:, [0, 3]], kept[:, [0, 3]])  # unsupervised tokens untouched
    # masks that cover every cell leave nothing outside: both settings agree
    partition = ObjectMasks(owner=torch.tensor([-1, 0, 1, -1]), masks=torch.stack([masks[0], 1 - masks[0]]))
    assert torch.equal(partition.targets(4, 4, 4)[0], partition.targets(4, 4, 4, outside="close")[0])
    with pytest.raises(ValueError, match="mask_outside"):
        objects.targets(4, 4, 4, outside="open")


def test_checkpoints_from_before_mask_outside_resume_as_they_were_trained():
    """A mask-supervised checkpoint without the key trained with "close": resuming it with the new default is refused
    by name, and with "close" it resumes; one without mask steps resumes with the defaults."""
    from comfyui_maskattn.masks.train import TRAIN_DEFAULTS, GateTrainer, TrainConfig

    def old_state(config):
        trainer = GateTrainer(torch.nn.Linear(2, 2), config)
        state = trainer.state_dict()
        del state["config"]["mask_outside"]
        state["format_version"] = 1
        return state

    assert TrainConfig().mask_outside == TRAIN_DEFAULTS["mask_outside"] == "keep"
    supervised = old_state(TrainConfig(steps=4, mask_steps=2, mask_outside="close"))
    with pytest.raises(ValueError, match="mask_outside: checkpoint 'close', now 'keep'"):
        GateTrainer(torch.nn.Linear(2, 2), TrainConfig(steps=4, mask_steps=2)).load_state_dict(supervised)
    GateTrainer(torch.nn.Linear(2, 2), TrainConfig(steps=4, mask_steps=2, mask_outside="close")).load_state_dict(
        supervised)
    plain = old_state(TrainConfig(steps=4))
    GateTrainer(torch.nn.Linear(2, 2), TrainConfig(steps=4)).load_state_dict(plain)
    with pytest.raises(ValueError, match="mask_outside must be one of"):
        TrainConfig(mask_outside="open")


def test_keep_counts_a_cell_shared_by_two_objects_and_the_background_as_open():
    """Overlapping masks: the background share is one minus the union's cover, not minus the sum of covers."""
    masks = torch.zeros(2, 2, 6)  # a 1 x 3 grid of 2 x 2 cells
    masks[:, 0, 0:2] = 1  # both objects: the top half of cell 0
    masks[0, :, 2:4] = 1  # object 0: all of cell 1
    masks[1, :, 4:6] = 1  # object 1: all of cell 2
    objects = ObjectMasks(owner=torch.tensor([0, 1]), masks=masks)
    assert objects.uncovered(1, 3).tolist() == [0.5, 0.0, 0.0]
    target, _ = objects.targets(1, 3, 2)
    assert target.tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    assert objects.targets(1, 3, 2, outside="close")[0][0].tolist() == [0.5, 0.5]


def test_mask_supervised_head_recovers_planted_masks():
    """Locations carry their position in their features; the head must learn which object's words belong where."""
    torch.manual_seed(0)
    h = w = 6
    n, t, c, d = h * w, 6, 12, 10
    head = GateHead(c, d, 16)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    masks = []
    for cx, cy in ((-0.4, -0.3), (0.5, 0.4)):  # two discs
        masks.append(((xx - cx) ** 2 + (yy - cy) ** 2 < 0.45).float())
    masks = torch.stack(masks)
    objects = [ObjectMasks(owner=torch.tensor([-1, 0, 0, 1, 1, -1]), masks=masks)] * 4
    g = torch.Generator().manual_seed(1)
    feats = torch.cat([xx.reshape(n, 1), yy.reshape(n, 1), torch.randn(n, c - 2, generator=g) * 0.1], 1)
    features = feats[None].expand(4, n, c) + 0.05 * torch.randn(4, n, c, generator=g)
    words = torch.randn(t, d, generator=g)
    tokens = words[None].expand(4, t, d)

    def records():
        logits = head.logits(features, tokens)
        return [GateRecord("site", logits, torch.sigmoid(logits), (h, w))]

    before = mask_agreement(records(), objects, outside="close")
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        mask_loss(records(), objects, outside="close").backward()
        opt.step()
    after = mask_agreement(records(), objects, outside="close")
    assert after >= 0.95 and after > before + 0.2, (before, after)
    # an image without masks is not supervised at all
    assert mask_loss(records(), [None] * 4).item() == 0.0

    # outside="keep" (the default): the same head retrained keeps both objects' words in the background and closes
    # each only in the other's disc
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        mask_loss(records(), objects, outside="keep").backward()
        opt.step()
    assert mask_agreement(records(), objects, outside="keep") >= 0.95
    keep = records()[0].probabilities[0].detach() > 0.5  # [N, T]
    background = (masks.sum(0) == 0).reshape(n)
    only_other = (masks[1] > 0).reshape(n) & (masks[0] == 0).reshape(n)
    assert keep[background][:, 1:5].float().mean() >= 0.95
    assert (~keep[only_other][:, 1:3]).float().mean() >= 0.9


def test_mask_loss_builds_each_grids_targets_once_per_pass(monkeypatch):
    """Layers that share a grid share the targets; an image's coverage of a grid is computed once, not every step."""
    calls = []
    real = supervised.coverage
    monkeypatch.setattr(supervised, "coverage", lambda m, h, w: calls.append((h, w)) or real(m, h, w))
    objects = [ObjectMasks(owner=torch.tensor([-1, 0, 1]), masks=_halves()) for _ in range(2)]
    logits = torch.zeros(2, 4, 3, requires_grad=True)
    records = [GateRecord(f"site{i}", logits, torch.sigmoid(logits), (2, 2)) for i in range(5)]
    built = []
    real_batch = supervised.batch_targets
    monkeypatch.setattr(supervised, "batch_targets", lambda *a: built.append(a[1:4]) or real_batch(*a))
    for _ in range(3):  # three steps
        mask_loss(records, objects).backward()
    assert calls == [(2, 2), (2, 2)]  # once per image
    assert built == [(2, 2, 3)] * 3  # once per pass, not once per layer


def test_mask_loss_of_a_batch_without_masks_is_zero_but_reaches_every_gate():
    logits = [torch.randn(2, 4, 3, requires_grad=True) for _ in range(2)]
    records = [GateRecord(i, x, torch.sigmoid(x), (2, 2)) for i, x in enumerate(logits)]
    loss = mask_loss(records, [None, None])
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(x.grad is not None and float(x.grad.abs().sum()) == 0.0 for x in logits)


def test_object_masks_reject_an_empty_mask():
    tokens = {"l": [[(1, 1.0, 0), (2, 1.0, 1), (3, 1.0, 2), (4, 1.0, 0)]]}
    vocab = {1: "<|startoftext|>", 2: "red</w>", 3: "cube</w>", 4: "<|endoftext|>"}
    assert object_masks("red cube", ["red cube"], [torch.ones(4, 4)], tokens, vocab).owner.tolist() == [-1, 0, 0, -1]
    with pytest.raises(ValueError, match="empty"):
        object_masks("red cube", ["red cube"], [torch.zeros(4, 4)], tokens, vocab)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_explicit_attention_of_large_half_precision_inputs_is_finite(dtype):
    """q.k of 64 channels of 300 each is 5.8e6, past fp16's 65504: the logits must not be formed in fp16."""
    from comfyui_maskattn.masks.attention import explicit_attention

    g = torch.Generator().manual_seed(0)
    q = (300 + torch.rand(1, 4, 64, generator=g)).to(dtype)
    k = (300 + torch.rand(1, 3, 64, generator=g)).to(dtype)
    v = torch.randn(1, 3, 64, generator=g).to(dtype)
    mask = torch.zeros(1, 1, 4, 3, dtype=dtype)
    mask[..., 0] = -1.0e4
    for m in (None, mask):
        out = explicit_attention(q, k, v, 1, mask=m)
        ref = explicit_attention(q.double(), k.double(), v.double(), 1, mask=None if m is None else m.double())
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert torch.allclose(out.double(), ref, atol=0.05)
