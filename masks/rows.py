"""Which rows of an attention call's batch carry the positive prompt (pure Python + torch, no ComfyUI import).

ComfyUI's sampler batches the conditionings of one model call in chunks, listed in the transformer options'
`cond_or_uncond` (0: cond, the positive prompt; 1: uncond, the negative one), every chunk the same number of rows.
`cond_rows` reads that layout; it is the one rule every caller follows: the hooks when gate_uncond is off, the gate
sources tied to one prompt (zero-shot, region) and the benchmark's counters.
"""

from __future__ import annotations

import torch
from torch import Tensor

COND, UNCOND = 0, 1

#: info key: [R] long, the rows that carry the positive prompt itself, set by the host adapter when another pack
#: changed the batch (an attention couple's region rows carry other prompts); `prompt_rows` returns it as given.
PROMPT_ROWS_KEY = "maskattn_prompt_rows"


class RowLayoutError(ValueError):
    """The batch does not split into the sampler's cond/uncond chunks, so its rows cannot be told apart by position."""


# ComfyUI shows an error's type as `module.QualName`; the pack's module path would read as a filesystem path.
RowLayoutError.__module__ = "MaskAttn"


def cond_rows(cond_or_uncond, batch: int) -> tuple[bool, ...]:
    """Per row of a `batch`-row attention call: True where the row carries the positive prompt.

    The rule: the rows are the `cond_or_uncond` chunks in order, batch / len(chunks) rows each (a batch of several
    images repeats every chunk's row per image). No `cond_or_uncond` (a call from outside a sampler: training, a
    probe) is one cond chunk: every row is positive. A batch that does not split into equal chunks was changed by
    something the sampler's list does not describe: its rows cannot be read by position, and RowLayoutError says so
    rather than guess (taking every row as positive would gate the negative prompt, against gate_uncond off, and
    with the positive prompt's token positions).
    """
    chunks = tuple(cond_or_uncond or (COND,))
    if batch % len(chunks):
        raise RowLayoutError(
            f"Apply MaskAttn: the attention runs {batch} rows, which do not split into the sampler's {len(chunks)} "
            f"chunks (cond/uncond): another node changed the batch where MaskAttn could not see it, so the positive "
            f"prompt's rows cannot be told from the negative prompt's. Apply MaskAttn after that node.")
    per = batch // len(chunks)
    return tuple(chunk == COND for chunk in chunks for _ in range(per))


_PROMPT_ROWS: dict[tuple, Tensor | None | list] = {}


def prompt_rows(info: dict | None, batch: int, device) -> Tensor | None | list:
    """The batch rows that carry the positive prompt, for gate sources tied to one prompt (zero-shot, region).

    Returns a [R] long tensor of row indices on `device`, None when every row is the prompt's, or [] when none is
    (an uncond-only call). info[PROMPT_ROWS_KEY] wins when the host adapter set it (another pack changed the batch;
    the rows were found by text). Otherwise `cond_rows` decides (RowLayoutError for a batch it cannot read). Index
    tensors are made once per layout and device.
    """
    info = info or {}
    given = info.get(PROMPT_ROWS_KEY)
    if given is not None:
        return given if given.numel() else []
    chunks = tuple(info.get("cond_or_uncond") or (COND,))
    key = (batch, chunks, str(device))
    if key in _PROMPT_ROWS:
        return _PROMPT_ROWS[key]
    flags = cond_rows(chunks, batch)
    index = [i for i, positive in enumerate(flags) if positive]
    if len(index) == batch:
        rows = None
    elif not index:
        rows = []
    else:
        with torch.inference_mode(False):  # a normal tensor: training may use it after sampling did
            rows = torch.tensor(index, dtype=torch.long).to(device)
    _PROMPT_ROWS[key] = rows
    return rows
