"""Training MaskAttn gates on a ComfyUI model: the host side that the Train node and `python -m cli.train` share.

The loop, the maths of a step (loss, optimiser, schedule, checkpoints) and the one table of defaults live in
../masks/train.py, the objectives in ../masks/objectives.py, mask supervision in ../masks/supervised.py; here is
what needs the host:

- examples (nodes/training_examples.py): a LATENT batch and its CONDITIONING list become cached model inputs;
- the objective: noise levels from the model's own sigma table, x_t from its own `noise_scaling`, c_out of its
  denoised estimate from its own `calculate_denoised` (eps, v, EDM or flow: whatever the model uses);
- a TrainingSession: the model patched with the gates (hooks.install), gates live on the training device, the
  UNet frozen, the gate and the masked attention of the chosen objective (masks/objectives.TrainingGate) in place
  of the runtime's, and the 2024 host's in-place residual adds made safe for autograd; everything is undone on
  exit, error or cancel;
- `start_gates` and `train`: the gates a run starts from and the one training run, which both front doors call
  (the node with a progress bar and ComfyUI's cancel; the command line with checkpoints, resume and DDP).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..masks.context import GATE_CLASSES
from ..masks.gates import MaskAttnGates
from ..masks.objectives import (
    DEFAULT_OBJECTIVE,
    OBJECTIVES,
    TrainingGate,
    clean_image_loss,
    get_objective,
    sigma_band_table,
)
from ..masks.record import latent_hw
from ..masks.run_state import RUN_STATE_KEY
from ..masks.supervised import mask_loss
from ..masks.topology import PLACEMENTS, STAGE_CHOICES, select_sites
from ..masks.train import (
    TRAIN_DEFAULTS,
    Draw,
    GateTrainer,
    StepReport,
    TrainConfig,
    denoising_loss,
    draw,
    run_training,
)
from . import hooks
from .training_examples import TrainingExamples, TrainingInputError


# --- the objective, from the model's own sampling object ----------------------------------------------------------
class ModelObjective:
    """The model's own noise levels, forward process and output scale (eps / v / EDM / flow alike)."""

    def __init__(self, model):
        self.sampling = model.model.model_sampling
        table = getattr(self.sampling, "sigmas", None)
        if table is None or table.numel() < 2:
            table = torch.tensor([float(self.sampling.percent_to_sigma(p)) for p in torch.linspace(0.001, 0.999, 1000)])
        table = table.detach().float().cpu()
        self.sigma_table = table[table > 0]

    def noisy(self, sigma: Tensor, noise: Tensor, x0: Tensor) -> Tensor:
        s = sigma.reshape(sigma.shape[:1] + (1,) * (x0.ndim - 1)).to(x0.device, x0.dtype)
        return self.sampling.noise_scaling(s, noise.to(x0.device, x0.dtype), x0)

    def output_scale(self, sigma: Tensor) -> Tensor:
        """c_out(sigma): how the model's raw output enters its denoised estimate (read from calculate_denoised)."""
        s = sigma.float().reshape(-1)
        ones, zeros = torch.ones(s.shape[0], 1), torch.zeros(s.shape[0], 1)
        return (
            self.sampling.calculate_denoised(s, ones, zeros) - self.sampling.calculate_denoised(s, zeros, zeros)
        ).reshape(-1)


# --- the session ----------------------------------------------------------------------------------------------------
def _clone_input_pre_hook(module, args):
    # The 2024 host's BasicTransformerBlock does `x += n` after norm1(x) / norm2(x) saved x for backward. Feeding
    # the norms a copy keeps the saved tensor intact. Only installed while training.
    if args and isinstance(args[0], Tensor) and torch.is_grad_enabled():
        return (args[0].clone(),) + tuple(args[1:])
    return None


def _transformer_blocks(diffusion_model: nn.Module):
    for m in diffusion_model.modules():
        if hasattr(m, "attn2") and hasattr(m, "norm1") and hasattr(m, "norm2") and hasattr(m, "ff"):
            yield m


