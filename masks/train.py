"""Training MaskAttn gates: the pure-torch part (no ComfyUI import).

Only the gate heads train; the diffusion model is frozen. The objective is the model's own denoising loss. A
ComfyUI model predicts eps, v, an EDM output or a flow velocity; whatever it predicts, its denoised estimate is
affine in that raw output,

    D(x_t, sigma) = c_skip(sigma) * x_t + c_out(sigma) * F(x_t, sigma),

so the loss on the raw output, ||F - F_target||^2, equals ||D - x0||^2 / c_out(sigma)^2. The host layer reads
c_out from the model's own sampling object (nodes/gate_training.py) and hands it here; nothing here assumes eps.
`prediction_target` spells out the four parameterisations for tests and readers.

Randomness is counter-based: every random draw of optimisation step k on rank r comes from a generator seeded
with (seed, r, k) alone. A resumed run therefore draws exactly what the uninterrupted run would have drawn, with no
generator state to carry between processes; the checkpoint still stores the global torch RNG state for anything
outside this module that draws from it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch
from torch import Tensor, nn

from .context import GATE_KINDS
from .objectives import DEFAULT_OBJECTIVE, Objective, get_objective
from .supervised import check_outside

STATE_FORMAT = "maskattn-train-state"
STATE_VERSION = 2  # 2: mask_outside in the config (a pack without it would train a resume with "close")
PRECISIONS = ("fp32", "bf16", "fp16")

#: The one table of training defaults: the Train node's widgets and the command line's options both read it.
TRAIN_DEFAULTS = {
    "steps": 1000,
    "batch_size": 1,
    "lr": 1e-4,  # the reference's
    "weight_decay": 0.01,
    "betas": (0.9, 0.999),
    "warmup_fraction": 0.05,  # warmup steps when none are given: this share of the steps
    "min_lr_ratio": 0.0,
    "grad_clip": 1.0,
    "seed": 0,
    "precision": "fp32",
    "stage": "mid",
    "placement": "encoder_decoder",
    "hidden": 128,
    "objective": DEFAULT_OBJECTIVE,
    "head": "reference",  # the gate kind a run trains: "reference" (the paper's head) or "context" (masks/context.py)
    "warmup": -1,  # warmup steps; -1: warmup_fraction of the steps (resolve_warmup)
    "mask_steps": -1,  # leading steps trained on object masks (masks/supervised.py) before the objective; -1: every
    # step when the data has object masks, none without (resolve_mask_steps)
    "mask_outside": "keep",  # object words where no mask is: "keep" or "close" (masks/supervised.MASK_OUTSIDE)
    "save_every": 500,
}


def resolve_warmup(warmup: int, steps: int) -> int:
    """Warmup steps: -1 means the table's share of `steps`; never more than `steps`."""
    if warmup < 0:
        return max(0, round(TRAIN_DEFAULTS["warmup_fraction"] * steps))
    return min(int(warmup), int(steps))


def resolve_mask_steps(mask_steps: int, steps: int, has_masks: bool = True) -> int:
    """Leading mask-supervised steps: -1 means every step when there are masks (none without); never more than
    `steps`."""
    if mask_steps < 0:
        return int(steps) if has_masks else 0
    return min(int(mask_steps), int(steps))


