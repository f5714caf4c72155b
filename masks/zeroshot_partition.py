"""Zero-shot gates v2: a partition of the latent into the prompt's groups, aggregated over layers and steps.

Zero-shot gates v1 assign each latent location to the group it attends to most in the current layer at the current
step. That partition is self-reinforcing: once a location drifts toward the wrong object, gating hides the right
object's tokens there, so the next layers and steps see even less of it. v2 keeps a memory (Bounded Attention,
Attend-and-Excite and DenseDiffusion all aggregate attention over layers and steps):

- per gated layer call, each group's cross-attention density over the locations (mean 1 over the grid, so maps
  of different resolutions are comparable) is resampled to one grid, the run's first;
- the layers of one step are averaged; steps are folded into an exponential moving average (weight `memory` on
  the past), including the steps before gating starts, where nothing is gated and the layout forms unbiased;
- a layer's partition is read from that aggregate (past steps + this step's layers so far + this layer).

The same aggregate gives each group's *region* (the locations it wins where its density is above the grid's mean,
`REGION_LEVEL`): the MASK outputs, the end-token and self-attention options, and the leakage number of each word
(the share of its attention that falls inside its group's region). Pure torch, no ComfyUI import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .run_state import RunState

# A location belongs to a group's region when that group wins there and its density is at least the grid's mean
# (density 1 = attention spread evenly over the image): locations no group attends to more than evenly stay
# background (end tokens and self-attention stay open there).
REGION_LEVEL = 1.0
# Weight of past steps in the moving average of step maps: measured on the compbench (stage high), 0.5 cost binding
# less than 0.8 (-2.6 vs -6.5 points against the untouched model), so the memory is kept short.
DEFAULT_MEMORY = 0.5


def resample(maps: Tensor, h: int, w: int) -> Tensor:
    """[B, G, h0, w0] -> [B, G, h, w]: area average when shrinking, bilinear when growing (values keep their mean)."""
    if maps.shape[-2:] == (h, w):
        return maps
    if h <= maps.shape[-2] and w <= maps.shape[-1]:
        return F.adaptive_avg_pool2d(maps, (h, w))
    return F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)


def group_density(attention: Tensor, onehot: Tensor) -> Tensor:
    """attention [B, N, T] (rows sum to 1), onehot [T, G] -> [B, N, G]: each group's attention mass over the
    locations, normalised to mean 1 over them (resolution independent)."""
    mass = attention @ onehot
    n = attention.shape[1]
    return mass * (n / mass.sum(dim=1, keepdim=True).clamp_min(1e-30))


def shares(density: Tensor) -> Tensor:
    """[..., G] densities -> each group's share of them at each location."""
    return density / density.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def regions(density: Tensor, level: float = REGION_LEVEL) -> Tensor:
    """[B, N, G] densities -> [B, N] long: the region each location is in (its winning group's column), -1 for
    background (no group at least `level` there)."""
    best, winner = density.max(dim=-1)
    return torch.where(best >= level, winner, torch.full_like(winner, -1))


