"""Context gates (masks/context.py), pure: the head, its context features, the run's aggregate, its gate files.

The planted world is the reason the head exists: two objects whose locations have identical features, told apart only
by the run's aggregate attention. A context head learns it; the reference head cannot.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comfyui_maskattn.masks import gatefile
from comfyui_maskattn.masks.context import (
    CONTEXT_FEATURES,
    FEATURES_KEY,
    ContextGateHead,
    ContextGates,
    ContextRun,
    context_features,
    token_density,
)
from comfyui_maskattn.masks.gate import GateHead
from comfyui_maskattn.masks.gatefile import GateFileError, load_gates, save_gates
from comfyui_maskattn.masks.gates import MaskAttnGates
from comfyui_maskattn.masks.run_state import RUN_STATE_KEY
from comfyui_maskattn.masks.topology import CrossAttnSite

FIXTURE = Path(__file__).parent / "fixtures" / "reference_v1.safetensors"  # written by the pack before context gates
KEY = ("input", 7, 0)
SITES = {("input", 7, 0): "mid", ("output", 1, 0): "mid", ("middle", 0, 0): "low"}


def _site(key, stage, c=32, d=24):
    return CrossAttnSite(key[0], key[1], key[2], c, d, 2, 1, 0, -1, stage)


def _sites():
    return [_site(k, s) for k, s in SITES.items()]


def _randomised(gates, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gates.heads.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return gates


# --- the planted world ----------------------------------------------------------------------------------------------
def _planted_batch(gen, b=8, n=16, c=8, d=8):
    """Per item: every location has the same features; two tokens (two objects) with random text states; each
    location belongs to one object at random; the aggregate density says which. Target: a location keeps its own
    object's token and closes the other's."""
    features = torch.randn(b, 1, c, generator=gen).expand(b, n, c).contiguous()
    tokens = torch.randn(b, 2, d, generator=gen)
    owner = torch.randint(2, (b, n), generator=gen)
    target = torch.nn.functional.one_hot(owner, 2).float()  # [b, n, 2]
    density = target * (1.5 + torch.rand(b, n, 2, generator=gen)) + (1 - target) * 0.3 * torch.rand(b, n, 2,
                                                                                                        generator=gen)
    return features, tokens, context_features(density, (b, n, 2)), target


def _train_planted(head, steps=300):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(steps):
        f, t, ctx, target = _planted_batch(gen)
        logits = head.logits(f, t, ctx) if isinstance(head, ContextGateHead) else head.logits(f, t)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    f, t, ctx, target = _planted_batch(torch.Generator().manual_seed(99), b=64)
    with torch.no_grad():
        logits = head.logits(f, t, ctx) if isinstance(head, ContextGateHead) else head.logits(f, t)
    return float(((logits > 0).float() == target).float().mean())


def test_only_the_context_head_learns_objects_that_look_alike():
    torch.manual_seed(0)
    context = _train_planted(ContextGateHead(8, 8, 16))
    torch.manual_seed(0)
    reference = _train_planted(GateHead(8, 8, 16))
    assert context >= 0.95, context
    assert reference <= 0.7, reference


# --- the head ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [(1280, 2048, 128), (640, 2048, 128), (320, 768, 128), (32, 24, 8)])
def test_context_head_has_at_most_twice_the_parameters_of_a_reference_head(dims):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ContextGateHead(*dims)) <= 2 * count(GateHead(*dims))


def test_a_fresh_context_head_gives_the_reference_heads_bits():
    torch.manual_seed(0)
    ref = GateHead(32, 24, 8)
    ctx_head = ContextGateHead(32, 24, 8)
    ctx_head.load_state_dict(ref.state_dict(), strict=False)
    f, t = torch.randn(2, 10, 32), torch.randn(2, 5, 24)
    density = torch.rand(2, 10, 5) * 3
    for ctx in (context_features(None, (2, 10, 5)), context_features(density, (2, 10, 5))):
        assert torch.equal(ctx_head.logits(f, t, ctx), ref.logits(f, t))


def test_context_sets_made_from_one_seed_share_every_reference_tensor():
    ref = MaskAttnGates.fresh(_sites(), hidden_dim=8, seed=3)
    ctx = ContextGates.fresh(_sites(), hidden_dim=8, seed=3)
    assert ctx.site_heads == ref.site_heads and all(isinstance(h, ContextGateHead) for h in ctx.heads)
    for a, b in zip(ref.heads, ctx.heads):
        for name, t in a.state_dict().items():
            assert torch.equal(t, b.state_dict()[name]), name


def test_context_features():
    zeros = context_features(None, (2, 3, 4))
    assert zeros.shape == (2, 3, 4, CONTEXT_FEATURES) and not zeros.any()
    d = torch.tensor([[[2.0, 0.5]]])
    ctx = context_features(d, (1, 1, 2))
    expected = torch.tensor([[[[torch.log(torch.tensor(2.001)), 0.0, 1.0],
                               [torch.log(torch.tensor(0.501)), torch.log(torch.tensor(0.501 / 2.001)), 1.0]]]])
    assert torch.allclose(ctx, expected, atol=1e-6)
    attention = torch.softmax(torch.randn(2, 6, 3), dim=-1)
    assert torch.allclose(token_density(attention).mean(dim=1), torch.ones(2, 3))


# --- the gates at the attention call ----------------------------------------------------------------------------------
def _call(gates, key, q, k, sigmas, run=None, heads=2):
    b, n, c = q.shape[0], q.shape[1], 32
    gen = torch.Generator().manual_seed(n)
    info = {"sigmas": sigmas, "original_shape": [b, 4, 4, 4], "cond_or_uncond": [0] * b,
            FEATURES_KEY: (torch.randn(b, n, c, generator=gen), torch.randn(b, k.shape[1], 24, generator=gen))}
    if run is not None:
        info[RUN_STATE_KEY] = run
    return gates.attention_probabilities(key, q, k, heads, info), info


def test_the_first_layer_of_a_run_reads_no_context_and_later_ones_read_the_aggregate():
    gates = _randomised(ContextGates.fresh(_sites(), hidden_dim=8, seed=0))
    with torch.no_grad():
        for h in gates.heads:
            h.context_net[2].weight.fill_(1.0)
    q, k = torch.randn(1, 16, 8), torch.randn(1, 5, 8)
    run = gates.new_run()
    s = torch.tensor([10.0])
    p1, info = _call(gates, KEY, q, k, s, run)
    head = gates.head(KEY)
    ref = torch.sigmoid(GateHead.logits(head, *(t.float() for t in info[FEATURES_KEY])))
    zero_ctx = head.context_net(torch.zeros(CONTEXT_FEATURES)).squeeze()
    assert torch.allclose(p1, torch.sigmoid(torch.logit(ref) + zero_ctx), atol=1e-5)
    assert run.state.step_count == 1
    p2, _ = _call(gates, KEY, q, k, s, run)
    assert not torch.allclose(p1, p2) and run.state.step_count == 2
    # another run starts empty: what one patched model gathered never reaches another
    p3, _ = _call(gates, KEY, q, k, s, gates.new_run())
    assert torch.equal(p1, p3)


def test_a_training_run_sees_each_site_once():
    """A gradient-checkpointed block recomputes its forward: the second call reads the first call's context and
    adds nothing, so the recomputation gives the forward's bits."""
    gates = _randomised(ContextGates.fresh(_sites(), hidden_dim=8, seed=0))
    run = gates.training_run()
    q, k, s = torch.randn(1, 16, 8), torch.randn(1, 5, 8), torch.tensor([3.0])
    _call(gates, ("input", 7, 0), q, k, s, run)
    first, _ = _call(gates, ("output", 1, 0), q, k, s, run)
    again, _ = _call(gates, ("output", 1, 0), q, k, s, run)
    assert torch.equal(first, again) and run.state.step_count == 2


