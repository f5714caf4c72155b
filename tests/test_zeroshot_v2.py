"""Zero-shot gates v2 without a host: the aggregated partition on planted attention maps, the end-token option,
the self-attention bias, the region masks at image size and the leakage number."""

import pytest
import torch

from comfyui_maskattn.masks.prompt import group_prompt
from comfyui_maskattn.masks.zeroshot import ZeroShotGates
from comfyui_maskattn.masks.zeroshot_partition import (
    PartitionState,
    group_density,
    image_masks,
    regions,
    self_attention_bias,
)

KEY = ("input", 4, 0)
RED_BOOK, YELLOW_VASE = [2, 3], [7, 8]
END = list(range(10, 16))  # end token and padding of a 16-token prompt
H = W = 4
HEADS, D = 2, 4


def gates_for(partition="aggregate", tokens=16, **options):
    g = group_prompt("a red book and a yellow vase")
    token_groups = [-1] * tokens
    for p in RED_BOOK:
        token_groups[p] = 0
    for p in YELLOW_VASE:
        token_groups[p] = 1
    kinds = ["start"] + ["text"] * 9 + ["end"] * (tokens - 10)
    words = [("red", 0, [2]), ("book", 0, [3]), ("yellow", 1, [7]), ("vase", 1, [8])]
    gates = ZeroShotGates(g, token_groups, stage="all", start_percent=0.0, partition=partition, token_kinds=kinds,
                          word_tokens=words, **options)
    gates.check_fits([])
    return gates


def plant(left_cols, tokens=16, scale=4.0, h=H, w=W):
    """q, k: locations in columns `left_cols` attend to the red book, the other columns to the yellow vase (head
    0; head 1 attends uniformly)."""
    q = torch.zeros(1, h, w, HEADS, D)
    mask = torch.zeros(w, dtype=torch.bool)
    mask[list(left_cols)] = True
    q[:, :, mask, 0, 0] = 1.0
    q[:, :, ~mask, 0, 1] = 1.0
    k = torch.zeros(1, tokens, HEADS, D)
    k[:, RED_BOOK, 0, 0] = scale
    k[:, YELLOW_VASE, 0, 1] = scale
    return q.reshape(1, h * w, HEADS * D), k.reshape(1, tokens, HEADS * D)


_SIGMAS: dict = {}


def info(sigma, h=H, w=W):
    # one sigmas tensor per sigma: a host hands the same object to every layer of a model call
    sigmas = _SIGMAS.setdefault(sigma, torch.tensor([sigma]))
    return {"cond_or_uncond": [0], "sigmas": sigmas, "original_shape": [1, 4, h, w]}


def red_columns(p, h=H, w=W):
    """Columns where the red book's token is kept (keep-probability above 0.5)."""
    kept = (p[0][:, RED_BOOK[0]] > 0.5).view(h, w)
    return {c for c in range(w) if kept[:, c].all()}


def test_a_known_partition_is_recovered_from_layers_of_different_resolutions():
    gates = gates_for()
    # step 1: an 8x8 layer and a 4x4 layer, both planted "left half = red book"
    q8, k8 = plant(range(4), h=8, w=8)
    p8 = gates.attention_probabilities(KEY, q8, k8, HEADS, info(10.0, 8, 8))
    q4, k4 = plant(range(2))
    p4 = gates.attention_probabilities(KEY, q4, k4, HEADS, info(10.0))
    assert red_columns(p8, 8, 8) == {0, 1, 2, 3}
    assert red_columns(p4) == {0, 1}
    assert gates.last_partition.grid == (8, 8) and gates.last_partition.step_count == 2
    # and the yellow vase keeps the right half, everywhere gated out on the left
    kept_vase = (p4[0][:, YELLOW_VASE[0]] > 0.5).view(H, W)
    assert kept_vase[:, 2:].all() and not kept_vase[:, :2].any()


def test_a_drifting_location_is_not_locked_in():
    """Columns 0-1 attend to the red book for three steps; then column 1 drifts toward the vase for one step. v1
    (this layer only) hands column 1 to the vase at once; v2's aggregate keeps it the book's."""
    for partition, expected in (("layer", {0}), ("aggregate", {0, 1})):
        gates = gates_for(partition)
        for sigma in (10.0, 8.0, 6.0):
            gates.attention_probabilities(KEY, *plant(range(2)), HEADS, info(sigma))
        drifted = gates.attention_probabilities(KEY, *plant([0]), HEADS, info(4.0))
        assert red_columns(drifted) == expected, partition
    # a location that stays drifted is handed over once the evidence outweighs the memory
    gates = gates_for("aggregate")
    for sigma in (10.0, 8.0, 6.0):
        gates.attention_probabilities(KEY, *plant(range(2)), HEADS, info(sigma))
    for sigma in (4.0, 3.0, 2.0, 1.0, 0.5, 0.2):
        p = gates.attention_probabilities(KEY, *plant([0]), HEADS, info(sigma))
    assert red_columns(p) == {0}