class PartitionState:
    """The running aggregate of group densities of one sampling run (see the module docstring).

    Keyed on the number of prompt rows and groups: a call with another layout (another batch size) starts afresh.
    A new run starts when the schedule's sigma goes up, or when a model call comes again at the sigma the run started
    at (a run stopped after its first step, then a new one: no sampler evaluates its first sigma twice). Reading sigma
    is one host read per model call (the same sigmas tensor object is handed to every layer of a call), not per layer.
    """

    def __init__(self, memory: float = DEFAULT_MEMORY):
        if not 0.0 <= memory < 1.0:
            raise ValueError(f"memory must be in [0, 1), got {memory}")
        self.memory = float(memory)
        self.reset()

    def reset(self) -> None:
        self.past: Tensor | None = None  # [R, G, H, W] moving average of finished steps
        self.step_sum: Tensor | None = None  # [R, G, H, W] sum over this step's layers
        self.step_count = 0
        self.grid: tuple[int, int] | None = None
        self.layout: tuple | None = None
        self.steps = 0  # finished steps folded into `past`
        self._sigmas = None
        self._sigma: float | None = None
        self._first_sigma: float | None = None  # the sigma the run started at
        # leakage: per token position, attention mass inside its group's region and in all (summed over rows, layers,
        # steps); kept on the device
        self.inside: Tensor | None = None
        self.total: Tensor | None = None

    def clock(self, info: dict) -> None:
        """Notes the step of this call: folds the previous step when sigma changed, resets on a new run."""
        sigmas = info.get("sigmas")
        if sigmas is None or sigmas is self._sigmas:
            return
        sigma = float(sigmas.reshape(-1)[0])
        started_again = self._sigmas is not None and sigma == self._first_sigma
        self._sigmas = sigmas
        if self._sigma is None:
            self._sigma = self._first_sigma = sigma
            return
        if sigma > self._sigma or started_again:  # the schedule started again: a new run
            self.reset()
            self._sigmas, self._sigma, self._first_sigma = sigmas, sigma, sigma
            return
        if sigma == self._sigma:  # (a second call at this sigma: Heun's)
            return
        self._sigma = sigma
        self.fold()

    @property
    def sigma(self) -> float | None:
        """The sigma of the step last clocked (None before the first)."""
        return self._sigma

    def fold(self) -> None:
        """This step's layers become one more step of the moving average."""
        if self.step_sum is None or not self.step_count:
            return
        step = self.step_sum / self.step_count
        self.past = step if self.past is None else self.memory * self.past + (1.0 - self.memory) * step
        self.step_sum, self.step_count = None, 0
        self.steps += 1

    def combined(self, extra: Tensor | None = None) -> Tensor | None:
        """[R, G, H, W]: the aggregate with this step's layers so far (and `extra`, a map of this layer on the
        state's grid, not yet added), or None when nothing was seen yet."""
        step_sum, count = self.step_sum, self.step_count
        if extra is not None:
            step_sum = extra if step_sum is None else step_sum + extra
            count += 1
        step = step_sum / count if count else None
        if self.past is None:
            return step
        if step is None:
            return self.past
        return self.memory * self.past + (1.0 - self.memory) * step

    def add(self, density: Tensor, h: int, w: int, layout: tuple) -> Tensor:
        """Adds one layer's densities [R, h*w, G] to this step; returns the aggregate at this layer's grid [R, N, G]
        (this layer included)."""
        r, n, g = density.shape
        if layout != self.layout:
            clock = self._sigmas, self._sigma, self._first_sigma
            self.reset()
            self._sigmas, self._sigma, self._first_sigma = clock
            self.layout = layout
        maps = density.transpose(1, 2).reshape(r, g, h, w).float()
        if self.grid is None:
            self.grid = (h, w)
        on_grid = resample(maps, *self.grid)
        combined = self.combined(on_grid)
        self.step_sum = on_grid if self.step_sum is None else self.step_sum + on_grid
        self.step_count += 1
        return resample(combined, h, w).reshape(r, g, n).transpose(1, 2)

    def at(self, h: int, w: int, layout: tuple) -> Tensor | None:
        """The aggregate so far at an h x w grid, [R, N, G], or None (nothing seen yet in this layout)."""
        if layout != self.layout:
            return None
        combined = self.combined()
        if combined is None:
            return None
        r, g = combined.shape[:2]
        return resample(combined, h, w).reshape(r, g, h * w).transpose(1, 2)

    def add_leakage(self, attention: Tensor, region: Tensor, column: Tensor, grouped: Tensor, groups: int) -> None:
        """attention [R, N, T]; region [R, N] (a column or -1); column/grouped [T]: mass of each grouped token
        inside its group's region and in all, summed into the run's totals."""
        # per token, its mass in each region ([R, T, G] by one matmul), then the column of its own group
        in_region = torch.nn.functional.one_hot(region.clamp_min(0), groups).to(attention.dtype)
        in_region = in_region * (region >= 0)[..., None].to(attention.dtype)  # background is nobody's
        per_region = (attention.transpose(1, 2) @ in_region).sum(0)  # [T, G]
        inside = per_region.gather(1, column[:, None]).squeeze(1) * grouped.to(attention.dtype)
        total = attention.sum(dim=(0, 1))
        if self.inside is None or self.inside.shape != inside.shape:
            self.inside, self.total = inside, total
        else:
            self.inside, self.total = self.inside + inside, self.total + total


def self_attention_bias(region: Tensor, negative_value: float, dtype: torch.dtype) -> Tensor:
    """region [R, N] (a group's column or -1 for background) -> [R, N, N] additive bias: a location of one group's
    region does not attend to locations of another group's region; background attends and is attended freely.
    The diagonal is always kept, so no softmax row is empty."""
    a, b = region[:, :, None], region[:, None, :]
    blocked = (a >= 0) & (b >= 0) & (a != b)
    return blocked.to(dtype) * negative_value


def image_masks(aggregate: Tensor, height: int, width: int, level: float = REGION_LEVEL) -> Tensor:
    """aggregate [R, G, h, w] densities -> [R, G, height, width] 0/1 region masks at image size (bilinear
    upsampling before the decision, so borders follow the map, not its cells)."""
    big = F.interpolate(aggregate.float(), size=(height, width), mode="bilinear", align_corners=False)
    best, winner = big.max(dim=1, keepdim=True)
    columns = torch.arange(aggregate.shape[1], device=aggregate.device)[None, :, None, None]
    return ((winner == columns) & (best >= level)).float()


class ZeroShotRun(RunState):
    """What zero-shot gates gather in one sampling run of one patched model (masks/run_state.py): the aggregate
    partition with its regions and leakage, and the notices already given in this run."""

    def __init__(self, source):  # (masks.zeroshot.ZeroShotGates)
        super().__init__(source)
        self.partition = PartitionState(source.memory)
        self._noticed: set[str] = set()
        self._last_sigma: float | None = None

    def first_notice(self, what: str, info: dict | None) -> bool:
        """Whether `what` was not said yet in this run (a rising sigma starts a new run)."""
        sigmas = (info or {}).get("sigmas")
        sigma = float(sigmas.reshape(-1)[0]) if sigmas is not None else None
        if sigma is not None and self._last_sigma is not None and sigma > self._last_sigma:
            self._noticed.clear()
        self._last_sigma = sigma
        if what in self._noticed:
            return False
        self._noticed.add(what)
        return True
