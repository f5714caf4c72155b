"""Side-by-side timing shared by the benchmarks: interleaved rounds, medians, ratios, CUDA peak memory."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1):
    """Run every case `warmup` times, then `rounds` rounds of one run each, interleaved so drift hits all alike.

    Returns (seconds per case, CUDA peak bytes per case; empty without CUDA).
    """
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    peaks: dict[str, int] = {}
    for _ in range(rounds):
        for name, fn in cases.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
            if cuda:
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
    return times, peaks


def print_table(times: dict[str, list[float]], peaks: dict[str, int], base: str, unit: str = "s/run", width=32):
    """Median per case and its ratio to the `base` case; the ratio of the fastest rounds (noise on a shared machine
    only ever adds time); the paired ratio, the median over rounds of (this case / the base case in the same round),
    which cancels the slow drift of a shared VM (runs of 0.7 s and 1.1 s of the same model minutes apart on the CI
    machine) that the other two mix in; CUDA peak memory."""
    med_ref, min_ref = statistics.median(times[base]), min(times[base])
    print(f"{'case':{width}s} {unit:>8s} {'ratio':>6s} {'min-ratio':>9s} {'paired':>6s} {'peak MiB':>9s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        paired = paired_ratio(ts, times[base])
        peak = f"{peaks[name] / 2**20:9.0f}" if name in peaks else f"{'n/a':>9s}"
        print(f"{name:{width}s} {med:8.4f} {med / med_ref:6.3f} {min(ts) / min_ref:9.3f} {paired:6.3f} {peak}")


def paired_ratio(times: list[float], base_times: list[float]) -> float:
    """Median over rounds of (this case / the base case in the same round)."""
    return statistics.median(t / b for t, b in zip(times, base_times))


def busy_time(spans) -> float:
    """Length of the union of (start, end) spans: the time a device worked, overlapping or nested work counted once."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