def test_observed_steps_feed_the_aggregate_without_gating():
    gates = gates_for()
    q, k = plant(range(2))
    gates.observe_attention(KEY, q, k, HEADS, info(10.0))
    gates.observe_attention(KEY, q, k, HEADS, info(9.0))
    assert gates.last_partition.steps == 1 and gates.last_partition.step_count == 1
    # v1 keeps the aggregate too (its regions and leakage are read after the run); its partition ignores it
    v1 = gates_for("layer")
    assert v1.observes_inactive
    v1.observe_attention(KEY, q, k, HEADS, info(10.0))
    assert v1.last_partition.step_count == 1
    # an ablation can leave the steps before the start unobserved
    assert not gates_for("layer", observe_before_start=False).observes_inactive


def test_a_new_run_starts_afresh():
    gates = gates_for()
    for sigma in (10.0, 5.0):
        gates.attention_probabilities(KEY, *plant(range(2)), HEADS, info(sigma))
    assert gates.last_partition.steps == 1
    gates.attention_probabilities(KEY, *plant([3]), HEADS, info(10.0))  # sigma went up: a new run
    assert gates.last_partition.steps == 0 and gates.last_partition.step_count == 1
    assert red_columns(gates.attention_probabilities(KEY, *plant([3]), HEADS, info(10.0))) == {3}


def test_moving_average_maths():
    state = PartitionState(memory=0.5)
    a, b, c = (torch.full((1, 16, 2), v) for v in (1.0, 3.0, 5.0))
    state.clock({"sigmas": torch.tensor([3.0])})
    state.add(a, 4, 4, (1, 2))
    state.add(b, 4, 4, (1, 2))  # step 1: mean 2
    state.clock({"sigmas": torch.tensor([2.0])})
    out = state.add(c, 4, 4, (1, 2))  # 0.5 * 2 + 0.5 * 5
    assert torch.allclose(out, torch.full((1, 16, 2), 3.5))
    assert torch.allclose(state.at(2, 2, (1, 2)), torch.full((1, 4, 2), 3.5))
    assert state.at(2, 2, (2, 2)) is None  # another layout: nothing known
    with pytest.raises(ValueError, match="memory"):
        PartitionState(memory=1.0)


def test_group_density_and_regions():
    attention = torch.zeros(1, 4, 3)
    attention[0, :, 2] = 1.0  # token 2 is in no group
    attention[0, 0, 0] = 0.5  # location 0: group 0 concentrated
    attention[0, 1, 1] = 0.1  # location 1: a little of group 1
    attention[0, 3, 1] = 0.1
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    density = group_density(attention, onehot)
    assert torch.allclose(density.mean(dim=1), torch.ones(1, 2))  # mean 1 over the grid
    assert regions(density).tolist() == [[0, 1, -1, 1]]  # location 2: nobody above the mean -> background


def test_end_tokens_are_hidden_inside_regions_only():
    gates = gates_for(end_tokens="hide_in_regions")
    # columns 0-1: red book; column 2 attends to the vase; column 3 attends to nothing grouped (background)
    q, k = plant(range(2))
    q = q.view(1, H, W, HEADS, D)
    q[:, :, 3] = 0.0
    p = gates.attention_probabilities(KEY, q.reshape(1, H * W, HEADS * D), k, HEADS, info(10.0))
    end_kept = (p[0][:, END] > 0.5).view(H, W, len(END))
    assert not end_kept[:, :3].any() and end_kept[:, 3].all()
    assert (p[0][:, 0] == 1).all()  # the start token stays everywhere: no softmax row is ever empty
    keep = gates_for(end_tokens="keep")
    p = keep.attention_probabilities(KEY, q.reshape(1, H * W, HEADS * D), k, HEADS, info(10.0))
    assert (p[0][:, END] == 1).all()


def test_self_attention_bias_maths():
    region = torch.tensor([[0, 0, 1, -1]])
    bias = self_attention_bias(region, -1e4, torch.float32)[0]
    expected = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32) * -1e4
    assert torch.equal(bias, expected)
    assert (bias.diagonal() == 0).all()
    gates = gates_for(self_attention="separate_groups")
    q, k = plant(range(2))
    assert gates.self_attention_bias(KEY, q, HEADS, info(10.0), -1e4) is None  # nothing aggregated yet
    gates.attention_probabilities(KEY, q, k, HEADS, info(10.0))
    b = gates.self_attention_bias(KEY, q, HEADS, info(10.0), -1e4)[0].view(H, W, H, W)
    assert (b[:, :2, :, 2:] == -1e4).all() and (b[:, 2:, :, :2] == -1e4).all()
    assert (b[:, :2, :, :2] == 0).all() and (b[:, 2:, :, 2:] == 0).all()
    # uncond rows are never masked
    two = gates.self_attention_bias(KEY, q.expand(2, -1, -1), HEADS, {**info(10.0), "cond_or_uncond": [1, 0]},
                                    -1e4)
    assert (two[0] == 0).all() and torch.equal(two[1], b.reshape(16, 16))
    # off: no bias at all
    assert gates_for().self_attention_bias(KEY, q, HEADS, info(10.0), -1e4) is None


