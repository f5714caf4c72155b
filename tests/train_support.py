"""Helpers for the training tests: a tiny model "checkpoint" for `python -m cli.train --model-factory`, and datasets.

`tiny_components()` returns (MODEL, CLIP, VAE) like ComfyUI's checkpoint loader: the tiny random SDXL of
tests/comfy_host.py, a stand-in CLIP (deterministic text states from the caption's words) and a stand-in VAE
(8x8 average pooling to 4 channels). Real checkpoints cannot be this small: ComfyUI's loader only accepts known
architectures.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

CONTEXT_DIM = 64
TOKENS = 16


class FakeClip:
    """tokenize / encode_from_tokens like ComfyUI's CLIP: [1, TOKENS, 64] states and a [1, 64] pooled vector."""

    def tokenize(self, text: str):
        return [w for w in text.lower().split() if w][:TOKENS]

    def encode_from_tokens(self, tokens, return_pooled=False):
        rows = []
        for i in range(TOKENS):
            word = tokens[i] if i < len(tokens) else "<pad>"
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little") & ((1 << 62) - 1)
            rows.append(torch.randn(CONTEXT_DIM, generator=torch.Generator().manual_seed(seed)))
        cond = torch.stack(rows)[None]
        pooled = cond.mean(1)
        return (cond, pooled) if return_pooled else cond


class FakeVae:
    """encode(pixels [B, H, W, 3] in 0..1) -> [B, 4, H/8, W/8]."""

    def encode(self, pixels):
        x = pixels.movedim(-1, 1) * 2 - 1
        x = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([x, x.mean(1, keepdim=True)], 1)


def tiny_components():
    import comfy_host

    comfy_host.load_host()
    model = comfy_host.tiny_sdxl(seed=0, transformer_depth=(0, 1, 1), context_dim=CONTEXT_DIM)
    return model, FakeClip(), FakeVae()


def make_dataset(folder: Path, count: int = 4, size: int = 32, layout: str = "txt") -> Path:
    """`count` random PNG images with captions ("txt": same-name .txt files; "jsonl": metadata.jsonl)."""
    import json

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["red", "cube", "blue", "sphere", "left", "right", "green", "cat", "dog", "tree"]
    records = []
    for i in range(count):
        arr = (rng.random((size, size, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(folder / f"img{i:02d}.png")
        caption = " ".join(rng.choice(words, 4))
        if layout == "txt":
            (folder / f"img{i:02d}.txt").write_text(caption)
        records.append({"file_name": f"img{i:02d}.png", "text": caption})
    if layout == "jsonl":
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder
