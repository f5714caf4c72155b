"""The method's maths in pure torch, against an independent float64 implementation of docs/METHOD.md."""

import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_maskattn.masks.attention import explicit_attention, masked_attention
from comfyui_maskattn.masks.gate import NEGATIVE_VALUE, GateHead, gate_bias, hard_gate, strength_to_negative_value


def reference_gate_probabilities(head: GateHead, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """docs/METHOD.md written out by hand in float64 from the head's parameters."""
    p = {k: v.detach().double() for k, v in head.state_dict().items()}

    def mlp(t, net, dim):
        t = F.layer_norm(t.double(), (dim,), p[f"{net}.0.weight"], p[f"{net}.0.bias"], eps=1e-5)
        t = F.silu(t @ p[f"{net}.1.weight"].T + p[f"{net}.1.bias"])
        return t @ p[f"{net}.3.weight"].T + p[f"{net}.3.bias"]

    f, g = mlp(x, "feature_net", head.feature_dim), mlp(e, "token_net", head.token_dim)
    return torch.sigmoid(torch.einsum("bnh,bth->bnt", f, g) / math.sqrt(head.hidden_dim) + p["logit_bias"])


def reference_attention(q, k, v, heads, bias):
    b, n, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.double().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias.double()[:, None]
    return (logits.softmax(-1) @ vh).transpose(1, 2).reshape(b, n, inner)


def random_head(c=32, d=24, h=16, seed=0):
    torch.manual_seed(seed)
    head = GateHead(c, d, h)
    with torch.no_grad():
        for prm in head.parameters():
            prm.normal_(0, 0.5)
    return head


def test_gate_head_matches_float64_reference():
    head = random_head()
    x, e = torch.randn(2, 50, 32), torch.randn(2, 77, 24)
    got = head(x, e)
    want = reference_gate_probabilities(head, x, e)
    assert got.shape == (2, 50, 77)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    # the parameter names are the reference implementation's, so its checkpoints load unchanged
    assert set(head.state_dict()) == {f"{net}.{i}.{w}" for net in ("feature_net", "token_net") for i in (0, 1, 3)
                                      for w in ("weight", "bias")} | {"logit_bias"}


def test_gate_head_rejects_wrong_dims_with_a_clear_message():
    with pytest.raises(ValueError, match="does not match this model"):
        random_head()(torch.randn(1, 4, 31), torch.randn(1, 5, 24))


def test_hard_gate_threshold_is_strict_and_empty_rows_keep_argmax():
    p = torch.tensor([[[0.5, 0.2, 0.7], [0.1, 0.4, 0.3], [0.5, 0.5, 0.5]]])
    m = hard_gate(p, 0.5)
    assert m.tolist() == [[[0, 0, 1], [0, 1, 0], [1, 0, 0]]]  # 0.5 is not > 0.5; empty rows keep their argmax


def test_hard_gate_valid_tokens_never_kept_even_as_fallback():
    p = torch.tensor([[[0.9, 0.3, 0.2], [0.95, 0.1, 0.05]]])
    valid = torch.tensor([[False, True, True]])
    m = hard_gate(p, 0.5, valid)
    assert m.tolist() == [[[0, 1, 0], [0, 1, 0]]]


def test_gate_bias_forward_is_exact_and_gradient_is_straight_through():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 5, requires_grad=True)
    p = torch.sigmoid(logits)
    for threshold in (0.5, 0.3, 0.8):
        res = gate_bias(p, threshold)
        expected = (1 - hard_gate(p.detach(), threshold)) * NEGATIVE_VALUE
        assert torch.equal(res.bias, expected)  # exact: kept pairs get exactly 0, not rounding noise
    w = torch.randn(2, 6, 5)
    (grad,) = torch.autograd.grad((gate_bias(p).bias * w).sum(), p)
    torch.testing.assert_close(grad, -NEGATIVE_VALUE * w)  # d bias / d P = -negative_value for every pair