def _checkpointed(block, original, x, *args, **kwargs):
    if not torch.is_grad_enabled():
        return original(x, *args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    # The block may add into its input in place (2024 host); checkpointing keeps that input for the recomputation,
    # so the block gets a copy. The UNet rewrites transformer_options["block"/"block_index"] as it goes: the
    # recomputation (during backward) must see this block's values, so the dict is copied now.
    kwargs = {k: (dict(v) if k == "transformer_options" and isinstance(v, dict) else v) for k, v in kwargs.items()}
    return checkpoint(lambda y, *a, **k: original(y.clone(), *a, **k), x, *args, use_reentrant=False, **kwargs)


def trainable_copy(gates: MaskAttnGates) -> MaskAttnGates:
    """A MaskAttnGates with its own fp32 CPU copy of the heads (the input object is never trained in place)."""
    if not isinstance(gates, MaskAttnGates):
        raise TrainingInputError(f"maskattn: only learned gate heads can be trained, got {type(gates).__name__}")
    with torch.inference_mode(False):
        heads = nn.ModuleList(copy.deepcopy(h) for h in gates.heads)
        for h in heads:
            for m in h.modules():
                for name, p in list(m._parameters.items()):
                    if p is not None:
                        m._parameters[name] = nn.Parameter(
                            p.detach().clone().to("cpu", torch.float32), requires_grad=True
                        )
    # the same kind of gates (reference or context) with their own heads; the caches start empty
    return dataclasses.replace(gates, heads=heads, site_heads=dict(gates.site_heads),
                               site_stages=dict(gates.site_stages), _on_device={})


#: Fresh heads of the default objective start open: logit bias 2 keeps nearly every (location, token) pair (P ~ 0.88
#: where f.g ~ 0). Under the reference's straight-through estimator a suppressed pair's gradient is exactly 0, so a
#: pair that starts closed can only reopen through weights it shares with open pairs; starting open lets every pair
#: report whether it should close (tests/test_train_host.py: the planted gate is recovered this way). Each objective
#: names its own start (masks/objectives.py); "paper" is the reference's 0.
INITIAL_LOGIT_BIAS = OBJECTIVES[DEFAULT_OBJECTIVE].init_bias



def fresh_gates(
    sites, hidden_dim: int = TRAIN_DEFAULTS["hidden"], seed: int = 0, initial_bias: float = INITIAL_LOGIT_BIAS,
    head: str = TRAIN_DEFAULTS["head"], **fields
) -> MaskAttnGates:
    """Fresh heads of gate kind `head`; a context set starts equal to the reference set of the same seed."""
    gates = GATE_CLASSES[head].fresh(sites, hidden_dim=hidden_dim, share_by_stage=True, seed=seed, **fields)
    with torch.no_grad():
        for head in gates.heads:
            head.logit_bias.fill_(float(initial_bias))
    return gates


def new_gates(
    model,
    stage: str = TRAIN_DEFAULTS["stage"],
    placement: str = TRAIN_DEFAULTS["placement"],
    hidden_dim: int = TRAIN_DEFAULTS["hidden"],
    seed: int = 0,
    initial_bias: float = INITIAL_LOGIT_BIAS,
    head: str = TRAIN_DEFAULTS["head"],
) -> MaskAttnGates:
    if stage not in STAGE_CHOICES or placement not in PLACEMENTS:
        raise TrainingInputError(f"stage must be one of {STAGE_CHOICES} and placement one of {PLACEMENTS}")
    sites = select_sites(hooks.model_sites(model), stage, placement)
    if not sites:
        raise TrainingInputError(f"no cross-attention layers at stage '{stage}', placement '{placement}' in this model")
    if head not in GATE_CLASSES:
        raise TrainingInputError(f"head must be one of {tuple(GATE_CLASSES)}, got {head!r}")
    return fresh_gates(sites, hidden_dim, seed, initial_bias, head, stage=stage, placement=placement)


class TrainingSession:
    """Context manager: `model` patched with trainable `gates` on `device`; undone on exit.

    denoise(x_t, sigma, context, extras) -> the model's denoised estimate, differentiable w.r.t. the gate heads
    as the objective says (masks/objectives.py).
    """

    def __init__(
        self,
        model,
        gates: MaskAttnGates,
        device=None,
        *,
        gradient_checkpointing: bool = False,
        load: bool = True,
        objective: str = DEFAULT_OBJECTIVE,
    ):
        self.model, self.gates = model, gates
        self.device = torch.device(device) if device is not None else None
        self.gradient_checkpointing = gradient_checkpointing
        self.load = load
        self.objective_spec = get_objective(objective)
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self):
        import comfy.model_management as mm

        stack = contextlib.ExitStack()
        try:
            stack.enter_context(torch.inference_mode(False))
            all_sites = hooks.model_sites(self.model)
            self.gates.check_fits(all_sites)
            sites = [s for s in all_sites if self.gates.covers(s.key)]
            patched, runtime = hooks.install(
                self.model, self.gates, sites, threshold=self.gates.threshold, negative_value=self.gates.negative_value
            )
            runtime.skip_unmasked = False  # a device sync per layer, and it would drop the gradient
            # The objective's gate and attention (differentiable on every device). The runtime's sampling path
            # (text-side cache) is bypassed while the heads require grad: GateRuntime.bias then calls `compute`.
            self.gate = TrainingGate(
                self.objective_spec,
                heads_for=lambda key: self.gates.heads[self.gates.site_heads[key]],
                grid_of=latent_hw,
                threshold=self.gates.threshold,
                negative_value=self.gates.negative_value,
                observers=runtime.observers,
            )
            runtime.compute = self.gate.compute
            if self.gates.needs_attention:  # context heads make their logits at the attention call
                runtime.compute_from_attention = self._context_gate
            runtime.attention_override = self.gate.attention
            self.patched, self.runtime = patched, runtime
            if self.load:
                mm.load_models_gpu([patched])
            unet = patched.model.diffusion_model
            if self.device is None:
                self.device = next(unet.parameters()).device
            # Frozen UNet: no weight gradients. Weights created under inference mode cannot be saved for backward.
            flags = []
            for m in unet.modules():
                for name, p in list(m._parameters.items()):
                    if p is None:
                        continue
                    if p.is_inference():
                        m._parameters[name] = p = nn.Parameter(p.detach().clone(), requires_grad=False)
                    flags.append((p, p.requires_grad))
                    p.requires_grad_(False)
                for name, b in list(m._buffers.items()):
                    if b is not None and b.is_inference():
                        m._buffers[name] = b.detach().clone()
            stack.callback(lambda: [p.requires_grad_(f) for p, f in flags])
            # Gates: the live fp32 parameters on the training device (heads_on returns them when devices match).
            first = next(self.gates.heads.parameters())
            home = first.device
            self.gates.heads.to(device=self.device, dtype=torch.float32)
            self.gates._on_device.clear()
            stack.callback(lambda: (self.gates.heads.to(home), self.gates._on_device.clear()))
            handles = []
            for block in _transformer_blocks(unet):
                for norm in (block.norm1, block.norm2):
                    handles.append(norm.register_forward_pre_hook(_clone_input_pre_hook))
                if self.gradient_checkpointing:
                    block.forward = functools.partial(_checkpointed, block, block.forward)
                    stack.callback(lambda b=block: b.__dict__.pop("forward", None))
            stack.callback(lambda: [h.remove() for h in handles])
            unet_training = unet.training
            unet.eval()
            stack.callback(lambda: unet.train(unet_training))
            stack.callback(mm.soft_empty_cache)
            self.objective = ModelObjective(patched)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        return False

    def _context_gate(self, key, q, k, heads, cond_rows=None, info=None):
        """GateRuntime.compute_from_attention while context heads train: the objective's gate (self.gate) from the
        heads' logits, which read the layer's features, the text and the step's run state."""
        logits = self.gates.attention_logits(key, q, k, heads, info or {}, detach=self.gate.detach_features)
        return self.gate.from_logits(key, logits, cond_rows, info)

    def denoise(self, xt: Tensor, sigma: Tensor, context: Tensor, extras: dict[str, Tensor]) -> Tensor:
        to = dict(self.patched.model_options.get("transformer_options", {}))
        to["cond_or_uncond"] = [0]
        to["sigmas"] = sigma
        # Each training step is one model call at its own noise level: a fresh run state, so no aggregate of another
        # step (or of sampling) reaches it.
        run = self.gates.training_run()
        if run is not None:
            to[RUN_STATE_KEY] = run
        base = self.patched.model
        c_concat = extras.get("c_concat")
        kwargs = {k: v for k, v in extras.items() if k != "c_concat"}
        return base.apply_model(xt, sigma, c_concat=c_concat, c_crossattn=context, transformer_options=to, **kwargs)

    def loss_fn(self, examples: TrainingExamples, batch_size: int, teacher=None, trainer: GateTrainer | None = None):
        """The closure GateTrainer.train_step runs: draw a batch from `gen`, return the objective's loss.

        teacher: optional callable (x_t, sigma, context, extras) -> denoised target, used instead of the clean
        latent (distillation; the planted-answer test uses it). trainer: where the step count comes from (the
        concrete estimator's annealing and the mask-supervised leading steps need it; without it, step 0 of 1).
        """
        model_objective, device, gate = self.objective, self.device, self.gate
        spec = gate.objective
        table = sigma_band_table(model_objective.sigma_table, spec.sigma_band)
        # the clean-image loss is divided by the mean c_out^2 of its noise levels: the eps loss's magnitude
        x0_scale = float(model_objective.output_scale(table).pow(2).mean()) if spec.loss_space == "x0" else 1.0
        mask_steps = trainer.config.mask_steps if trainer is not None else 0
        # Only a missing list is an error here: under DDP a rank whose shard has no masks still runs the mask loss
        # (zero weight, the same graph) while the others wait for its gradients. The front doors check that some
        # image has masks.
        if mask_steps and examples.objects is None:
            raise TrainingInputError("mask-supervised steps were asked for, but no object masks were given")
        shape = tuple(examples.latents.shape[1:])

        def run(gen: torch.Generator) -> Tensor:
            step = trainer.step if trainer is not None else 0
            total = trainer.config.steps if trainer is not None else 1
            supervised = step < mask_steps
            d: Draw = draw(gen, len(examples), batch_size, model_objective.sigma_table if supervised else table, shape)
            noise_seed = int(torch.randint(1 << 62, (1,), generator=gen)) if spec.estimator == "concrete" else 0
            gate.detach_features = supervised
            gate.begin_step(step, total, noise_seed)
            x0, context, extras = examples.batch(d.index)
            x0, context = x0.to(device), context.to(device)
            extras = {k: v.to(device) for k, v in extras.items()}
            sigma = d.sigma.to(device)
            xt = model_objective.noisy(sigma, d.noise, x0)
            if supervised:
                self.denoise(xt, sigma, context, extras)  # the gates see their inputs; only their logits train
                return mask_loss(gate.records, [examples.objects[int(i)] for i in d.index], trainer.config.mask_outside)
            denoised = self.denoise(xt, sigma, context, extras)
            if teacher is None:
                target = x0
            else:
                with torch.no_grad():
                    target = teacher(xt, sigma, context, extras)
            if spec.loss_space == "x0":
                loss = clean_image_loss(denoised, target, x0_scale)
            else:
                loss = denoising_loss(denoised, target, model_objective.output_scale(d.sigma).to(device))
            prior = gate.sparsity_term()
            return loss if prior is None else loss + prior

        return run


