"""Every sampling-time executor computes exactly what the spec path (GateRuntime.compute) computes."""

import pytest
import torch

from comfyui_maskattn.masks.attention import DeferredBias
from comfyui_maskattn.masks.gates import MaskAttnGates
from comfyui_maskattn.masks.runtime import EXECUTORS, EagerExecutor, GateRuntime, GraphExecutor
from comfyui_maskattn.masks.topology import CrossAttnSite

from benchmarks.low_precision_gate import LowPrecisionExecutor

SITES = [CrossAttnSite("input", 7, i, 48, 40, 4, 2, 0, -1, "mid") for i in range(3)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def runtime(bias_fill=None, seed=0, graphs=False, device_skip=False, **kw):
    gates = MaskAttnGates.fresh(SITES, hidden_dim=16, seed=seed)
    with torch.no_grad():
        for p in gates.heads.parameters():
            p.normal_(0, 0.4)
        if bias_fill is not None:
            gates.heads[0].logit_bias.fill_(bias_fill)
    kw.setdefault("executor", (GraphExecutor if graphs else EagerExecutor)(device_skip=device_skip))
    return GateRuntime(gates=gates, sites=frozenset(s.key for s in SITES), **kw)


def bits(t):
    """The raw bits of a float tensor: torch.equal takes -0.0 for 0.0, the attention's logits + bias may not."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_decision(fast, plain):
    """fast: what GateRuntime.bias returned; plain: the spec path's usable bias (None: suppresses nothing)."""
    if isinstance(fast, DeferredBias):  # device_skip: the same bias, and the skip decided on the device
        assert fast.unmasked.shape == () and fast.unmasked.dtype == torch.bool
        assert bool(fast.unmasked) == (plain is None)
        assert torch.equal(fast.bias, torch.zeros_like(fast.bias) if plain is None else plain)
        if plain is not None:
            assert torch.equal(bits(fast.bias), bits(plain))
    elif plain is None:
        assert fast is None
    else:
        assert fast is not None and fast.dtype == plain.dtype and torch.equal(bits(fast), bits(plain))


# mixed, all kept, every row empty (fallback), about a quarter of the rows empty
@pytest.mark.parametrize("bias_fill", [None, 12.0, -12.0, -3.0])
@pytest.mark.parametrize("cond_only", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
@pytest.mark.parametrize("skip_unmasked", [True, False])
@pytest.mark.parametrize("executor", sorted(EXECUTORS))
@pytest.mark.parametrize("device", DEVICES)
def test_every_executor_gives_the_spec_bits(device, executor, skip_unmasked, bias_fill, cond_only, threshold):
    """The one test every executor answers to: on the same inputs, over two steps, the bias (or the skip) it hands
    the attention is the spec path's, bit for bit. On the CPU the graph executors replay their program eagerly on
    the graph's buffers; on CUDA they capture it."""
    rt = runtime(bias_fill, threshold=threshold, cond_only=cond_only, skip_unmasked=skip_unmasked,
                 executor=EXECUTORS[executor]())
    graphs, deferred = isinstance(rt.executor, GraphExecutor), rt.executor.device_skip and skip_unmasked
    torch.manual_seed(1)
    context = torch.randn(4, 77, 40, device=device)
    rows = torch.tensor([False, True, False, True], device=device) if cond_only else None
    with torch.inference_mode():
        for step in range(2):
            for key in sorted(rt.sites):  # several layers of one shared head reuse the cached text side
                x = torch.randn(4, 36, 48, device=device)
                fast = rt.bias(key, x, context, rows)
                assert isinstance(fast, DeferredBias) == deferred
                assert_same_decision(fast, rt.usable(rt.compute(key, x, context, rows)))
                if fast is not None and (graphs or device == "cuda"):  # rows padded for SDPA's aligned-mask kernel
                    assert (fast.bias if deferred else fast).stride()[-2:] == (80, 1)
    assert len(rt._token_cache) == 1 and rt._token_cache[0][0] is context
    if graphs:
        assert len(rt.executor.graphs) == len(set(rt.gates.site_heads[k] for k in rt.sites))  # one per head
        assert rt.stats["eager"] == 0


def test_empty_row_rule_searching_only_the_empty_rows_matches_the_full_argmax():
    """The CPU's synced path takes the argmax of the empty rows alone; it must pick what the full argmax picks, the
    first maximum (ties here are frequent: scores come in steps of 0.25), and leave the other rows alone."""
    from comfyui_maskattn.masks.runtime import _keep_argmax_of_empty_rows

    torch.manual_seed(0)
    for shape in [(2, 50, 77), (3, 7, 5), (1, 1, 1)]:
        scores = torch.randint(0, 4, shape).float() / 4
        hard = (torch.rand(shape) > 0.9) & (torch.rand(shape[:-1] + (1,)) > 0.5)  # about half the rows empty
        kept = hard.sum(-1, keepdim=True, dtype=torch.int32)
        assert shape[-1] == 1 or 0 < int((kept == 0).sum()) < kept.numel()
        full, rows_only = hard.clone(), hard.clone()
        _keep_argmax_of_empty_rows(full, kept, scores)
        _keep_argmax_of_empty_rows(rows_only, kept, scores, only_empty=True)
        assert torch.equal(full, rows_only) and bool(full.any(-1).all())
        assert torch.equal(full[kept.squeeze(-1) > 0], hard[kept.squeeze(-1) > 0])


class _LogitsHead:
    """Stands in for a GateHead: hands EagerExecutor.hard_gate chosen logits (the comparison is what is under test)."""

    def __init__(self, logits):
        self._logits = logits

    def fast_logits(self, features, token_features_t):
        return self._logits


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.1, 0.7, 1 / 3, 0.0, 1.0])
@pytest.mark.parametrize("negative_value", [-1.0e4, -0.6931471805599453])
def test_the_cpu_float_mask_decides_and_biases_exactly_as_the_bool_mask(threshold, negative_value):
    """The CPU's synced path compares into a float 0/1 tensor (vector code) instead of a bool one, counts and builds
    the bias from it. Same decisions at and around the threshold (float32(t) itself, its neighbours, sigmoid's 0 and 1,
    NaN), same counts, and the same bias bits, -0.0 on kept pairs included."""
    from comfyui_maskattn.masks.runtime import _keep_argmax_of_empty_rows, bias_from_gate, bias_from_keep

    near = [torch.tensor(threshold, dtype=torch.float32)] * 2  # float32(t), then 30 neighbours each way
    for _ in range(30):
        near += [torch.nextafter(near[-2], torch.tensor(2.0)), torch.nextafter(near[-1], torch.tensor(-1.0))]
    probabilities = torch.cat([torch.stack(near), torch.tensor([0.0, 1.0, float("nan")]), torch.rand(400)])
    logits = torch.logit(probabilities.double()).float()  # sigmoid(logit(p)) lands on or next to p
    logits = torch.cat([logits, torch.randn(6)])[torch.randperm(470, generator=torch.Generator().manual_seed(0))]
    logits = torch.stack([logits, logits.flip(0)]).view(2, -1, 47)  # cond and uncond rows, 10 locations each
    logits[:, :3] = -200.0  # three rows emptied (sigmoid gives 0.0): the fallback runs on both
    rt = GateRuntime(gates=runtime().gates, sites=frozenset(), threshold=threshold, negative_value=negative_value)
    for cond_rows in (None, torch.tensor([True, False])):
        hard, scores, _, kept = rt.executor.hard_gate(rt, _LogitsHead(logits), logits, logits, cond_rows)
        keep, scores_f, _, kept_f = rt.executor.hard_gate(rt, _LogitsHead(logits), logits, logits, cond_rows,
                                                          as_float=True)
        assert keep.dtype == torch.float32 and torch.equal(keep, hard.float()) and torch.equal(kept_f, kept.float())
        assert int((kept == 0).sum()) >= 3
        _keep_argmax_of_empty_rows(hard, kept, scores, only_empty=True)
        _keep_argmax_of_empty_rows(keep, kept_f, scores_f, only_empty=True)
        assert torch.equal(keep, hard.float())
        assert torch.equal(bits(bias_from_keep(keep, negative_value)),
                           bits(bias_from_gate(hard, torch.float32, negative_value)))
        assert bool(torch.signbit(bias_from_keep(keep, negative_value)[keep == 1]).all())  # -0.0, as the spec's


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("device_skip", [False, True])
def test_a_single_token_is_never_suppressed(graphs, device_skip):
    """With one token every location keeps it (the empty-row rule), so the bias is all zeros and the spec path runs
    the unmasked attention; every executor decides so too, although rows were empty before the rule."""
    rt = runtime(-12.0, graphs=graphs, device_skip=device_skip)
    key = sorted(rt.sites)[0]  # served by head 0, whose logit bias empties every row
    x, c = torch.randn(2, 9, 48), torch.randn(2, 1, 40)
    with torch.inference_mode():
        assert not bool(rt.compute(key, x, c).probabilities.gt(0.5).any())
        assert rt.usable(rt.compute(key, x, c)) is None
        assert_same_decision(rt.bias(key, x, c), None)


