"""Which gate executor (masks/runtime.py) a patched model runs: the exact variant CUDA devices use."""

from __future__ import annotations

import os

import torch

from ..masks.runtime import EXECUTORS, EagerExecutor

#: Every variant (an executor of masks/runtime.py) gives the spec path's bits (tests, cuda_check.py); they differ
#: only in how the GPU is driven. Which is fastest is for a GPU run to say (benchmarks/gpu_check.sh prints it);
#: until one has, CUDA keeps the measured eager gate.
CUDA_GATE_VARIANTS = EXECUTORS
CUDA_GATE_DEFAULT = "eager"
CUDA_GATE_ENV = "MASKATTN_CUDA_GATE"


def cuda_gate_variant() -> str:
    """The exact gate variant for CUDA devices: $MASKATTN_CUDA_GATE if set, else CUDA_GATE_DEFAULT."""
    name = os.environ.get(CUDA_GATE_ENV, "").strip() or CUDA_GATE_DEFAULT
    if name not in CUDA_GATE_VARIANTS:
        raise ValueError(
            f"Apply MaskAttn: the environment variable {CUDA_GATE_ENV}={name!r} names no gate variant; use one of "
            f"{', '.join(CUDA_GATE_VARIANTS)}, or unset it for the default ({CUDA_GATE_DEFAULT}), then restart ComfyUI."
        )
    return name


def executor_for(model):
    """The executor class a model patched on `model`'s load device runs: on CUDA the variant cuda_gate_variant()
    names (a bad $MASKATTN_CUDA_GATE fails here, before anything is patched); elsewhere the synced eager gate, whose
    host sync costs a CPU nothing."""
    on_cuda = torch.device(getattr(model, "load_device", None) or "cpu").type == "cuda"
    return CUDA_GATE_VARIANTS[cuda_gate_variant()] if on_cuda else EagerExecutor