@dataclass
class TrainConfig:
    steps: int = TRAIN_DEFAULTS["steps"]
    batch_size: int = TRAIN_DEFAULTS["batch_size"]
    lr: float = TRAIN_DEFAULTS["lr"]
    weight_decay: float = TRAIN_DEFAULTS["weight_decay"]
    betas: tuple[float, float] = TRAIN_DEFAULTS["betas"]
    warmup_steps: int = 0
    min_lr_ratio: float = TRAIN_DEFAULTS["min_lr_ratio"]  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = TRAIN_DEFAULTS["grad_clip"]  # max global grad norm; 0 disables
    seed: int = TRAIN_DEFAULTS["seed"]
    precision: str = TRAIN_DEFAULTS["precision"]  # autocast dtype of the frozen model's forward: fp32 | bf16 | fp16
    objective: str = TRAIN_DEFAULTS["objective"]  # a name of masks/objectives.OBJECTIVES
    mask_steps: int = 0  # leading steps on the object-mask loss, resolved (resolve_mask_steps); 0: none
    mask_outside: str = TRAIN_DEFAULTS["mask_outside"]  # the mask loss's target where no object is
    head: str = TRAIN_DEFAULTS["head"]  # the gate kind trained (GATE_KINDS)

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        get_objective(self.objective)
        if not 0 <= self.mask_steps <= self.steps:
            raise ValueError(f"mask_steps must lie in [0, steps], got {self.mask_steps} of {self.steps}")
        check_outside(self.mask_outside)
        if self.head not in GATE_KINDS:
            raise ValueError(f"head must be one of {GATE_KINDS}, got {self.head!r}")

    @property
    def objective_spec(self) -> Objective:
        return get_objective(self.objective)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        if "mask_outside" not in d and d.get("mask_steps"):
            d = {**d, "mask_outside": "close"}  # mask-supervised checkpoints older than the option trained with it
        return cls(**{k: v for k, v in d.items() if k in names})


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimisation step `step` (0-based): linear warmup, then cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator for one optimisation step of one rank (see the module docstring)."""
    digest = hashlib.blake2b(f"maskattn:{int(seed)}:{int(rank)}:{int(step)}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclass
class Draw:
    """The random part of one training step: which examples, which noise levels, which noise."""

    index: Tensor  # [B] example indices into the (rank's) dataset
    sigma: Tensor  # [B] noise levels, picked from the model's own sigma table
    noise: Tensor  # [B, *latent_shape] standard normal


def draw(gen: torch.Generator, n_examples: int, batch_size: int, sigma_table: Tensor, latent_shape) -> Draw:
    """Examples without replacement when the batch fits the data (with replacement otherwise), uniform timesteps.

    Drawn on the CPU and moved by the caller, so CPU and GPU runs (and every rank) see the same numbers.
    """
    if n_examples < 1:
        raise ValueError("no training examples")
    if batch_size <= n_examples:
        index = torch.randperm(n_examples, generator=gen)[:batch_size]
    else:
        index = torch.randint(n_examples, (batch_size,), generator=gen)
    t = torch.randint(len(sigma_table), (batch_size,), generator=gen)
    sigma = sigma_table.detach().float().cpu()[t]
    noise = torch.randn((batch_size, *latent_shape), generator=gen)
    return Draw(index=index, sigma=sigma, noise=noise)


def _per_item(t: Tensor, like: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.reshape(like.shape[:1] + (1,) * (like.ndim - 1))


def denoising_loss(denoised: Tensor, target: Tensor, output_scale: Tensor) -> Tensor:
    """The model's own denoising MSE, from its denoised estimate: mean_b mean((D - target)^2) / c_out(sigma_b)^2.

    `output_scale` is c_out per batch item ([B]), taken from the model's sampling object by the caller. Computed in
    fp32 whatever the forward's dtype.
    """
    if denoised.shape != target.shape:
        raise ValueError(f"denoised {tuple(denoised.shape)} and target {tuple(target.shape)} differ in shape")
    c_out = _per_item(output_scale, denoised)
    if bool((c_out == 0).any()):
        raise ValueError("c_out(sigma) is 0: sigma 0 carries no denoising signal; draw sigmas from the model's table")
    err = (denoised.float() - target.float()) / c_out
    return err.pow(2).flatten(1).mean(1).mean()


def prediction_target(kind: str, x0: Tensor, noise: Tensor, sigma: Tensor, sigma_data: float = 1.0) -> Tensor:
    """What a model of each parameterisation is trained to output (ComfyUI's sigma conventions), for reference.

    eps:   x_t = x0 + sigma * n,            F* = n
    v:     x_t = x0 + sigma * n,            F* = (sigma_data * n - sigma / sigma_data * x0) * c,
                                            c = sigma_data / sqrt(sigma^2 + sigma_data^2)   (v in ComfyUI's scale)
    edm:   x_t = x0 + sigma * n,            F* = (x0 - c_skip x_t) / c_out  (Karras et al.)
    flow:  x_t = (1 - sigma) x0 + sigma n,  F* = n - x0
    """
    s = _per_item(sigma, x0)
    if kind == "eps":
        return noise
    if kind in ("v", "edm"):
        xt = x0 + s * noise
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data / (s**2 + sigma_data**2) ** 0.5
        if kind == "v":  # ComfyUI's V_PREDICTION: D = c_skip x_t - c_out F
            return (c_skip * xt - x0) / c_out
        return (x0 - c_skip * xt) / c_out
    if kind == "flow":
        return noise - x0
    raise ValueError(f"unknown prediction kind {kind!r}")


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class _LossModule(nn.Module):
    """Lets DistributedDataParallel own the gate parameters: forward(fn, gen) runs the caller's loss closure.

    The closure runs the frozen model, whose hooks use these same parameters, so DDP's gradient hooks fire.
    """

    def __init__(self, heads: nn.Module):
        super().__init__()
        self.heads = heads

    def forward(self, fn, gen):
        return fn(gen)


LossFn = Callable[[torch.Generator], Tensor]


@dataclass
class StepReport:
    step: int  # optimisation steps done after this one
    loss: float  # mean over ranks
    lr: float
    grad_norm: float
    skipped: bool = False  # non-finite loss or gradients: the update was skipped


class GateTrainer:
    """AdamW on the gate heads only, linear warmup + cosine decay, global-norm clipping, optional fp16 loss scaling.

    `heads`: the nn.Module whose parameters train (MaskAttnGates.heads). `rank`/`world_size`: data-parallel
    position; with world_size > 1 (torch.distributed initialised by the caller) the heads train under
    DistributedDataParallel and the reported loss is averaged over ranks.
    """

    def __init__(
        self,
        heads: nn.Module,
        config: TrainConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ):
        self.heads, self.config = heads, config
        self.rank, self.world_size = int(rank), int(world_size)
        self.params = [p for p in heads.parameters()]
        if not self.params:
            raise ValueError("the gate set has no parameters to train")
        for p in self.params:
            if p.dtype != torch.float32:
                raise ValueError(f"gate parameters train in fp32, got {p.dtype}")
            p.requires_grad_(True)
        self.device = torch.device(device) if device is not None else self.params[0].device
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=1e-8
        )
        use_scaler = config.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler) if use_scaler else None
        self.step = 0
        self.history: list[float] = []  # loss per optimisation step (mean over ranks)
        self.skipped = 0
        self._wrapped = _LossModule(heads)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self._wrapped = DistributedDataParallel(
                self._wrapped, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    @property
    def done(self) -> bool:
        return self.step >= self.config.steps

    def current_lr(self) -> float:
        c = self.config
        return c.lr * lr_factor(self.step, c.warmup_steps, c.steps, c.min_lr_ratio)

    def generator(self) -> torch.Generator:
        return step_generator(self.config.seed, self.rank, self.step)

    def train_step(self, loss_fn: LossFn, *, should_stop: Callable[[], None] | None = None) -> StepReport:
        """One optimisation step. `loss_fn(gen)` draws its batch from `gen` and returns a scalar loss.

        `should_stop` is called between the backward pass and the update (it raises to cancel); a cancelled step
        leaves the parameters, optimizer and step counter as they were.
        """
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        dtype = autocast_dtype(self.config.precision)
        with torch.enable_grad():
            if dtype is None:
                loss = self._wrapped(loss_fn, self.generator())
            else:
                with torch.autocast(self.device.type, dtype=dtype):
                    loss = self._wrapped(loss_fn, self.generator())
            loss = loss.float()
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if should_stop is not None:
            try:
                should_stop()
            except BaseException:
                self.optimizer.zero_grad(set_to_none=True)
                raise
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = (
            torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in grads]))
            if grads
            else torch.zeros(())
        )
        finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(norm))
        if self.config.grad_clip and finite:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips non-finite steps itself and lowers the scale
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        if not finite:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.detach()
        if self.world_size > 1:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value)
            value = value / self.world_size
        value = float(value)
        self.step += 1
        self.history.append(value)
        return StepReport(step=self.step, loss=value, lr=lr, grad_norm=float(norm), skipped=not finite)

    # --- checkpoint / resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a bit-for-bit resume needs; plain tensors and Python data (loadable with weights_only=True)."""
        return {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "step": self.step,
            "config": self.config.to_dict(),
            "world_size": self.world_size,
            "heads": {k: v.detach().cpu().clone() for k, v in self.heads.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "history": list(self.history),
            "skipped": self.skipped,
            "torch_rng": torch.random.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict, *, strict_config: bool = True) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError("not a MaskAttn training checkpoint")
        if int(state.get("format_version", 0)) > STATE_VERSION:
            raise ValueError("training checkpoint written by a newer MaskAttn; update the pack")
        saved = TrainConfig.from_dict(state["config"])
        if strict_config:
            mine = self.config.to_dict()
            diff = {k: (v, mine[k]) for k, v in saved.to_dict().items() if k not in ("steps",) and mine.get(k) != v}
            if diff:
                raise ValueError(
                    "the checkpoint was made with other settings; a bit-for-bit resume needs the same: "
                    + ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
                )
        if int(state.get("world_size", 1)) != self.world_size:
            raise ValueError(
                f"the checkpoint was made with {state.get('world_size')} processes, this run has "
                f"{self.world_size}; resume with the same number for a bit-for-bit continuation"
            )
        with torch.no_grad():
            self.heads.load_state_dict(state["heads"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.history = [float(x) for x in state.get("history", [])]
        self.skipped = int(state.get("skipped", 0))
        torch.random.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng"):
            try:
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            except (RuntimeError, IndexError):
                pass  # another GPU count: our draws do not depend on it (they are counter-based on the CPU)


def run_training(
    trainer: GateTrainer,
    loss_fn: LossFn,
    *,
    should_stop: Callable[[], None] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    save_every: int = 0,
    on_checkpoint: Callable[[GateTrainer], None] | None = None,
    stop_after: int = 0,
) -> bool:
    """The training loop both front doors run (the Train node and `python -m cli.train`).

    Runs steps until the trainer is done. `should_stop()` is called before and inside each step and raises to
    cancel (the step in flight changes nothing); `on_step(report)` after each step; `on_checkpoint(trainer)` every
    `save_every` steps (not after the last); `stop_after` > 0 ends after that many steps of this call. Returns True
    when the run is complete, False when it stopped early (stop_after).
    """
    first = trainer.step
    while not trainer.done:
        if stop_after and trainer.step - first >= stop_after:
            return False
        if should_stop is not None:
            should_stop()
        report = trainer.train_step(loss_fn, should_stop=should_stop)
        if on_step is not None:
            on_step(report)
        if save_every and on_checkpoint is not None and trainer.step % save_every == 0 and not trainer.done:
            on_checkpoint(trainer)
    return True


def _to_cpu(obj):
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_state(state: dict, path) -> None:
    """Write a training checkpoint atomically (temporary name, then rename)."""
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        torch.save(state, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path) -> dict:
    """Read a training checkpoint with torch.load(weights_only=True): tensors and plain data only."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a MaskAttn training checkpoint")
    return state


@dataclass
class LossCurve:
    """Loss history plus a smoothed version (EMA), for logs and the loss-curve image."""

    values: list[float] = field(default_factory=list)

    def smoothed(self, beta: float = 0.9) -> list[float]:
        out, avg = [], None
        for v in self.values:
            avg = v if avg is None else beta * avg + (1 - beta) * v
            out.append(avg)
        return out
