"""GateRuntime: the one place where a gate bias is computed at sampling time, cached (text side) and handed to
observers (recording).

`GateRuntime.compute` is the spec path (docs/METHOD.md, float32, line by line); `GateRuntime.bias` is what sampling
calls. It runs an executor chosen once at install (nodes/executor.py, from the device and $MASKATTN_CUDA_GATE):
`EagerExecutor` (the default; optionally deciding "nothing suppressed" on the device) or `GraphExecutor` (CUDA
graphs, same option). Every executor gives the spec path's bits; tests/test_fast_path.py holds each to it.

It knows nothing of ComfyUI: the host adapter (nodes/gate_patch.py) hands it the site key, the latent features
entering the query projection, the text states entering the key projection, and which batch rows to gate.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

from .attention import DeferredBias
from .gate import GateResult, gate_bias
from .graphs import GraphCache
from .source import GateSource
from .topology import SiteKey

GateObserver = Callable[[SiteKey, GateResult, dict], None]
#: transformer_options entry: observers of one patched model's gates (a tuple of GateObserver), besides the runtime's
#: own: the recorder is added to the clone it records, never to the runtime its input model shares.
OBSERVERS_KEY = "maskattn_observers"


@dataclass(eq=False)
class GateRuntime:
    """The gates of one Apply MaskAttn, the spec computation (`compute`) and the sampling-time entry point (`bias`).

    `bias` runs the installed executor, which must give the spec's bits, or the spec path itself while the heads
    train (gradients).
    """

    gates: GateSource
    sites: frozenset  # the SiteKeys this runtime gates (a subset of those the gates cover)
    threshold: float = 0.5
    negative_value: float = -1.0e4
    cond_only: bool = False
    # A bias of all zeros is handed on as None so a layer whose gate keeps everything runs the untouched attention,
    # bit for bit, on every backend. Training turns it off: the check is a device sync and would drop the gradient.
    skip_unmasked: bool = True
    observers: list[GateObserver] = field(default_factory=list)
    # None: the host's attention backend. Training sets explicit_attention (differentiable on every device).
    attention_override: Callable | None = None
    # How the sampling-time gate runs (chosen at install: nodes/executor.py); see EXECUTORS.
    executor: Executor = field(default_factory=lambda: EagerExecutor())

    def __post_init__(self):
        # head index -> (context, token_net(context) transposed for the logits' matmul)
        self._token_cache: dict[int, tuple[Tensor, Tensor]] = {}
        self._heads_by_device: dict[torch.device, tuple] = {}
        self.stats = {"graph": 0, "eager": 0}  # sampling-time gate calls by path (cheap counters, for benchmarks)

    def __deepcopy__(self, memo):  # shared by a model and its clones; it holds no per-run tensors
        return self

    def _head(self, key: SiteKey, device: torch.device):
        index = self.gates.site_heads[key]
        heads = self._heads_by_device.get(device)
        if heads is None or heads[index].logit_bias.device != device:  # (training moves heads in place)
            # a tuple of the same modules: indexing a ModuleList costs a few µs, paid per gated layer
            heads = self._heads_by_device[device] = tuple(self.gates.heads_on(device))
        return index, heads[index]

    def compute(self, key: SiteKey, features: Tensor, context: Tensor, cond_rows: Tensor | None = None,
                info: dict | None = None) -> GateResult:
        """The spec path: the gate for one site line by line, in float32 (differentiable: training uses it).

        features [B, N, C], context [B, T, D]; cond_rows [B] bool restricts gating to those rows.
        """
        _, head = self._head(key, features.device)
        probabilities = torch.sigmoid(head.logits(features.float(), context.float()))
        result = gate_bias(probabilities, self.threshold, self.negative_value)
        return self._finish(key, result, cond_rows, info)

    def bias(self, key: SiteKey, features: Tensor, context: Tensor, cond_rows: Tensor | None = None,
             info: dict | None = None) -> Tensor | DeferredBias | None:
        """The sampling-time gate: the additive bias [B, N, T] in the features' dtype, the spec's bits; None when it
        suppresses nothing (skip_unmasked), or a DeferredBias from a device-skip executor."""
        index, head = self._head(key, features.device)
        if torch.is_grad_enabled() and head.logit_bias.requires_grad:  # training: gradients need the spec path
            return self.usable(self.compute(key, features, context, cond_rows, info))
        return self.executor.bias(self, key, index, head, features, context, cond_rows, info)

    def token_features(self, index: int, head, context: Tensor) -> Tensor:
        """token_net(context) transposed to [B, h, T], computed once per conditioning tensor: every layer a head
        serves in one model call gets the same context object, so a stage-shared head runs its text MLP once per step
        instead of per layer."""
        cached = self._token_cache.get(index)
        if cached is not None and cached[0] is context:
            return cached[1]
        g_t = head.token_features(context.to(head.logit_bias.dtype)).transpose(1, 2)
        self._token_cache[index] = (context, g_t)
        return g_t

    def compute_from_attention(self, key: SiteKey, q: Tensor, k: Tensor, heads: int, cond_rows: Tensor | None = None,
                               info: dict | None = None) -> GateResult:
        """Gate for one site from the layer's own projected queries/keys (gate sources with needs_attention)."""
        probabilities = self.gates.attention_probabilities(key, q, k, heads, info or {})
        # (the comparison P > threshold runs in float32, where a threshold within 2^-25 of 1 is 1)
        below_one = struct.unpack("f", struct.pack("f", self.threshold))[0] < 1.0
        if below_one and self.gates.keeps_a_token_per_row and not probabilities.requires_grad:
            # some token is kept at every location (P = 1 > threshold), so gate_bias's empty-row rule is a no-op:
            # the same bits without its six operations per layer
            hard = (probabilities > self.threshold).to(probabilities.dtype)
            result = GateResult(probabilities=probabilities, hard=hard, bias=(1.0 - hard) * self.negative_value)
        else:
            result = gate_bias(probabilities, self.threshold, self.negative_value)
        return self._finish(key, result, cond_rows, info)

    def watchers(self, info: dict | None) -> list[GateObserver]:
        """The observers of this call: the runtime's own, then those of the model being sampled (OBSERVERS_KEY)."""
        extra = info.get(OBSERVERS_KEY) if info else None
        return [*self.observers, *extra] if extra else self.observers

    def _finish(self, key, result: GateResult, cond_rows, info) -> GateResult:
        if cond_rows is not None:
            result.bias = result.bias * cond_rows.to(device=result.bias.device, dtype=result.bias.dtype)[:, None, None]
        for observe in self.watchers(info):
            observe(key, result, info or {})
        return result

    def usable(self, result: GateResult) -> Tensor | None:
        """The additive bias [B, N, T], or None when it would suppress nothing (see skip_unmasked)."""
        if self.skip_unmasked and not bool((result.bias != 0).any()):
            return None
        return result.bias


