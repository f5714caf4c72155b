"""CUDA-graph replay of the sampling-time gate: one launch per gated layer instead of a dozen small kernels.

Measured on an H100 with SDXL-size weights (docs/SPEED.md): the eager gate cost about 0.5 ms of wall time per layer
while its kernels took about 0.1 ms; the rest was the host side of its operator calls and syncs. A captured graph
replays the same kernels (so the same values, bit for bit) from fixed buffers: per call the runtime copies the
layer's features into the graph's input buffer and replays it; the bias comes back in the graph's output buffer.
Opt-in (masks.runtime.GraphExecutor, selected by $MASKATTN_CUDA_GATE) until a GPU run shows it pays.

A bias stays valid until the next replay of a graph that shares its buffer (the runtime shares input and output
buffers between graphs of one shape). That is enough: ComfyUI runs a layer's attention, which reads the bias, on
the same stream before the next layer's gate is replayed. The graphs' intermediates live in one memory pool per
device; no graph's output is allocated there, so the graphs may replay in any order.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger("MaskAttn")

#: Graphs kept per runtime: one per head, input shape and dtype. SDXL at one resolution and batch needs one per head
#: and level (about 6 with the reference's per-stage heads, 70 with a head per layer). A graph holds only its
#: text-side buffer (79 KB) beyond the shared ones, and a capture costs a device sync and empties the allocator's cache.
MAX_GRAPHS = 256


class GateGraph:
    """One captured gate program with its fixed input and output buffers."""

    def __init__(self, program: Callable[[], None], inputs: dict[str, Tensor], outputs: dict[str, Tensor],
                 capture: bool, pool=None):
        self.program, self.inputs, self.outputs = program, inputs, outputs
        self.graph = None
        self._last: dict[str, Tensor] = {}  # the tensor last copied into each input buffer
        if capture:
            # warm-up on a side stream first (cuBLAS handles, lazy inits), as torch.cuda.graphs asks
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                program()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                program()

    def replay(self, fresh: dict[str, Tensor], shared: dict[str, Tensor]) -> dict[str, Tensor]:
        """Copy the inputs into their buffers and run the program; returns the output buffers. `fresh` inputs are
        copied every time; `shared` ones only when a different tensor comes (the text side: one object per step)."""
        for name, value in fresh.items():
            self.inputs[name].copy_(value)
        for name, value in shared.items():
            if self._last.get(name) is not value:
                self.inputs[name].copy_(value)
                self._last[name] = value
        if self.graph is not None:
            self.graph.replay()
        else:  # eager replay of the same program on the same buffers (CPU tests, or capture unavailable)
            self.program()
        return self.outputs


class GraphCache:
    """Gate graphs by key, least recently used dropped beyond MAX_GRAPHS; gives up on graphs after a failed capture.

    Captures on CUDA; elsewhere a "graph" replays its program eagerly on the same buffers (what the CPU tests run).
    """

    def __init__(self):
        self._graphs: OrderedDict = OrderedDict()
        self._pools: dict = {}
        self._buffers: dict = {}
        self.failed: str | None = None  # why capture failed once; the runtime then stays on the eager path

    def get(self, key, device: torch.device, build: Callable[[], tuple]) -> GateGraph | None:
        """The graph for `key`, capturing it on first use; None (and eager from then on) if capture fails."""
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        capture = device.type == "cuda"
        try:
            program, inputs, outputs = build()
            pool = None
            if capture:  # one memory pool per device: the graphs never run concurrently, so they may share it
                pool = self._pools.get(device)
                if pool is None:
                    pool = self._pools[device] = torch.cuda.graph_pool_handle()
            graph = GateGraph(program, inputs, outputs, capture, pool)
        except Exception as error:  # e.g. a host that captures its own graphs, or an exotic allocator
            self.failed = f"{type(error).__name__}: {error}"
            log.warning("MaskAttn: could not capture the gate as a CUDA graph (%s); using the eager gate.", self.failed)
            return None
        self._graphs[key] = graph
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return graph

    def buffers(self, key, make: Callable[[], tuple]) -> tuple:
        """Buffers shared by the graphs that ask with the same key (made by `make` on first use, kept for good)."""
        shared = self._buffers.get(key)
        if shared is None:
            shared = self._buffers[key] = make()
        return shared

    def __len__(self):
        return len(self._graphs)
