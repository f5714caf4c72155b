"""A benchmark-only gate executor: the gate's matmuls in a low precision (the model's float16 or bfloat16) and the
threshold taken on the logit. Not exact: a pair within that dtype's rounding of the threshold may flip
(`sampling_overhead.py --flip-rate` counts them on real features; docs/SPEED.md has the measurements). The pack
ships only executors that give the spec's bits, so this one lives here.

Import it after the pack is importable as `comfyui_maskattn` (tests/conftest.py, or cli/host.py `load_host`).
"""

from __future__ import annotations

import copy
import math

import torch
from comfyui_maskattn.masks.runtime import EagerExecutor, keep_ungated_rows_and_count


class LowPrecisionExecutor(EagerExecutor):
    """EagerExecutor (synced) with the head in `dtype`: sigmoid(x) > t computed as x > logit(t), one kernel fewer;
    the empty-row rule's argmax is the same on logits. Observers still get float32 probabilities."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.name = f"{str(dtype).replace('torch.', '')} gate"
        self._heads: dict[int, tuple] = {}  # id(float32 head) -> (that head, its copy in dtype)

    def bias(self, rt, key, index, head, features, context, cond_rows, info):
        cached = self._heads.get(id(head))
        if cached is None or cached[0] is not head:
            cached = self._heads[id(head)] = (head, copy.deepcopy(head).to(dtype=self.dtype).requires_grad_(False))
        return super().bias(rt, key, index, cached[1], features, context, cond_rows, info)

    def hard_gate(self, rt, head, features, g, cond_rows, as_float=False):
        logits = head.fast_logits(features.to(g.dtype), g)
        hard = logits > logit_threshold(rt.threshold)
        return hard, logits, None, keep_ungated_rows_and_count(hard, cond_rows)


def logit_threshold(t: float) -> float:
    return -math.inf if t <= 0.0 else math.inf if t >= 1.0 else math.log(t / (1.0 - t))