# --- executors: how the sampling-time gate runs; each gives the spec path's bits (tests/test_fast_path.py) ---------
class Executor(Protocol):
    name: str  # the $MASKATTN_CUDA_GATE value that selects it
    device_skip: bool  # "nothing suppressed" decided on the device: a DeferredBias instead of None, no host sync

    def bias(self, rt: GateRuntime, key: SiteKey, index: int, head, features: Tensor, context: Tensor,
             cond_rows: Tensor | None, info: dict | None) -> Tensor | DeferredBias | None:
        """GateRuntime.bias for the site `key`, served by head number `index` (`head`, float32, on the features'
        device). While observers watch (preview, recording), it hands each the GateResult on the host."""


class EagerExecutor:
    """The gate's kernels launched one by one, fewer than the spec path's: the text side cached per conditioning,
    one host sync per layer for both "nothing suppressed" and "some row empty", the empty-row rule only when needed,
    the bias made directly in the model's dtype.

    device_skip: no host sync (for CUDA, and torch.compile: no graph break). The bias comes as a DeferredBias and the
    layer runs both the masked and the unmasked attention, keeping the unmasked output where nothing is suppressed
    (masks/attention.py): the same bits for one more small attention call (77 keys) and a select per layer; the
    empty-row rule then always runs (a no-op where no row is empty). Observers take the synced path: they read the
    gate on the host anyway.
    """

    def __init__(self, device_skip: bool = False):
        self.device_skip = device_skip
        self.name = "device_skip" if device_skip else "eager"

    def bias(self, rt, key, index, head, features, context, cond_rows, info):
        rt.stats["eager"] += 1
        return self.run(rt, key, head, features, rt.token_features(index, head, context), cond_rows, info)

    def run(self, rt: GateRuntime, key: SiteKey, head, features: Tensor, g: Tensor, cond_rows: Tensor | None,
            info: dict | None) -> Tensor | DeferredBias | None:
        """The gate from the cached text side g ([B, h, T])."""
        observers = rt.watchers(info)
        deferred = rt.skip_unmasked and self.device_skip and not observers
        synced = rt.skip_unmasked and not deferred
        # The CPU's synced path may keep M as float 0/1 (see hard_gate); the bias is then made in float32
        as_float = synced and features.dtype == torch.float32 and features.device.type == "cpu"
        hard, scores, probabilities, kept = self.hard_gate(rt, head, features, g, cond_rows, as_float)
        tokens = hard.shape[-1]
        if synced:
            fewest = int(kept.amin())  # the one host sync: decides "nothing suppressed" and "some row empty"
            # (after the empty-row rule every row keeps >= 1 token: with a single token nothing is ever suppressed)
            all_kept, any_empty = fewest == tokens or tokens == 1, fewest == 0
            if all_kept and not observers:
                return None
        else:
            all_kept, any_empty = False, True
        if any_empty:
            # Knowing some row is empty (synced), the CPU searches only the empty rows: a full argmax over rows of 77
            # tokens cost it up to 100 us a call. Finding them syncs again (and gives torch.compile a data-dependent
            # shape), so other devices and the sync-free paths keep the one argmax.
            _keep_argmax_of_empty_rows(hard, kept, scores, only_empty=synced and hard.device.type == "cpu")
        if hard.dtype != torch.bool:
            bias = bias_from_keep(hard, rt.negative_value)
        else:
            bias = bias_from_gate(hard, features.dtype, rt.negative_value, padded=features.is_cuda)
        if observers:
            if probabilities is None:
                probabilities = torch.sigmoid(scores.float())
            result = GateResult(probabilities=probabilities, hard=hard.to(probabilities.dtype), bias=bias)
            for observe in observers:
                observe(key, result, info or {})
        if deferred:
            return DeferredBias(bias, hard.all())  # (after the empty-row rule: "the bias is all zeros")
        return None if all_kept else bias

    def hard_gate(self, rt: GateRuntime, head, features: Tensor, g: Tensor, cond_rows: Tensor | None,
                  as_float: bool = False):
        """(M before the empty-row rule, the scores the rule's argmax reads, the probabilities or None, the tokens
        kept per location): the spec's float32 sigmoid(logit) > threshold.

        as_float (CPU): M as 1.0/0.0 in the probabilities' dtype, the same comparison. The CPU compares into a bool
        tensor with scalar code but into the input's own dtype with vector code, and a float mask is counted without
        a cast: 3x less time for the comparison, count and bias together at [2, 256, 77].
        """
        logits = head.fast_logits(features.to(g.dtype), g)
        scores = probabilities = torch.sigmoid(logits)
        if as_float:
            threshold = _constant(rt.threshold, probabilities.dtype, probabilities.device)
            hard = torch.gt(probabilities, threshold, out=torch.empty_like(probabilities))
        else:
            hard = probabilities > rt.threshold
        return hard, scores, probabilities, keep_ungated_rows_and_count(hard, cond_rows)


