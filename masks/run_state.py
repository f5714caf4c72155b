"""Who owns what a gate source gathers while it samples.

A gate source is immutable once built: a model and its clones share it, and ComfyUI caches it across queues. What a
source gathers during a sampling run (zero-shot gates' running aggregate, the notices already shown) belongs to the
run, and so to the patched model that samples it:

- Apply MaskAttn asks the source for a fresh state (`GateSource.new_run()`) and puts it in the patched model's
  transformer options under `RUN_STATE_KEY`; ComfyUI hands those options to every attention call, so the source finds
  it in `info`. The state is shared by the patched model's clones (as the runtime is), never by another Apply's model.
- A caller that drives the source without a patched model (a script, a test) gets one state kept by the source's
  `SourceRuns`.
- `SourceRuns.latest` is the state the source last worked in, for consumers that hold only the source: the Zero-Shot
  Masks node reads the last run's regions there.

Pure Python, no ComfyUI import.
"""

from __future__ import annotations

from typing import Callable

#: transformer_options entry: the run state of the source that Apply MaskAttn installed on this model.
RUN_STATE_KEY = "maskattn_run_state"


class RunState:
    """Base of a source's per-run state: it knows its source, so a state found in `info` is used only by the source
    it was made for. Shared by a patched model and its clones (ComfyUI deep-copies model options on every clone)."""

    def __init__(self, source):
        self.source = source

    def __deepcopy__(self, memo):
        return self


class SourceRuns:
    """A source's way to its run state (see the module docstring). The source holds one for life; the object is the
    channel between runs and readers, the source's own fields never change."""

    def __init__(self, make: Callable[[], RunState]):
        self._make = make
        self._direct: RunState | None = None
        self.latest: RunState | None = None

    def __deepcopy__(self, memo):
        return self

    def of(self, info: dict | None, owner) -> RunState:
        """The state of the run `info` belongs to: the patched model's, else the one kept for direct callers."""
        state = info.get(RUN_STATE_KEY) if info else None
        if state is None or state.source is not owner:
            state = self._direct
            if state is None:
                state = self._direct = self._make()
        self.latest = state
        return state
