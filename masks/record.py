"""GateRecorder: keeps what the gates did during one sampling run, for the viewer (pure torch, no ComfyUI import).

It is a GateRuntime observer: `recorder(key, GateResult, info)` is called for every gated cross-attention call
with ComfyUI's `extra_options` as `info`. Per call it keeps, on the CPU and for the cond half of the batch (the
uncond half on request), the hard gate M and the gate probabilities P of the chosen sites, as

    [b, T, h, w] uint8  (0..255 = 0..1)          b = latents of that half, T = tokens, h x w = latent cells

downsampled by area averaging so that max(h, w) <= max_side (a downsampled hard gate is the fraction of
latent locations in a cell that keep the token).

Bounded memory: a run never holds more than `cap_bytes` of tensors (default 64 MiB). When the next entry would
pass the cap, finished step bins are merged, two adjacent ones at a time (the pair covering the fewest steps,
oldest first, averaged with weights by how many steps each covers), so recent steps keep their resolution and
older ones become coarser; when a single step alone is larger than the cap, further sites of that step are not
kept and `RunRecord.dropped` counts them. Nothing ever grows past the cap.

Runs: a recorder is shared by a model and its clones (copying a model never copies recorded tensors); each
sampling run gets its own RunRecord. A new run starts when the host's per-run schedule object changes
(`sample_sigmas`, newer hosts), when sigma goes up (a new schedule starts from the top), when a site is seen a
second time at the same step, after `finish()` (called when a viewer has read the run), or when `tick` (called at
every model call, gated or not) sees the schedule start again: the gated steps alone cannot tell a run interrupted
before its end from the next one when gating starts later in the schedule. The recorder keeps
the run being recorded and the last finished one only.

A "step" is one model evaluation at one sigma: for Euler-type samplers that is one sampling step; samplers that
evaluate the model twice per step (Heun, DPM 2) show two.
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .gate import GateResult
from .topology import SiteKey

DEFAULT_CAP_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SIDE = 32
COND, UNCOND = 0, 1
_RUN_IDS = itertools.count(1)  # run ids are unique in the process, across recorders


def latent_hw(tokens: int, info: dict) -> tuple[int, int]:
    """(h, w) of the latent grid a cross-attention call ran on, from ComfyUI's extra_options.

    Newer hosts pass `activations_shape` [B, C, H, W]; older ones only the latent's `original_shape`, from which
    the level's size follows by halving with ceil until h * w equals the number of query tokens.
    """
    shape = info.get("activations_shape")
    if shape is not None and len(shape) == 4 and int(shape[-1]) * int(shape[-2]) == tokens:
        return int(shape[-2]), int(shape[-1])
    shape = info.get("original_shape")
    if shape is not None and len(shape) >= 4:
        h, w = int(shape[-2]), int(shape[-1])
        for _ in range(16):
            if h * w == tokens:
                return h, w
            if h * w < tokens:
                break
            h, w = math.ceil(h / 2), math.ceil(w / 2)
    side = math.isqrt(tokens)  # last resort: a square, or one row
    return (side, side) if side * side == tokens else (1, tokens)


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return (x.float().clamp(0, 1) * 255.0).round().to(torch.uint8)


@dataclass
class Entry:
    """What one site did in one step bin, for one half (cond or uncond) of the batch."""

    hard: torch.Tensor  # [b, T, h, w] uint8, fraction of kept locations per cell (0..255)
    probabilities: torch.Tensor | None  # [b, T, h, w] uint8, mean gate probability per cell
    count: int = 1  # model evaluations averaged into it

    @property
    def nbytes(self) -> int:
        return self.hard.nbytes + (self.probabilities.nbytes if self.probabilities is not None else 0)

    def merged(self, other: "Entry") -> "Entry":
        n = self.count + other.count

        def mean(a, b):
            if a is None or b is None or a.shape != b.shape:
                return a if a is not None else b
            return ((a.float() * self.count + b.float() * other.count) / n).round().to(torch.uint8)

        if self.hard.shape != other.hard.shape:  # the same site with another latent size: keep the newer
            return other
        return Entry(mean(self.hard, other.hard), mean(self.probabilities, other.probabilities), n)


@dataclass
class StepBin:
    """One or more consecutive steps (model evaluations) of a run."""

    first: int  # step index of the first step it covers
    last: int
    sigma_max: float
    sigma_min: float
    entries: dict = field(default_factory=dict)  # (SiteKey, half) -> Entry

    @property
    def steps(self) -> int:
        return self.last - self.first + 1

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @property
    def label(self) -> str:
        return f"step {self.first}" if self.first == self.last else f"steps {self.first}-{self.last}"

    def merged(self, later: "StepBin") -> "StepBin":
        entries = dict(self.entries)
        for k, e in later.entries.items():
            entries[k] = entries[k].merged(e) if k in entries else e
        return StepBin(self.first, later.last, max(self.sigma_max, later.sigma_max),
                       min(self.sigma_min, later.sigma_min), entries)


@dataclass(eq=False)
class RunRecord:
    """The gates of one sampling run. Tensors are on the CPU."""

    run_id: int
    cap_bytes: int
    bins: list = field(default_factory=list)  # StepBin, oldest first
    sites: list = field(default_factory=list)  # SiteKeys in the order first seen (execution order)
    hw: dict = field(default_factory=dict)  # SiteKey -> (h, w) of the stored maps
    latent_hw: dict = field(default_factory=dict)  # SiteKey -> (h, w) the layer ran at
    latent_size: tuple | None = None  # (H, W) of the sampled latent, when the host says
    tokens: int = 0  # T of the recorded context (max over calls)
    batch: int = 0  # latents in the recorded half
    steps_seen: int = 0  # model evaluations seen
    dropped: int = 0  # entries not kept because one step alone exceeded the cap
    merges: int = 0  # step-bin merges done to stay under the cap
    nbytes: int = 0
    peak_nbytes: int = 0
    sample_sigmas: object = None  # the host's schedule object of this run (identity only)
    last_sigma: float | None = None
    finished: bool = False
    source: str = ""  # what made the gates, e.g. "learned gates (file.safetensors)" or "training-free gates"

    def entries_of(self, key: SiteKey, half: int = COND) -> list[tuple[StepBin, Entry]]:
        return [(b, b.entries[(key, half)]) for b in self.bins if (key, half) in b.entries]

    @property
    def empty(self) -> bool:
        return not any(b.entries for b in self.bins)

    def summary(self) -> str:
        mb = self.nbytes / 2**20
        text = (f"{self.source + ', ' if self.source else ''}run {self.run_id}: {len(self.sites)} layers, "
                f"{_count(self.steps_seen, 'step')} in {_count(len(self.bins), 'bin')}, "
                f"{self.tokens} tokens, {mb:.1f} MiB of {self.cap_bytes / 2**20:.0f} MiB")
        if self.dropped:
            text += f"; {self.dropped} layer-steps not kept (cap reached: raise cap_mb or record fewer layers)"
        return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


class GateRecorder:
    """GateRuntime observer that records gates per run under a memory cap (see the module doc)."""

    def __init__(self, sites: set | frozenset | None = None, steps: set | None = None, *, uncond: bool = False,
                 probabilities: bool = True, max_side: int = DEFAULT_MAX_SIDE, cap_bytes: int = DEFAULT_CAP_BYTES):
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        if cap_bytes < 1024:
            raise ValueError(f"cap_bytes must be at least 1 KiB, got {cap_bytes}")
        self.sites = frozenset(sites) if sites is not None else None  # None: every gated site
        self.source = ""  # label of the gate source, copied into each run (set by the node that makes the recorder)
        self.steps = frozenset(steps) if steps is not None else None  # None: every step
        self.uncond = bool(uncond)
        self.probabilities = bool(probabilities)
        self.max_side = int(max_side)
        self.cap_bytes = int(cap_bytes)
        self.current: RunRecord | None = None
        self.last: RunRecord | None = None
        self._runs = 0
        self._lock = threading.Lock()
        self._sigmas_obj = None
        self._sigma = None
        self._tick_sigmas = None  # (tick) the last model call's sigmas object, its sigma, the first sigma of the run
        self._tick_sigma: float | None = None
        self._first_sigma: float | None = None

    # A model clone shares its recorder (ComfyUI deep-copies model_options on every clone): no tensor is copied.
    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        return self

    # --- runs ------------------------------------------------------------------------------------------------------
    def latest(self) -> RunRecord | None:
        """The run being recorded, else the last finished one (None before any run)."""
        return self.current if self.current is not None else self.last

    def finish(self) -> RunRecord | None:
        """Close the current run (a viewer read it); the next gated call starts a new one."""
        with self._lock:
            if self.current is not None:
                self.current.finished = True
                self.last, self.current = self.current, None
            return self.last

    def tick(self, info: dict) -> None:
        """Every model call of the recorded model: when its sigma is above the last call's, or is the sigma the run
        started at (no sampler evaluates its first sigma twice), a new schedule started, so the current run ends."""
        sigmas = info.get("sigmas")
        if sigmas is None or sigmas is self._tick_sigmas:  # (one sigmas object per model call, shared by its layers)
            return
        sigma = float(sigmas.reshape(-1)[0])
        started_again = self._tick_sigma is not None and (sigma > self._tick_sigma or sigma == self._first_sigma)
        self._tick_sigmas, self._tick_sigma = sigmas, sigma
        if self._first_sigma is None or started_again:
            self._first_sigma = sigma
        if started_again:
            self.finish()

    def clear(self):
        with self._lock:
            self.current = self.last = None

    def _new_run(self, sample_sigmas) -> RunRecord:
        if self.current is not None:
            self.current.finished = True
            self.last = self.current
        self._runs += 1
        self.current = RunRecord(run_id=next(_RUN_IDS), cap_bytes=self.cap_bytes, sample_sigmas=sample_sigmas,
                                 source=self.source)
        return self.current

    def _sigma_of(self, info: dict) -> float | None:
        sigmas = info.get("sigmas")
        if sigmas is None:
            return None
        if sigmas is not self._sigmas_obj:  # one tensor per model call, shared by its layers: one read per call
            self._sigmas_obj, self._sigma = sigmas, float(sigmas.reshape(-1)[0])
        return self._sigma

    # --- the observer ------------------------------------------------------------------------------------------------
    def __call__(self, key: SiteKey, result: GateResult, info: dict):
        if self.sites is not None and key not in self.sites:
            return
        hard, probs = result.hard, result.probabilities
        if hard.ndim != 3:
            return
        batch, n_query, tokens = hard.shape
        halves = [COND, UNCOND] if self.uncond else [COND]
        chunks = list(info.get("cond_or_uncond") or [COND])
        if batch % len(chunks):
            chunks = [COND]  # not ComfyUI's chunk layout: treat the whole batch as cond
        per = batch // len(chunks)
        rows = {}
        for half in halves:
            idx = [i for i, c in enumerate(chunks) if c == half][:1]  # the first chunk of that half (area conds: more)
            if idx:
                rows[half] = slice(idx[0] * per, (idx[0] + 1) * per)
        if not rows:
            return
        sigma = self._sigma_of(info)
        with self._lock:
            run = self._run_for(key, rows, sigma, info.get("sample_sigmas"))
            current = run.bins[-1] if run.bins and run.bins[-1].last == run.steps_seen - 1 else None
            if current is None:
                return  # this step is not among the recorded ones
            h, w = latent_hw(n_query, info)
            for half, sl in rows.items():
                if (key, half) in current.entries:
                    continue
                entry = self._entry(hard[sl], probs[sl] if self.probabilities else None, h, w)
                if not self._make_room(run, entry.nbytes):
                    run.dropped += 1
                    continue
                current.entries[(key, half)] = entry
                run.nbytes += entry.nbytes
                run.peak_nbytes = max(run.peak_nbytes, run.nbytes)
                if key not in run.hw:
                    run.sites.append(key)
                run.hw[key] = tuple(entry.hard.shape[-2:])
                run.latent_hw[key] = (h, w)
                run.tokens = max(run.tokens, tokens)
                shape = info.get("original_shape")
                if run.latent_size is None and shape is not None and len(shape) >= 4:
                    run.latent_size = (int(shape[-2]), int(shape[-1]))
                run.batch = max(run.batch, entry.hard.shape[0])

    def _run_for(self, key, rows, sigma, sample_sigmas) -> RunRecord:
        """The run this call belongs to (starting a new one when a new sampling run began), with its step advanced."""
        run = self.current
        seen_here = (run is not None and run.bins and run.bins[-1].last == run.steps_seen - 1
                     and any((key, h) in run.bins[-1].entries for h in rows))
        if run is None:
            run = self._new_run(sample_sigmas)
        elif sample_sigmas is not None and sample_sigmas is not run.sample_sigmas:
            run = self._new_run(sample_sigmas)
        elif sigma is not None and run.last_sigma is not None and sigma > run.last_sigma:
            run = self._new_run(sample_sigmas)  # a schedule starting again from the top
        elif sigma is not None and sigma == run.last_sigma and seen_here:
            run = self._new_run(sample_sigmas)  # the same site at the same sigma again: a new run of the same schedule
        new_step = run.steps_seen == 0 or sigma != run.last_sigma or (sigma is None and seen_here)
        if new_step:
            step = run.steps_seen
            run.steps_seen += 1
            run.last_sigma = sigma
            if self.steps is None or step in self.steps:
                s = sigma if sigma is not None else float("nan")
                run.bins.append(StepBin(step, step, s, s))
        return run

    def _entry(self, hard: torch.Tensor, probs: torch.Tensor | None, h: int, w: int) -> Entry:
        def grid(x):  # [b, N, T] -> [b, T, h', w'] uint8 on the CPU
            x = x.detach().float().transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
            if max(h, w) > self.max_side:
                scale = self.max_side / max(h, w)
                x = F.adaptive_avg_pool2d(x, (max(1, round(h * scale)), max(1, round(w * scale))))
            return _quantize(x).cpu()

        return Entry(grid(hard), grid(probs) if probs is not None else None)

    def _make_room(self, run: RunRecord, nbytes: int) -> bool:
        """Merge finished step bins until `nbytes` more fit under the cap; False if they cannot."""
        while run.nbytes + nbytes > run.cap_bytes:
            finished = len(run.bins) - 1  # the last bin is the step being recorded: never merged
            if finished < 2:
                return False
            counts = [run.bins[i].steps + run.bins[i + 1].steps for i in range(finished - 1)]
            i = counts.index(min(counts))
            merged = run.bins[i].merged(run.bins[i + 1])
            run.bins[i:i + 2] = [merged]
            run.nbytes = sum(b.nbytes for b in run.bins)
            run.merges += 1
        return True


# --- reading a run -------------------------------------------------------------------------------------------------
def site_map(run: RunRecord, key: SiteKey, step: str | int = "mean", *, half: int = COND, kind: str = "hard",
             batch_index: int = 0) -> torch.Tensor | None:
    """[T, h, w] float in 0..1 for one site: one step bin (index, negative from the end, or "last") or the mean
    over all bins weighted by the steps each covers. None if the site was not recorded."""
    found = run.entries_of(key, half)
    if not found:
        return None
    if step == "last":
        step = -1
    if step != "mean":
        index = int(step)
        bins = run.bins
        if not -len(bins) <= index < len(bins):
            raise IndexError(f"step {index} is out of range: the run has {len(bins)} step bins")
        target = bins[index]
        found = [(b, e) for b, e in found if b is target]
        if not found:
            return None
    total, weight = None, 0
    for _, e in found:
        t = e.hard if kind == "hard" or e.probabilities is None else e.probabilities
        b = min(max(batch_index, 0), t.shape[0] - 1)
        x = t[b].float() / 255.0
        if total is not None and x.shape != total.shape:
            continue
        total = x * e.count if total is None else total + x * e.count
        weight += e.count
    return total / weight if total is not None else None