class GraphExecutor:
    """The exact gate replayed as one CUDA graph per head and shape (masks/graphs.py): one launch per layer instead of
    ~15 small kernels. Elsewhere the same program replays eagerly on the graph's buffers (what the CPU tests run).

    The eager executor stands in while observers watch, inside torch.compile's tracing or another graph's capture
    (those record the eager ops themselves), and for good once a capture has failed. device_skip: as
    EagerExecutor's.
    """

    def __init__(self, device_skip: bool = False):
        self.device_skip = device_skip
        self.name = "graphs+device_skip" if device_skip else "graphs"
        self.eager = EagerExecutor(device_skip)
        self.graphs = GraphCache()

    def bias(self, rt, key, index, head, features, context, cond_rows, info):
        if rt.watchers(info) or self.graphs.failed is not None or (features.is_cuda and (
                torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing())):
            return self.eager.bias(rt, key, index, head, features, context, cond_rows, info)
        g = rt.token_features(index, head, context)  # [B, h, T]
        graph = self._graph(rt, index, head, features, g, cond_rows)
        if graph is None:
            rt.stats["eager"] += 1
            return self.eager.run(rt, key, head, features, g, cond_rows, info)
        rt.stats["graph"] += 1
        out = graph.replay(fresh={"x": features}, shared={"g": g})
        if rt.skip_unmasked and self.device_skip:
            return DeferredBias(out["bias"], out["unmasked"])
        if rt.skip_unmasked and bool(out["unmasked"]):  # the one host sync, as the eager executor's
            return None
        return out["bias"]

    def _graph(self, rt: GateRuntime, index: int, head, features: Tensor, g: Tensor, cond_rows: Tensor | None):
        """The captured gate program for this head and these shapes (built on first use)."""
        # A captured graph reads the head's parameters at the addresses they had at capture: keyed on them, a head
        # whose parameters were replaced (moved away and back, load_state_dict(assign=True)) gets a new capture
        # instead of a replay from freed memory. In-place updates keep the addresses and are read as they are.
        key = (index, id(head), tuple(p.data_ptr() for p in head.fast_parameters()), tuple(features.shape),
               features.dtype, tuple(g.shape), g.dtype, None if cond_rows is None else id(cond_rows),
               rt.threshold, rt.negative_value)
        device, dtype = features.device, features.dtype  # (not `features`: the program must not keep it alive)
        negative_value, hard_gate = rt.negative_value, self.eager.hard_gate

        def build():
            # normal tensors, not inference ones: a graph made while ComfyUI samples (inference mode) is also
            # replayed under plain no_grad, where copying into an inference tensor raises
            with torch.inference_mode(False):
                text = torch.empty_strided(g.shape, g.stride(), dtype=g.dtype, device=device)  # g's layout
                b, n, t = features.shape[0], features.shape[1], g.shape[2]
                # The feature input and the outputs are shared by every graph of this shape (heads of one level; a
                # gate file with a head per layer has dozens): a layer's attention reads its bias, on the same
                # stream, before the next layer's gate is replayed. The text side stays per graph (per head).
                x, bias, unmasked = self.graphs.buffers((tuple(features.shape), dtype, device, t), lambda: (
                    torch.empty(features.shape, dtype=dtype, device=device),
                    torch.empty(b, n, _padded(t), dtype=dtype, device=device)[..., :t],
                    torch.empty((), dtype=torch.bool, device=device)))
            # the where-values exist before capture: made during it, their fill would only run at replays
            _where_values(dtype, negative_value, device)

            def program():  # (head and cond_rows are held here, so the ids in the key stay theirs)
                hard, scores, _, kept = hard_gate(rt, head, x, text, cond_rows)
                _keep_argmax_of_empty_rows(hard, kept, scores)  # a no-op where no row is empty
                unmasked.copy_(hard.all())  # after the rule, as the spec path decides it
                bias_from_gate(hard, dtype, negative_value, out=bias)

            return program, {"x": x, "g": text}, {"bias": bias, "unmasked": unmasked}

        return self.graphs.get(key, device, build)


#: The executors a CUDA model may run, by the $MASKATTN_CUDA_GATE value that selects them (nodes/executor.py); the CPU
#: always runs the synced eager one, where a host sync costs nothing.
EXECUTORS: dict[str, Callable[[], Executor]] = {
    "eager": EagerExecutor,
    "graphs": GraphExecutor,
    "device_skip": lambda: EagerExecutor(device_skip=True),
    "graphs+device_skip": lambda: GraphExecutor(device_skip=True),
}


def keep_ungated_rows_and_count(hard: Tensor, cond_rows: Tensor | None) -> Tensor:
    """In place, every token kept in the rows left ungated (cond_rows false); returns the tokens kept per location
    [B, N, 1]."""
    if cond_rows is not None:
        ungated = ~cond_rows.to(hard.device)[:, None, None]
        if hard.dtype == torch.bool:
            hard |= ungated
        else:
            hard.masked_fill_(ungated, 1.0)
    # A float mask counts in its own dtype (exact: integers far below 2**24). A bool one in int32 on the CPU: summing
    # bools to the default int64 makes it copy the whole mask first (up to 2x the time); other devices keep the
    # default, which every backend has.
    count_dtype = torch.int32 if hard.dtype == torch.bool and hard.device.type == "cpu" else None
    return hard.sum(dim=-1, keepdim=True, dtype=count_dtype)


