"""ComfyUI's CLIP tokenization read as text: pieces, words and token kinds, from token ids and a vocabulary.

The one place that walks ComfyUI's token layout: `tokens` is what `clip.tokenize(text, return_word_ids=True)`
returns, {encoder: [[(token, weight, word_id), ...] per 77-token chunk]} (word ids may be missing), and a
vocabulary maps a token id to its BPE string (CLIP's byte alphabet; a piece that ends a word ends with "</w>").
Position p counts across chunks like ComfyUI's concatenated context: chunk c occupies 77c .. 77c+76.
Getting `tokens` and the vocabulary from a CLIP object is the host's side (nodes/tokens.py). Pure Python + torch.
"""

from __future__ import annotations

import re

from torch import Tensor

EMBEDDING_PIECE = "\0embedding"  # the text of a piece that is an embedding's vectors, not BPE tokens
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
EMBEDDING_WORD = "<embedding>"  # how an embedding is named among the prompt's words


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of CLIP's byte-level BPE (GPT-2 style)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = _bytes_to_unicode()
# CLIP's pre-tokenizer: contractions, letter runs, single digits, runs of other symbols.
_PRETOKEN_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\w\s]|_)+", re.IGNORECASE)


def pretokens(text: str) -> list[str]:
    """The pieces CLIP's tokenizer cuts `text` into before BPE, in its byte alphabet (what BPE tokens decode to)."""
    text = " ".join(text.replace("’", "'").lower().split())
    return ["".join(_BYTE_CHARS[b] for b in p.encode("utf-8")) for p in _PRETOKEN_RE.findall(text)]


def first_encoder(tokens: dict) -> str:
    """The encoder whose tokenization stands for all: "l" where there is one (SDXL's encoders share the layout)."""
    return "l" if "l" in tokens else next(iter(tokens))


def host_pieces(chunks, vocab: dict[int, str]) -> list[tuple[str, list[int]]]:
    """(piece text, token positions) of one encoder's tokenization, skipping start/end/padding tokens.

    `chunks`: ComfyUI's per-encoder list of 77-token chunks of (token, weight[, word_id]); an int token is decoded
    with `vocab` (BPE tokens end a piece with "</w>"); an embedding vector is one piece per word id.
    """
    pieces: list[tuple[str, list[int]]] = []
    text, positions = "", []
    embed_word, position = None, 0

    def flush():
        nonlocal text, positions
        if positions:
            pieces.append((text, positions))
        text, positions = "", []

    for chunk in chunks:
        ended = False
        for item in chunk:
            token = item[0]
            word_id = item[2] if len(item) > 2 else None
            here, position = position, position + 1
            if isinstance(token, int) or (isinstance(token, Tensor) and token.ndim == 0):
                token = int(token)
                s = vocab.get(token, "")
                if word_id == 0 or ended or s in SPECIAL_TOKENS:
                    ended = ended or s == SPECIAL_TOKENS[1]
                    continue  # start / end / padding: never part of a word
                if embed_word is not None:
                    flush()
                    embed_word = None
                if s.endswith("</w>"):
                    text += s[:-4]
                    positions.append(here)
                    flush()
                else:
                    text += s
                    positions.append(here)
            else:  # an embedding vector
                if embed_word is None or embed_word != word_id:
                    flush()
                text, embed_word = EMBEDDING_PIECE, word_id
                positions.append(here)
    flush()
    return pieces


def prompt_words(tokens: dict, vocab: dict[int, str]) -> list[tuple[str, list[int]]]:
    """(word, token positions) for every word of a tokenized prompt, in order, read from its first encoder;
    start, end and padding tokens and punctuation are skipped, an embedding is the word "<embedding>"."""
    if not isinstance(tokens, dict) or not tokens:
        return []
    words = [(EMBEDDING_WORD if text == EMBEDDING_PIECE else text.strip() or "?", positions)
             for text, positions in host_pieces(tokens[first_encoder(tokens)], vocab)]
    return [(w, pos) for w, pos in words if any(ch.isalnum() for ch in w) or w == EMBEDDING_WORD]  # no punctuation


def token_kinds(tokens: dict, vocab: dict[int, str]) -> list[str]:
    """Per token position: "start", "end" (the end token and the padding after it) or "text", read from the first
    encoder's chunks (SDXL's encoders share the layout). A chunk's first token is its start token; from the first
    end token on, everything is end/padding (SDXL's CLIP-G pads with token 0, CLIP-L with the end token)."""
    chunks = tokens["l"] if "l" in tokens else next(iter(tokens.values()))
    kinds: list[str] = []
    for chunk in chunks:
        ended = False
        for i, item in enumerate(chunk):
            token = item[0]
            text = vocab.get(int(token), "") if isinstance(token, int) or (
                isinstance(token, Tensor) and token.ndim == 0) else ""
            word_id = item[2] if len(item) > 2 else None
            if i == 0 and text == SPECIAL_TOKENS[0]:
                kinds.append("start")
                continue
            ended = ended or text == SPECIAL_TOKENS[1] or (word_id == 0 and text != "")
            kinds.append("end" if ended else "text")
    return kinds