def finished_gates(gates: MaskAttnGates, steps: int) -> MaskAttnGates:
    """The trained gates as a read-only MASKATTN on the CPU."""
    with torch.no_grad():
        gates.heads.to("cpu", torch.float32)
        gates.heads.requires_grad_(False)
    gates._on_device.clear()
    gates.kind = "trained"
    return gates


class ResumeError(ValueError):
    """A training checkpoint that this run cannot continue from; the message says why."""


@dataclass
class TrainingRun:
    """What one call of `train` did."""

    history: list[float]  # loss per optimisation step, of the whole run (a resumed run's earlier steps included)
    complete: bool  # False: it stopped early (stop_after); continue from a checkpoint
    step: int  # optimisation steps done
    skipped: int  # steps skipped for non-finite loss or gradients


def start_gates(
    model,
    init: MaskAttnGates | None = None,
    *,
    stage: str = TRAIN_DEFAULTS["stage"],
    placement: str = TRAIN_DEFAULTS["placement"],
    hidden: int = TRAIN_DEFAULTS["hidden"],
    seed: int = TRAIN_DEFAULTS["seed"],
    objective: str = TRAIN_DEFAULTS["objective"],
    init_bias: float | None = None,
    head: str = TRAIN_DEFAULTS["head"],
) -> MaskAttnGates:
    """The gates a run trains: a trainable copy of `init` (the input is never trained in place), or fresh heads of
    kind `head` at `stage`/`placement` whose logit bias is `init_bias`, by default the objective's own start."""
    if init is not None:
        if isinstance(init, MaskAttnGates) and init.gate_kind != head:
            raise TrainingInputError(f"{init.source or 'the connected gates'} holds {init.gate_kind} gates; train "
                                     f"with head = {init.gate_kind}")
        return trainable_copy(init)
    bias = get_objective(objective).init_bias if init_bias is None else float(init_bias)
    return new_gates(model, stage, placement, hidden, seed, bias, head)