def test_probabilities_are_differentiable_when_the_heads_train():
    gates = ContextGates.fresh(_sites(), hidden_dim=8, seed=0)
    gates.heads.requires_grad_(True)
    p, _ = _call(gates, KEY, torch.randn(1, 16, 8), torch.randn(1, 5, 8), torch.tensor([1.0]), gates.new_run())
    p.sum().backward()
    assert gates.head(KEY).feature_net[1].weight.grad is not None


def test_gates_without_the_features_say_what_is_missing():
    gates = ContextGates.fresh(_sites(), hidden_dim=8, seed=0)
    with pytest.raises(RuntimeError, match="input features"):
        gates.attention_probabilities(KEY, torch.randn(1, 16, 8), torch.randn(1, 5, 8), 2, {})


def test_observing_feeds_the_aggregate_only():
    gates = ContextGates.fresh(_sites(), hidden_dim=8, seed=0)
    run = gates.new_run()
    info = {"sigmas": torch.tensor([5.0]), "original_shape": [1, 4, 4, 4], RUN_STATE_KEY: run}
    gates.observe_attention(KEY, torch.randn(1, 16, 8), torch.randn(1, 5, 8), 2, info)
    assert run.state.step_count == 1 and isinstance(run, ContextRun)
    assert gates.needs_attention and gates.observes_inactive and gates.gate_kind == "context"
    assert MaskAttnGates.gate_kind == "reference" and not MaskAttnGates.needs_attention


