"""The sampling-time fast path (issue 5) computes exactly what the straightforward spec path computes."""

import pytest
import torch

from comfyui_maskattn.masks.gates import MaskAttnGates
from comfyui_maskattn.masks.runtime import GateRuntime
from comfyui_maskattn.masks.topology import CrossAttnSite

SITES = [CrossAttnSite("input", 7, i, 48, 40, 4, 2, 0, -1, "mid") for i in range(3)]


def runtime(bias_fill=None, seed=0, **kw):
    gates = MaskAttnGates.fresh(SITES, hidden_dim=16, seed=seed)
    with torch.no_grad():
        for p in gates.heads.parameters():
            p.normal_(0, 0.4)
        if bias_fill is not None:
            gates.heads[0].logit_bias.fill_(bias_fill)
    return GateRuntime(gates=gates, sites=frozenset(s.key for s in SITES), **kw)


@pytest.mark.parametrize("bias_fill", [None, 12.0, -12.0])  # mixed, all kept, every row empty (fallback)
@pytest.mark.parametrize("cond_only", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_fast_bias_equals_straightforward_bias(bias_fill, cond_only, threshold):
    rt = runtime(bias_fill, threshold=threshold, cond_only=cond_only)
    torch.manual_seed(1)
    context = torch.randn(4, 77, 40)
    rows = torch.tensor([False, True, False, True]) if cond_only else None
    with torch.inference_mode():
        for key in rt.sites:  # several layers of one shared head reuse the cached text side
            x = torch.randn(4, 36, 48)
            fast = rt.fast_bias(key, x, context, rows)
            plain = rt.usable(rt.compute(key, x, context, rows))
            if plain is None:
                assert fast is None
            else:
                assert fast is not None and torch.equal(fast, plain)
    assert len(rt._token_cache) == 1 and rt._token_cache[0][0] is context


def test_text_side_is_recomputed_for_a_new_conditioning():
    rt = runtime()
    key = next(iter(rt.sites))
    x = torch.randn(2, 9, 48)
    with torch.inference_mode():
        a = rt.fast_bias(key, x, torch.randn(2, 77, 40))
        b = rt.fast_bias(key, x, torch.randn(2, 77, 40))
    assert not torch.equal(a, b)


def test_half_precision_features_get_a_half_bias_with_the_same_values():
    rt = runtime()
    key = next(iter(rt.sites))
    x, c = torch.randn(2, 9, 48), torch.randn(2, 77, 40)
    with torch.inference_mode():
        full = rt.fast_bias(key, x, c)
        half = rt.fast_bias(key, x.half(), c.half())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert set(half.unique().tolist()) <= {0.0, -10000.0} and full.dtype == torch.float32


def test_observers_see_probabilities_hard_gate_and_bias():
    rt = runtime(bias_fill=12.0)
    seen = []
    rt.observers.append(lambda key, result, info: seen.append((key, result)))
    key = next(iter(rt.sites))
    with torch.inference_mode():
        assert rt.fast_bias(key, torch.randn(1, 9, 48), torch.randn(1, 77, 40), info={"step": 1}) is None
    (k, result), = seen
    assert k == key and result.hard.shape == (1, 9, 77) and bool(result.hard.all())
    assert ((result.probabilities > 0.5) == result.hard.bool()).all()