def rows_by_text(before_features: Tensor, before_context: Tensor, negative_before: Tensor, features: Tensor,
                 context: Tensor) -> tuple[Tensor, Tensor]:
    """After another pack changed the batch, which rows are the negative prompt's and which the positive prompt's.

    before_*: the batch as the sampler made it ([B, N, C], [B, T, D]) with negative_before [B] bool (its uncond rows);
    features/context: the batch attention runs ([B', N, C], [B', T', D]). A row belongs to a prompt when its text is
    that prompt's text for some row of the sampler's batch, up to repetition along the tokens (ComfyUI and the
    attention couples repeat a prompt to a common token count). A row whose text is both (the same prompt on both
    sides) is decided by its features; one that matches neither (a region's own prompt) is neither. Returns
    (negative [B'] bool, positive [B'] bool) on the device, without a host sync.
    """
    text = _same_rows(context, before_context, tiled=True)  # [B', B]
    feats = _same_rows(features, before_features)
    neg = negative_before.to(text.device)[None, :]
    text_neg, text_pos = (text & neg).any(1), (text & ~neg).any(1)
    feat_neg, feat_pos = (feats & neg).any(1), (feats & ~neg).any(1)
    negative = text_neg & (~text_pos | (feat_neg & ~feat_pos))
    positive = text_pos & (~text_neg | (feat_pos & ~feat_neg))
    return negative, positive


def _same_rows(after: Tensor, before: Tensor, tiled: bool = False) -> Tensor:
    """[B', B] bool: row i of `after` equals row j of `before` exactly (tiled: either is the other repeated along
    dim 1). One original row at a time, so the comparison never holds more than one [B', ...] mask."""
    b_after, b_before = after.shape[0], before.shape[0]
    out = torch.zeros(b_after, b_before, dtype=torch.bool, device=after.device)
    if after.shape[2:] != before.shape[2:] or after.dtype != before.dtype:
        return out
    t_after, t_before = after.shape[1], before.shape[1]
    if t_after != t_before and not (tiled and (t_after % t_before == 0 or t_before % t_after == 0)):
        return out
    rest = after.shape[2:]
    for j in range(b_before):
        row = before[j].to(after.device)
        if t_after >= t_before:
            same = after.reshape(b_after, t_after // t_before, t_before, *rest) == row
        else:
            same = after[:, None] == row.reshape(t_before // t_after, t_after, *rest)
        out[:, j] = same.flatten(1).all(1)
    return out


def _padded(tokens: int) -> int:
    return -(-tokens // 8) * 8


def _keep_argmax_of_empty_rows(hard: Tensor, kept: Tensor, scores: Tensor, only_empty: bool = False) -> None:
    """The empty-row rule, in place: a location that keeps no token keeps its argmax token.

    hard[argmax] |= (row is empty): only the argmax reads the full [B, N, T] tensor, the rest is [B, N, 1] (a one-hot
    of the argmax would be three more full-size kernels; the graph and sync-free paths run this on every call).
    only_empty: take the argmax of the empty rows alone (finding them is a host sync; the same first-maximum index
    per row, so the same bits)."""
    if only_empty:
        tokens = hard.shape[-1]
        rows = (kept.reshape(-1) == 0).nonzero().squeeze(1)
        hard.view(-1, tokens)[rows, scores.reshape(-1, tokens)[rows].argmax(dim=-1)] = True
        return
    top = scores.argmax(dim=-1, keepdim=True)
    hard.scatter_(-1, top, hard.gather(-1, top) | (kept == 0))


def bias_from_keep(keep: Tensor, negative_value: float) -> Tensor:
    """(1 - M) * negative_value in `keep`'s dtype from M as float 0/1: the same bits as bias_from_gate, -0.0 on kept
    pairs included ((1 - 1) * negative_value)."""
    # 0-dim operands, not Python floats: the CPU wraps and casts a Python float per call, to the same float32 value
    return torch.rsub(keep, _constant(1.0, keep.dtype, keep.device)).mul_(_constant(negative_value, keep.dtype,
                                                                                     keep.device))


def bias_from_gate(hard: Tensor, dtype: torch.dtype, negative_value: float, padded: bool = False,
                   out: Tensor | None = None) -> Tensor:
    """(1 - M) * negative_value [B, N, T] in `dtype`, from the hard gate M (bool).

    padded (for CUDA): one kernel into rows padded to a multiple of 8 elements, returned as the [..., :T] view:
    SDPA's efficient kernel wants 8-aligned mask strides and otherwise pads a 77-token mask with a copy per call.
    out: write there instead (a graph's output buffer). On the CPU, logical_not().to().mul_() measured 4x faster
    than torch.where with scalars.
    """
    if not padded and out is None:
        return hard.logical_not().to(dtype).mul_(negative_value)
    if out is None:
        b, n, t = hard.shape
        out = torch.empty(b, n, _padded(t), dtype=dtype, device=hard.device)[..., :t]
    return torch.where(hard, *_where_values(dtype, negative_value, out.device), out=out)


_CONSTANTS: dict = {}


def _where_values(dtype: torch.dtype, negative_value: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """(-0.0, negative_value) in `dtype` on `device`: -0.0 is what the spec's (1 - M) * negative_value gives a kept
    pair, so every path makes the same bias bits.

    On the device, not the CPU: torch.where moves 0-dim CPU operands to the output's device with a blocking copy, a
    host sync per call on CUDA, and an operation a CUDA graph capture refuses.
    """
    return _constant(-0.0, dtype, device), _constant(negative_value, dtype, device)


def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`value` as a 0-dim tensor in `dtype` on `device`, made once (a Python float operand of a float32 operation is
    rounded to float32 all the same)."""
    key = (value, math.copysign(1.0, value), dtype, device)  # (-0.0 and 0.0 are one dict key otherwise)
    constant = _CONSTANTS.get(key)
    if constant is None:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            constant = _CONSTANTS[key] = torch.full((), value, dtype=dtype, device=device)
    return constant
