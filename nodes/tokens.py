"""A CLIP object -> its tokenization of a prompt and the vocabulary to read it (masks/tokens.py reads it as text).

The one place the nodes (zero-shot, region, preview, training) and cli/train.py ask ComfyUI's CLIP for tokens.
"""

from __future__ import annotations

from ..masks.tokens import first_encoder

_stock_tokenizer = None


def stock_tokenizer():
    """The host's stock CLIP-L tokenizer, built once: every SD text encoder uses the same CLIP BPE vocabulary."""
    global _stock_tokenizer
    if _stock_tokenizer is None:
        import comfy.sd1_clip

        _stock_tokenizer = comfy.sd1_clip.SDTokenizer()
    return _stock_tokenizer


def clip_vocab(clip, encoder: str) -> dict[int, str]:
    """Token id -> BPE string of the CLIP's tokenizer for `encoder` ("l", "g", ...); the stock CLIP-L vocabulary
    when the CLIP object hides its own."""
    sub = getattr(getattr(clip, "tokenizer", None), f"clip_{encoder}", None)
    inv = getattr(sub, "inv_vocab", None)
    if isinstance(inv, dict) and inv:
        return inv
    return stock_tokenizer().inv_vocab


def tokenize(clip, text: str) -> dict:
    """{encoder: [chunk, ...]} of `text` as this CLIP tokenizes it, with word ids where the CLIP gives them."""
    try:
        tokens = clip.tokenize(text, return_word_ids=True)
    except TypeError:  # a CLIP wrapper without the keyword
        tokens = clip.tokenize(text)
    if not isinstance(tokens, dict):
        tokens = {"l": tokens}
    return tokens


def clip_tokens(clip, text: str) -> tuple[dict, dict[int, str]]:
    """(tokenization, vocabulary of its first encoder) of `text`; with no CLIP, the stock CLIP-L tokenizer's."""
    if clip is None or not hasattr(clip, "tokenize"):
        tokenizer = stock_tokenizer()
        return {"l": tokenizer.tokenize_with_weights(text, return_word_ids=True)}, tokenizer.inv_vocab
    tokens = tokenize(clip, text)
    return tokens, clip_vocab(clip, first_encoder(tokens) if tokens else "l")