@pytest.mark.parametrize("graphs", [False, True])
def test_device_skip_reads_nothing_back_from_the_device(graphs):
    """On the 'meta' device any read of a tensor's value on the host (int(), bool(), .item()) raises: so a gate that
    runs there end to end makes no host sync. The synced default, run the same way, must raise (the check works)."""
    rt = runtime(graphs=graphs, device_skip=True)
    meta = torch.device("meta")
    x, c = torch.randn(2, 9, 48, device=meta), torch.randn(2, 77, 40, device=meta)
    with torch.inference_mode():
        for key in sorted(rt.sites):
            out = rt.bias(key, x, c)
            assert isinstance(out, DeferredBias) and out.bias.device == meta and out.unmasked.device == meta
        rt.executor = type(rt.executor)(device_skip=False)
        with pytest.raises((RuntimeError, NotImplementedError)):
            rt.bias(sorted(rt.sites)[0], x, c)


def test_masked_attention_with_a_deferred_bias_keeps_the_unmasked_output_where_flagged():
    from comfyui_maskattn.masks.attention import masked_attention

    calls = []

    def plain(q, k, v, heads, **kw):
        calls.append("plain")
        return torch.full_like(q, 1.0)

    def masked(q, k, v, heads, mask=None, **kw):
        calls.append("masked")
        assert mask.shape == (2, 1, 5, 3)
        return torch.full_like(q, 2.0)

    q, k = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    bias = torch.zeros(2, 5, 3)
    for flag, value in ((True, 1.0), (False, 2.0)):
        out = masked_attention(q, k, k, 2, DeferredBias(bias, torch.tensor(flag)), plain, masked)
        assert torch.equal(out, torch.full_like(q, value))
    assert calls == ["masked", "plain"] * 2
    assert torch.equal(masked_attention(q, k, k, 2, None, plain, masked), torch.full_like(q, 1.0))
    assert torch.equal(masked_attention(q, k, k, 2, bias, plain, masked), torch.full_like(q, 2.0))