# --- gate files -------------------------------------------------------------------------------------------------------
def _context_gates():
    gates = _randomised(ContextGates.fresh(_sites(), hidden_dim=8, seed=0, stage="all", kind="test_only"))
    gates.memory = 0.25
    return gates


def _content(path: Path):
    """A safetensors file as (header, tensor bytes). The header is compared parsed: safetensors writes the metadata
    map in no fixed order (a Rust HashMap), so two writes of the same gates differ in byte order there alone."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def test_context_file_round_trip(tmp_path):
    gates = _context_gates()
    path = save_gates(gates, tmp_path / "ctx.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["gate_kind"] == "context" and meta["format_version"] == "2"
    assert (meta["context_features"], meta["context_hidden"], meta["memory"]) == ("3", "16", "0.25")
    loaded = load_gates(path)
    assert isinstance(loaded, ContextGates) and loaded.memory == 0.25 and loaded.kind == "test_only"
    assert loaded.site_heads == gates.site_heads and loaded.site_stages == gates.site_stages
    for a, b in zip(gates.heads, loaded.heads):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    again = save_gates(loaded, tmp_path / "again.safetensors")
    assert _content(again) == _content(path)


def test_reference_files_are_written_as_before(tmp_path):
    """A file the pack wrote before context gates existed loads, and saves again to the same header and tensor bytes:
    reference files stay version 1 with no gate_kind, readable by every pack."""
    loaded = load_gates(FIXTURE)
    assert type(loaded) is MaskAttnGates and loaded.gate_kind == "reference"
    path = save_gates(loaded, tmp_path / "reference_v1.safetensors")
    assert _content(path) == _content(FIXTURE)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == "1" and "gate_kind" not in meta
    fresh = _randomised(MaskAttnGates.fresh(_sites(), hidden_dim=8, seed=1))
    first = save_gates(fresh, tmp_path / "a.safetensors")
    second = save_gates(load_gates(first), tmp_path / "b.safetensors")
    assert _content(first) == _content(second)


def test_an_older_pack_refuses_a_context_file(tmp_path, monkeypatch):
    path = save_gates(_context_gates(), tmp_path / "ctx.safetensors")
    monkeypatch.setattr(gatefile, "FORMAT_VERSION", 1)
    with pytest.raises(GateFileError, match=r"ctx\.safetensors: gate format version 2 is newer than this pack reads "
                                            r"\(1\); update the MaskAttn node pack"):
        load_gates(path)


def test_an_unknown_gate_kind_is_refused_by_name(tmp_path):
    path = save_gates(_context_gates(), tmp_path / "odd.safetensors", extra_metadata={"gate_kind": "oracle"})
    with pytest.raises(GateFileError, match=r"odd\.safetensors: gate kind 'oracle' .*\(reference, context\)"):
        load_gates(path)