def train(
    model,
    examples: TrainingExamples,
    gates: MaskAttnGates,
    config: TrainConfig,
    *,
    device=None,
    gradient_checkpointing: bool = False,
    rank: int = 0,
    world_size: int = 1,
    resume: dict | None = None,
    on_start: Callable[[GateTrainer, "TrainingSession"], None] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    should_stop: Callable[[], None] | None = None,
    save_every: int = 0,
    on_checkpoint: Callable[[GateTrainer], None] | None = None,
    stop_after: int = 0,
    on_end: Callable[[GateTrainer, bool], None] | None = None,
    teacher=None,
) -> TrainingRun:
    """The one training run of both front doors: `gates` (trained in place) on `examples` for config.steps steps.

    resume: a training checkpoint (masks/train.load_state) to continue bit for bit (ResumeError if it does not fit);
    on_start(trainer, session) once the model is patched (and resumed); on_step(report) after each step;
    should_stop() before and inside each step, raising to cancel (nothing of the step in flight is applied, and the
    model is restored); on_checkpoint(trainer) every `save_every` steps; stop_after > 0 ends after that many steps
    of this call; on_end(trainer, complete) after the loop, inside the session (final checkpoints). rank/world_size:
    data-parallel position (torch.distributed initialised by the caller). teacher: optional callable (x_t, sigma,
    context, extras) -> denoised target instead of the clean latent (distillation).
    """
    if gates.gate_kind != config.head:
        raise TrainingInputError(f"{gates.source or 'these gates'} hold {gates.gate_kind} gates; train with "
                                 f"head = {gates.gate_kind}")
    with TrainingSession(
        model, gates, device, gradient_checkpointing=gradient_checkpointing, objective=config.objective
    ) as session:
        data = examples.to(session.device)
        trainer = GateTrainer(gates.heads, config, rank=rank, world_size=world_size, device=session.device)
        if resume is not None:
            try:
                trainer.load_state_dict(resume)
            except ValueError as e:
                raise ResumeError(str(e)) from None
        loss_fn = session.loss_fn(data, config.batch_size, teacher=teacher, trainer=trainer)
        if on_start is not None:
            on_start(trainer, session)
        complete = run_training(
            trainer,
            loss_fn,
            should_stop=should_stop,
            on_step=on_step,
            save_every=save_every,
            on_checkpoint=on_checkpoint,
            stop_after=stop_after,
        )
        if on_end is not None:
            on_end(trainer, complete)
        run = TrainingRun(list(trainer.history), complete, trainer.step, trainer.skipped)
        del trainer, loss_fn, data
    return run