def test_text_side_is_recomputed_for_a_new_conditioning():
    rt = runtime()
    key = next(iter(rt.sites))
    x = torch.randn(2, 9, 48)
    with torch.inference_mode():
        a = rt.bias(key, x, torch.randn(2, 77, 40))
        b = rt.bias(key, x, torch.randn(2, 77, 40))
    assert not torch.equal(a, b)


def test_half_precision_features_get_a_half_bias_with_the_same_values():
    rt = runtime()
    key = next(iter(rt.sites))
    x, c = torch.randn(2, 9, 48), torch.randn(2, 77, 40)
    with torch.inference_mode():
        full = rt.bias(key, x, c)
        half = rt.bias(key, x.half(), c.half())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert set(half.unique().tolist()) <= {0.0, -10000.0} and full.dtype == torch.float32


def test_observers_see_probabilities_hard_gate_and_bias():
    torch.manual_seed(0)  # (unseeded, an unlucky draw of weights and features leaves a pair under the threshold)
    rt = runtime(bias_fill=12.0)
    seen = []
    rt.observers.append(lambda key, result, info: seen.append((key, result)))
    key = next(iter(rt.sites))
    with torch.inference_mode():
        assert rt.bias(key, torch.randn(1, 9, 48), torch.randn(1, 77, 40), info={"step": 1}) is None
    (k, result), = seen
    assert k == key and result.hard.shape == (1, 9, 77) and bool(result.hard.all())
    assert ((result.probabilities > 0.5) == result.hard.bool()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_padded_bias_is_one_aligned_view_with_the_same_values(dtype):
    from comfyui_maskattn.masks.runtime import bias_from_gate

    hard = torch.rand(2, 33, 77) > 0.4
    plain = bias_from_gate(hard, dtype, -1.0e4)
    padded = bias_from_gate(hard, dtype, -1.0e4, padded=True)
    assert padded.dtype == dtype and padded.shape == plain.shape and torch.equal(bits(padded), bits(plain))
    # SDPA's efficient kernel takes a mask as it is only when every stride but the last is a multiple of 8
    assert padded.stride() == (33 * 80, 80, 1)
    mask = padded.unsqueeze(1)
    assert all(s % 8 == 0 for s in mask.stride()[:-1]) and mask.stride(-1) == 1


# --- the benchmark-only low-precision executor (benchmarks/low_precision_gate.py): not exact, within a margin ------
@pytest.mark.parametrize("gate_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_fill", [None, -12.0])  # mixed rows; every row of head 0 empty (fallback)
def test_low_precision_gate_agrees_wherever_the_logit_is_clear_of_the_threshold(gate_dtype, bias_fill):
    """A low-precision gate trades exactness for speed: a decision may flip only for a pair whose float32 logit lies
    within that dtype's rounding of the threshold (here: 0.1 in logit units for float16, 0.5 for bfloat16)."""
    exact = runtime(bias_fill, seed=3)
    fast = GateRuntime(gates=exact.gates, sites=exact.sites, executor=LowPrecisionExecutor(gate_dtype))
    margin = 0.1 if gate_dtype == torch.float16 else 0.5
    torch.manual_seed(2)
    context = torch.randn(2, 77, 40)
    flips = 0
    with torch.inference_mode():
        for key in sorted(exact.sites):
            x = torch.randn(2, 64, 48) * 3
            reference, approximate = exact.bias(key, x, context), fast.bias(key, x, context)
            assert approximate is not None and torch.isfinite(approximate).all()
            logits = exact._head(key, x.device)[1].logits(x, context)
            top2 = logits.topk(2, dim=-1).values
            full_rows = top2[..., 0] > margin  # rows that keep a token by threshold in both precisions
            empty_rows = (top2[..., 0] < -margin) & (top2[..., 0] - top2[..., 1] > margin)  # same argmax token
            clear = (logits.abs() > margin) & full_rows[..., None] | empty_rows[..., None]
            assert torch.equal((approximate != 0)[clear], (reference != 0)[clear])
            assert ((approximate == 0).sum(-1) >= 1).all()  # no row loses every token
            flips += int(((approximate != 0) != (reference != 0)).sum())
    assert flips < 0.01 * 3 * 2 * 64 * 77


def test_low_precision_gate_gives_observers_float32_probabilities():
    rt = runtime(seed=1, executor=LowPrecisionExecutor(torch.float16))
    seen = []
    rt.observers.append(lambda key, result, info: seen.append(result))
    key = next(iter(rt.sites))
    with torch.inference_mode():
        bias = rt.bias(key, torch.randn(1, 9, 48), torch.randn(1, 77, 40))
    (result,) = seen
    assert result.probabilities.dtype == torch.float32 and bias.dtype == torch.float32
    assert torch.equal(result.hard.bool(), bias == 0)


# --- the graph executor: a replayed program on fixed buffers (a CUDA graph on CUDA; eager replay here) ----------
@pytest.mark.parametrize("device_skip", [False, True])
def test_graphs_of_one_shape_share_their_feature_and_output_buffers_and_stay_exact(device_skip):
    """A gate file with a head per layer: one graph per head, but one feature buffer and one bias per shape."""
    gates = MaskAttnGates.fresh(SITES, hidden_dim=16, share_by_stage=False, seed=3)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in gates.heads.parameters():
            p.normal_(0, 0.4)
    rt = GateRuntime(gates=gates, sites=frozenset(s.key for s in SITES), executor=GraphExecutor(device_skip))
    torch.manual_seed(2)
    context = torch.randn(2, 77, 40)
    with torch.inference_mode():
        for n in (36, 16, 36):  # two resolutions, interleaved
            for key in sorted(rt.sites):
                x = torch.randn(2, n, 48)
                assert_same_decision(rt.bias(key, x, context), rt.usable(rt.compute(key, x, context)))
    graphs = list(rt.executor.graphs._graphs.values())
    assert len(graphs) == 2 * len(SITES) and rt.stats["eager"] == 0
    for n in (36, 16):
        same = [gr for gr in graphs if gr.inputs["x"].shape[1] == n]
        assert len({id(gr.inputs["x"]) for gr in same}) == 1 and len({id(gr.outputs["bias"]) for gr in same}) == 1
        assert len({id(gr.inputs["g"]) for gr in same}) == len(SITES)  # the text side is per head
    assert graphs[0].inputs["x"] is not graphs[-1].inputs["x"]


def test_graph_copies_the_text_side_once_per_conditioning_and_keeps_one_program_per_shape():
    rt = runtime(graphs=True)
    key = sorted(rt.sites)[0]
    context = torch.randn(2, 77, 40)
    with torch.inference_mode():
        rt.bias(key, torch.randn(2, 9, 48), context)
        (graph,) = rt.executor.graphs._graphs.values()
        g_t = rt._token_cache[0][1]  # g transposed, as the logits' matmul takes it
        assert graph._last["g"] is g_t and torch.equal(graph.inputs["g"], g_t)
        assert graph.inputs["g"].stride() == g_t.stride()
        rt.bias(key, torch.randn(2, 16, 48), context)  # another resolution: another program
        assert len(rt.executor.graphs) == 2
        x, other = torch.randn(2, 9, 48), torch.randn(2, 77, 40)
        new = rt.bias(key, x, other)  # a new prompt: its text side replaces the old one in the buffer
        assert graph._last["g"] is rt._token_cache[0][1] and torch.equal(new, rt.compute(key, x, other).bias)


def test_a_failed_capture_falls_back_to_the_eager_gate_for_good(monkeypatch, caplog):
    from comfyui_maskattn.masks import graphs

    def broken(*args, **kwargs):
        raise RuntimeError("capture not supported here")

    monkeypatch.setattr(graphs, "GateGraph", broken)
    rt = runtime(graphs=True)
    key = sorted(rt.sites)[0]
    x, c = torch.randn(2, 9, 48), torch.randn(2, 77, 40)
    with torch.inference_mode(), caplog.at_level("WARNING", logger="MaskAttn"):
        first = rt.bias(key, x, c)
        second = rt.bias(key, x, c)
    assert torch.equal(first, rt.compute(key, x, c).bias) and torch.equal(second, first)
    assert rt.executor.graphs.failed.startswith("RuntimeError") and len(rt.executor.graphs) == 0
    assert sum("could not capture" in r.getMessage() for r in caplog.records) == 1


def test_graph_cache_drops_the_least_recently_used_beyond_its_limit(monkeypatch):
    from comfyui_maskattn.masks import graphs

    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    rt = runtime(graphs=True)
    key = sorted(rt.sites)[0]
    c = torch.randn(1, 77, 40)
    with torch.inference_mode():
        for n in (4, 5, 4, 6):
            rt.bias(key, torch.randn(1, n, 48), c)
    assert [k[3][1] for k in rt.executor.graphs._graphs] == [4, 6]


def test_a_graph_is_recaptured_when_its_heads_parameters_are_replaced_not_when_updated_in_place():
    """A CUDA graph reads the parameters at their capture-time addresses: replacing them must not replay it."""
    torch.manual_seed(4)
    rt = runtime(-3.0, graphs=True)  # (a negative logit bias: many pairs suppressed before and after the changes)
    key = sorted(rt.sites)[0]
    x, c = torch.randn(2, 9, 48), torch.randn(2, 77, 40)
    head = rt.gates.heads[rt.gates.site_heads[key]]
    with torch.inference_mode():
        rt.bias(key, x, c)
    assert len(rt.executor.graphs) == 1
    with torch.no_grad():
        head.feature_net[1].weight.mul_(-1.0)  # in place: same addresses, the graph reads the new values
    with torch.inference_mode():
        updated = rt.bias(key, x, c)
    assert len(rt.executor.graphs) == 1 and updated is not None
    assert torch.equal(bits(updated), bits(rt.compute(key, x, c).bias))
    state = {name: value.clone() * 0.5 for name, value in head.state_dict().items()}
    head.load_state_dict(state, assign=True)  # new tensors: a replay would read the old, freed storage on CUDA
    c = c.clone()  # (a new conditioning: the text side is cached per conditioning, and the text MLP changed too)
    with torch.inference_mode():
        replaced = rt.bias(key, x, c)
    assert len(rt.executor.graphs) == 2 and replaced is not None
    assert torch.equal(bits(replaced), bits(rt.compute(key, x, c).bias))


@pytest.mark.parametrize("first, then", [("inference", "no_grad"), ("no_grad", "inference")])
def test_a_graph_made_in_one_grad_mode_replays_in_the_other(first, then):
    """ComfyUI samples in inference mode; other callers (previews, other packs) run the model under no_grad."""
    modes = {"inference": torch.inference_mode, "no_grad": torch.no_grad}
    torch.manual_seed(5)
    rt = runtime(-3.0, graphs=True)
    key = sorted(rt.sites)[0]
    x, c = torch.randn(2, 9, 48), torch.randn(2, 77, 40)
    with modes[first]():
        a = rt.bias(key, x, c)
        a = None if a is None else a.clone()  # (the graph's output buffer is rewritten by the next replay)
    with modes[then]():
        b = rt.bias(key, x, c)
    assert a is not None and b is not None and len(rt.executor.graphs) == 1 and rt.stats == {"graph": 2, "eager": 0}
    assert torch.equal(bits(a), bits(b)) and torch.equal(bits(b), bits(rt.compute(key, x, c).bias))


def test_graphs_are_opt_in_and_observers_take_the_eager_path():
    rt = runtime()
    key = sorted(rt.sites)[0]
    with torch.inference_mode():
        rt.bias(key, torch.randn(1, 9, 48), torch.randn(1, 77, 40))
        assert len(getattr(rt.executor, "graphs", ())) == 0 and rt.stats == {"graph": 0, "eager": 1}
        rt.executor = GraphExecutor()
        rt.observers.append(lambda *a: None)
        rt.bias(key, torch.randn(1, 9, 48), torch.randn(1, 77, 40))
        assert len(rt.executor.graphs) == 0 and rt.stats == {"graph": 0, "eager": 2}


def test_capture_branch_captures_once_and_replays_after(monkeypatch):
    """The CUDA branch of GateGraph with torch.cuda's graph API stood in for: warm-up and capture run the program once
    each, at the first call; every later call is a replay (here: the recorded program), never an eager gate."""
    import contextlib

    from comfyui_maskattn.masks import graphs

    calls = {"capture": 0, "replay": 0}

    class FakeGraph:
        program = None

        def replay(self):
            calls["replay"] += 1
            self.program()

    class FakeStream:
        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def fake_capture(graph, pool=None, capture_error_mode="global"):
        calls["capture"] += 1
        yield

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    real_init = graphs.GateGraph.__init__

    def init(self, program, inputs, outputs, capture, pool=None):
        real_init(self, program, inputs, outputs, True, pool)
        self.graph.program = program

    monkeypatch.setattr(graphs.GateGraph, "__init__", init)
    rt = runtime(graphs=True)
    context = torch.randn(2, 77, 40)
    with torch.inference_mode():
        for key in sorted(rt.sites) * 2:
            x = torch.randn(2, 16, 48)
            assert torch.equal(rt.bias(key, x, context), rt.compute(key, x, context).bias)
    heads = len(set(rt.gates.site_heads.values()))
    assert calls == {"capture": heads, "replay": 6} and rt.stats == {"graph": 6, "eager": 0}


def test_padded_bias_takes_its_values_from_the_output_device(monkeypatch):
    """torch.where moves 0-dim CPU operands to the output's device with a blocking copy: on CUDA a host sync per
    gated layer, and an operation CUDA-graph capture refuses. The values must already live on the output's device
    (here 'meta', standing in for 'cuda')."""
    from comfyui_maskattn.masks.runtime import bias_from_gate

    seen = []
    real_where = torch.where

    def spy(condition, kept, suppressed, out=None):
        seen.append((kept.device, suppressed.device, out.device))
        return real_where(condition, kept, suppressed, out=out)

    monkeypatch.setattr(torch, "where", spy)
    hard = torch.empty(2, 16, 77, dtype=torch.bool, device="meta")
    for dtype in (torch.float16, torch.bfloat16):
        bias = bias_from_gate(hard, dtype, -1.0e4, padded=True)
        assert bias.device.type == "meta" and bias.dtype == dtype
    meta = torch.device("meta")
    assert seen == [(meta, meta, meta)] * 2