def test_region_masks_at_image_size():
    # v1's regions come from the aggregate it keeps beside its own partition
    v1 = gates_for("layer")
    assert v1.region_masks(32, 48) is None  # no run seen
    v1.attention_probabilities(KEY, *plant(range(2)), HEADS, info(10.0))
    assert v1.region_masks(32, 48).shape == (1, 2, 32, 48) and v1.last_partition.inside is not None
    gates = gates_for()
    assert gates.region_masks(32, 48) is None and gates.leakage() == []  # no run seen
    gates.attention_probabilities(KEY, *plant(range(2)), HEADS, info(10.0))
    masks = gates.region_masks(32, 48)
    assert masks.shape == (1, 2, 32, 48) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks[0, 0, :, :20] == 1).all() and (masks[0, 0, :, 28:] == 0).all()  # red book: left half
    assert (masks[0, 1, :, 28:] == 1).all() and (masks[0, 1, :, :20] == 0).all()
    assert (masks.sum(dim=1) <= 1).all()  # regions never overlap
    assert gates.group_labels() == ["red book", "yellow vase"]
    direct = image_masks(torch.tensor([[[[2.0, 0.5]], [[0.0, 0.5]]]]), 1, 2)
    assert direct.tolist() == [[[[1.0, 0.0]], [[0.0, 0.0]]]]  # right cell: no group at the mean -> background


def test_leakage_on_planted_maps():
    """Head 0 puts the red book on the left half; head 1 attends uniformly: of the book's attention (averaged over
    heads), the share inside the left half is known in closed form."""
    gates = gates_for()
    q, k = plant(range(2))
    gates.attention_probabilities(KEY, q, k, HEADS, info(10.0))
    attention = torch.softmax(q.view(1, 16, HEADS, D).transpose(1, 2) @ k.view(1, 16, HEADS, D).permute(0, 2, 3, 1)
                              * D ** -0.5, -1).mean(1)[0]  # [16, 16]
    left = torch.tensor([c < 2 for _ in range(H) for c in range(W)])
    expected = float(attention[left, 2].sum() / attention[:, 2].sum())
    report = dict((w, s) for w, _, s in gates.leakage())
    assert report["red"] == pytest.approx(expected, rel=1e-5)
    assert 0.5 < report["red"] < 1.0 and report["vase"] == pytest.approx(report["red"], rel=1e-5)
    assert "red (red book): " in gates.leakage_text()
    # a stronger plant concentrates the word more: less leaks
    sharp = gates_for()
    sharp.attention_probabilities(KEY, q, k * 3.0, HEADS, info(10.0))
    assert dict((w, s) for w, _, s in sharp.leakage())["red"] > report["red"]


@pytest.mark.parametrize("partition", ["layer", "aggregate"])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9, 0.99999999, 1.0])
def test_runtime_skips_the_empty_row_rule_only_where_it_is_a_no_op(partition, threshold):
    """Zero-shot gates keep the start token (P = 1) everywhere, so the runtime skips gate_bias's empty-row rule: the
    bits must be gate_bias's own; with every token grouped or hidden, or at threshold 1, the rule runs."""
    from comfyui_maskattn.masks.gate import gate_bias
    from comfyui_maskattn.masks.runtime import GateRuntime

    q, k = plant(range(2))
    gates = gates_for(partition)
    assert gates.keeps_a_token_per_row
    runtime = GateRuntime(gates=gates, sites=frozenset({KEY}), threshold=threshold)
    result = runtime.compute_from_attention(KEY, q, k, HEADS, None, info(10.0))
    reference = gate_bias(gates_for(partition).attention_probabilities(KEY, q, k, HEADS, info(10.0)), threshold)
    assert torch.equal(result.hard, reference.hard) and torch.equal(result.probabilities, reference.probabilities)
    assert torch.equal(result.bias, reference.bias)
    assert torch.equal(torch.signbit(result.bias), torch.signbit(reference.bias))  # signed zeros too
    # a context with no ungrouped token that stays visible: the guarantee is gone
    every = ZeroShotGates(group_prompt("a red book and a yellow vase"), [0] * 8 + [1] * 8, token_kinds=["text"] * 16)
    assert not every.keeps_a_token_per_row
    hidden = gates_for(partition, end_tokens="hide_in_regions")
    assert hidden.keeps_a_token_per_row  # (the start token is never hidden)
    only_end = ZeroShotGates(group_prompt("a red book and a yellow vase"), [0] * 8 + [1] * 7 + [-1],
                             token_kinds=["text"] * 15 + ["end"], end_tokens="hide_in_regions")
    assert not only_end.keeps_a_token_per_row  # the one ungrouped token is an end token, hidden in the regions
    only_end.end_tokens = "keep"  # (an option changed after building: the guarantee follows it)
    assert only_end.keeps_a_token_per_row