@pytest.mark.parametrize("heads,n,t", [(1, 16, 77), (4, 64, 154), (8, 9, 231)])
def test_masked_attention_matches_float64_reference(heads, n, t):
    torch.manual_seed(heads)
    d = 8
    q, k, v = torch.randn(3, n, heads * d), torch.randn(3, t, heads * d), torch.randn(3, t, heads * d)
    p = torch.rand(3, n, t)
    bias = gate_bias(p, 0.5).bias
    want = reference_attention(q, k, v, heads, bias)
    for fn in (explicit_attention, _sdpa_attention):
        got = masked_attention(q, k, v, heads, bias, fn)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # suppressed pairs really carry ~no weight: attention to a masked-out token equals attention without it
    keep = hard_gate(p, 0.5)
    assert (keep.sum(-1) >= 1).all()


def _sdpa_attention(q, k, v, heads, mask=None):
    b, n, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, inner)


def test_no_bias_calls_the_attention_function_unchanged():
    calls = []

    def fn(q, k, v, heads, **kw):
        calls.append(kw)
        return q

    q = torch.randn(1, 4, 8)
    assert masked_attention(q, q, q, 2, None, fn, attn_precision=None) is q
    assert calls == [{"attn_precision": None}]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_finite_when_whole_rows_are_masked(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 16, 32, dtype=dtype) * 4 for _ in range(3))
    bias = torch.full((2, 16, 8), NEGATIVE_VALUE)  # every pair suppressed: a row of equal -1e4 stays a valid softmax
    bias[:, :4, 0] = 0
    for fn in (explicit_attention, _sdpa_attention):
        out = masked_attention(q, k[:, :8], v[:, :8], 4, bias, fn)
        assert out.dtype == dtype and torch.isfinite(out).all()
    head = random_head(32, 32, 16).to(dtype)
    probs = head(q.float().to(dtype), k.to(dtype))
    assert torch.isfinite(gate_bias(probs.float()).bias.to(dtype)).all()


def test_strength_scales_suppressed_weights_by_one_minus_s():
    assert strength_to_negative_value(1.0) == NEGATIVE_VALUE
    torch.manual_seed(3)
    q, k = torch.randn(1, 3, 5), torch.randn(1, 5, 5)
    v = torch.eye(5).unsqueeze(0)  # one head of width 5 whose output is the attention weights themselves
    keep = torch.tensor([[[1, 0, 1, 0, 0]] * 3], dtype=torch.float32)
    plain = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(5), -1)
    for s in (0.25, 0.5, 0.9):
        bias = (1 - keep) * strength_to_negative_value(s)
        got = masked_attention(q, k, v, 1, bias, explicit_attention)
        unnorm = plain * (keep + (1 - keep) * (1 - s))
        torch.testing.assert_close(got, unnorm / unnorm.sum(-1, keepdim=True))
    with pytest.raises(ValueError):
        strength_to_negative_value(0.0)


def test_fast_logits_follow_the_head_through_copies_moves_and_replaced_parameters():
    """fast_logits reads the head's parameter dicts directly (the sampling path); it must keep giving logits() bit
    for bit after a deepcopy and a dtype change, a load_state_dict(assign=True) and a .to() that replaces parameters."""
    head = random_head(seed=3)
    x, e = torch.randn(2, 9, 32), torch.randn(2, 5, 24)

    def check(h, dtype=torch.float32):
        with torch.no_grad():
            g_t = h.token_features(e.to(dtype)).transpose(1, 2)
            assert torch.equal(h.fast_logits(x.to(dtype), g_t), h.logits(x.to(dtype), e.to(dtype), g_t.transpose(1, 2)))

    check(head)
    import copy

    double = copy.deepcopy(head).to(torch.float64)
    check(double, torch.float64)
    check(head)  # the original keeps its own parameters

    other = random_head(seed=4).state_dict()
    head.load_state_dict({k: v.clone() for k, v in other.items()}, assign=True)
    check(head)
    assert torch.equal(head.fast_logits(x, head.token_features(e).transpose(1, 2)),
                       random_head(seed=4).fast_logits(x, random_head(seed=4).token_features(e).transpose(1, 2)))

    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        moved = head.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    check(moved, torch.float64)
