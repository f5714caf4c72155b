"""Helpers for the training tests: a tiny model "checkpoint" for `python -m cli.train --model-factory`, and datasets.

`tiny_components()` returns (MODEL, CLIP, VAE) like ComfyUI's checkpoint loader: the tiny random SDXL of
tests/comfy_host.py, a stand-in CLIP (deterministic text states from the caption's words) and a stand-in VAE
(8x8 average pooling to 4 channels). Real checkpoints cannot be this small: ComfyUI's loader only accepts known
architectures.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import torch

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

CONTEXT_DIM = 64
TOKENS = 16


class FakeTokenizer:
    """Token id -> BPE string, as ComfyUI's `clip.tokenizer.clip_l.inv_vocab` (what phrase -> token maps read)."""

    def __init__(self):
        self.inv_vocab = {START: "<|startoftext|>", END: "<|endoftext|>"}


START, END = 49406, 49407


class FakeClip:
    """tokenize / encode_from_tokens like ComfyUI's CLIP: {"l": [[(token, weight, word_id), ...]]} with a start token,
    the caption's words, an end token and end-token padding to TOKENS; [1, TOKENS, 64] states and a [1, 64] pooled
    vector, each word's state a fixed function of the word."""

    def __init__(self):
        self.tokenizer = type("Tokenizers", (), {})()
        self.tokenizer.clip_l = FakeTokenizer()

    def tokenize(self, text: str, return_word_ids: bool = False):
        words = re.findall(r"[^\W\d_]+|\d|(?:[^\w\s]|_)+", text.lower())[: TOKENS - 2]
        chunk = [(START, 1.0, 0)]
        for i, w in enumerate(words, 1):
            token = 1000 + int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "little") % 40000
            self.tokenizer.clip_l.inv_vocab[token] = w + "</w>"
            chunk.append((token, 1.0, i))
        chunk += [(END, 1.0, 0)] * (TOKENS - len(chunk))
        if not return_word_ids:
            chunk = [item[:2] for item in chunk]
        return {"l": [chunk]}

    def encode_from_tokens(self, tokens, return_pooled=False):
        rows = []
        for item in tokens["l"][0]:
            word = self.tokenizer.clip_l.inv_vocab.get(item[0], "<pad>")
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


def make_dataset(folder: Path, count: int = 4, size: int = 32, layout: str = "txt", objects: bool = False) -> Path:
    """`count` random PNG images with captions ("txt": same-name .txt files; "jsonl": metadata.jsonl).

    objects: each image gets two objects, "red cube" (a mask file, left half) and "blue sphere" (a box, right half),
    named in its caption.
    """
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
        record = {"file_name": f"img{i:02d}.png", "text": caption}
        if objects:
            caption = f"a red cube left of a blue sphere {caption}"
            record["text"] = caption
            mask = np.zeros((size, size), dtype="uint8")
            mask[:, : size // 2] = 255
            Image.fromarray(mask).save(folder / f"img{i:02d}_cube.png")
            record["objects"] = [
                {"phrase": "red cube", "mask": f"img{i:02d}_cube.png"},
                {"phrase": "blue sphere", "box": [0.5, 0.0, 1.0, 1.0]},
            ]
        if layout == "txt":
            (folder / f"img{i:02d}.txt").write_text(caption)
            if objects:
                (folder / f"img{i:02d}.objects.json").write_text(json.dumps(record["objects"]))
        records.append(record)
    if layout == "jsonl":
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder
