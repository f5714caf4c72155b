"""Command-line gate trainer: `python -m cli.train --checkpoint MODEL --data FOLDER --output RUN_DIR` (pack folder).

Loads the checkpoint through ComfyUI's own loader (from $COMFYUI_PATH, `--comfyui`, or the ComfyUI this pack sits
in), checks the dataset (cli/dataset.py) before loading anything, encodes every image and caption once (cached in
RUN_DIR/cache), then trains the gate heads only: AdamW with warmup + cosine decay, gradient clipping, optional
bf16/fp16 autocast and gradient checkpointing, a progress bar with loss and it/s, RUN_DIR/loss.csv, a checkpoint
every --save-every steps (RUN_DIR/checkpoints/ and RUN_DIR/latest.pt), `--resume` for a bit-for-bit continuation,
and RUN_DIR/<name>.safetensors, the gate file the Load MaskAttn Gates node reads.

Several GPUs (or CPU processes): `torchrun --nproc_per_node N -m cli.train ...` runs DistributedDataParallel over
the gate parameters, each rank on its own shard of the data; rank 0 alone writes files.

The run is the Train node's: both call nodes/gate_training.py (`start_gates`, `train`: the model session, the loop,
resume, DDP), whose defaults (`TRAIN_DEFAULTS`) and objectives live in masks/train.py and masks/objectives.py;
here are only the command line, the run's steps, its files and the progress display; the model inputs are
encoded in cli/encode.py, the processes set up in cli/distributed.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from .distributed import Dist, say

EXIT_DATASET = 2
EXIT_USAGE = 3


def build_parser() -> argparse.ArgumentParser:
    from comfyui_maskattn.masks.train import TRAIN_DEFAULTS

    p = argparse.ArgumentParser(
        prog="python -m cli.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_and_data_arguments(p.add_argument_group("model and data"))
    _gate_arguments(p.add_argument_group("gates"), TRAIN_DEFAULTS)
    _optimisation_arguments(p.add_argument_group("optimisation"), TRAIN_DEFAULTS)
    _checkpoint_arguments(p.add_argument_group("checkpoints"), TRAIN_DEFAULTS)
    return p


def _model_and_data_arguments(src):
    src.add_argument("--checkpoint", help="checkpoint file, or a name in ComfyUI's models/checkpoints")
    src.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, or the ComfyUI this pack is in)")
    src.add_argument("--data", required=True, help="dataset folder: images with same-name .txt captions")
    src.add_argument("--captions", help="captions JSONL instead of .txt files (file_name/text per line)")
    src.add_argument("--resolution", type=int, default=1024, help="square training size in pixels (multiple of 64)")
    src.add_argument("--output", required=True, help="run folder: loss.csv, checkpoints, cache and the gate file")
    src.add_argument("--name", default="maskattn_gates", help="file name of the final gate file")
    src.add_argument("--model-factory", help=argparse.SUPPRESS)  # "module:function" or "file.py:function" (tests)


def _gate_arguments(g, D: dict):
    from comfyui_maskattn.masks.context import GATE_KINDS
    from comfyui_maskattn.masks.topology import PLACEMENTS, STAGE_CHOICES

    g.add_argument("--stage", default=D["stage"], choices=list(STAGE_CHOICES))
    g.add_argument("--placement", default=D["placement"], choices=list(PLACEMENTS))
    g.add_argument("--hidden", type=int, default=D["hidden"], help="gate MLP width")
    g.add_argument("--head", default=D["head"], choices=list(GATE_KINDS),
                   help="gate head: reference (the paper's) or context (also reads the run's running attention)")
    g.add_argument("--init", help="start from this gate file (.safetensors) instead of fresh heads")
    g.add_argument(
        "--init-bias",
        type=float,
        default=None,
        help="logit bias of fresh heads (default: the objective's; 2 starts open, every pair kept; 0 is the "
        "reference's init)",
    )


def _optimisation_arguments(t, D: dict):
    from comfyui_maskattn.masks.objectives import OBJECTIVES
    from comfyui_maskattn.masks.supervised import MASK_OUTSIDE

    t.add_argument(
        "--objective",
        default=D["objective"],
        choices=list(OBJECTIVES),
        help="how the gates learn: "
        + "; ".join(f"{o.name}: {o.summary}" for o in OBJECTIVES.values()).replace("%", "%%"),
    )
    t.add_argument(
        "--mask-steps",
        type=int,
        default=D["mask_steps"],
        help="the first N steps train the gates to predict the dataset's object masks (beyond the paper), the rest "
        "use --objective; -1: every step when the dataset has object masks, none without",
    )
    t.add_argument(
        "--mask-outside",
        default=D["mask_outside"],
        choices=list(MASK_OUTSIDE),
        help="object words where no object mask is (the background): keep them open, so a word is closed only "
        "inside another object's mask, or close them there too (on the benchmark that made gates drop objects)",
    )
    t.add_argument("--steps", type=int, default=D["steps"])
    t.add_argument("--batch-size", type=int, default=D["batch_size"], help="per process")
    t.add_argument("--lr", type=float, default=D["lr"])
    t.add_argument("--weight-decay", type=float, default=D["weight_decay"])
    share = f"{D['warmup_fraction']:.0%}".replace("%", "%%")  # (argparse formats help with %)
    t.add_argument("--warmup", type=int, default=D["warmup"], help=f"warmup steps (-1: {share} of --steps)")
    t.add_argument("--grad-clip", type=float, default=D["grad_clip"])
    t.add_argument("--seed", type=int, default=D["seed"])
    t.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast dtype of the frozen model (auto: bf16 on a GPU that has it, else fp32)",
    )
    t.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute transformer blocks in the backward pass (less memory, ~30%% slower)",
    )
    t.add_argument("--cpu", action="store_true", help="train on the CPU")


def _checkpoint_arguments(r, D: dict):
    r.add_argument(
        "--save-every", type=int, default=D["save_every"], help="checkpoint every N steps (0: only at the end)"
    )
    r.add_argument(
        "--resume", nargs="?", const="auto", help="continue from a checkpoint (.pt); without a value: RUN_DIR/latest.pt"
    )
    r.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="stop after N steps of this invocation (a checkpoint is written; continue with --resume), "
        "for time-limited jobs",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar (logs a line every 50 steps)")


# --- the run --------------------------------------------------------------------------------------------------------
def _precision(choice: str, device) -> str:
    import torch

    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _checksum(heads) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(heads.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Relative paths are taken from where the command was started, before anything changes directory.
    for name in ("data", "captions", "output", "init", "resume", "checkpoint"):
        value = getattr(args, name)
        if value and value != "auto" and (name != "checkpoint" or Path(value).expanduser().exists()):
            setattr(args, name, str(Path(value).expanduser().resolve()))
    if args.resolution % 8 or args.resolution < 32:
        print("--resolution must be a multiple of 8 and at least 32", file=sys.stderr)
        return EXIT_USAGE

    from .dataset import DatasetError, fingerprint, scan

    try:  # the dataset is checked before any model is loaded: a broken one never starts a run
        examples = scan(args.data, args.captions)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DATASET

    from .host import load_host

    load_host(args.comfyui, cpu=True if args.cpu else None)

    dist = Dist(args.cpu)
    try:
        return _run(args, examples, dist, fingerprint)
    finally:
        dist.close()


class RunRefused(Exception):
    """A reason this run cannot go on; `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _run(args, examples, dist: Dist, fingerprint) -> int:
    from comfyui_maskattn.nodes import gate_training

    try:
        return _train_and_write(args, examples, dist, fingerprint)
    except RunRefused as e:
        say(dist, f"error: {e}")
        return e.code
    except gate_training.TrainingInputError as e:  # (e.g. --init holds another gate kind than --head)
        say(dist, f"error: {e}")
        return EXIT_USAGE


def _train_and_write(args, examples, dist: Dist, fingerprint) -> int:
    from comfyui_maskattn.nodes import gate_training  # the one training run, shared with the Train node

    _check_run(args, examples, dist)
    out = Path(args.output)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model, data, key = _model_and_examples(args, examples, dist, fingerprint)
    config = _train_config(args, dist, has_masks=any(ex.objects for ex in examples))
    gates = gate_training.start_gates(
        model,
        _init_gates(args),
        stage=args.stage,
        placement=args.placement,
        hidden=args.hidden,
        seed=args.seed,
        objective=args.objective,
        init_bias=args.init_bias,
        head=args.head,
    )
    layout = {
        "stage": gates.stage,
        "placement": gates.placement,
        "hidden": gates.hidden_dim,
        "sites": sorted(".".join(map(str, k)) for k in gates.site_heads),
        "init": args.init or args.init_bias,
        "dataset": key,
    }
    resume = _resume_state(args, out, layout)
    progress = RunProgress(args, dist, out, layout, config, gates, len(examples), resumed=resume is not None)
    try:
        run = gate_training.train(
            model,
            data,
            gates,
            config,
            device=dist.device,
            gradient_checkpointing=args.gradient_checkpointing,
            rank=dist.rank,
            world_size=dist.world,
            resume=resume,
            on_start=progress.begin,
            on_step=progress.log_step,
            save_every=args.save_every,
            on_checkpoint=progress.periodic_checkpoint,
            stop_after=args.stop_after,
            on_end=progress.end,
        )
    except gate_training.ResumeError as e:
        raise RunRefused(f"--resume: {e}", EXIT_USAGE) from None
    finally:
        progress.close()
    del data  # free before writing
    if not run.complete:
        say(dist, f"stopped after step {run.step} of {config.steps}; continue with --resume")
        return 0
    gate_training.finished_gates(gates, config.steps)
    if dist.main:
        _write_gates(args, out, gates, config, run, len(examples))
    dist.barrier()
    return 0


def _check_run(args, examples, dist: Dist):
    """What the arguments and the dataset must agree on, checked before any model is loaded."""
    if len(examples) < dist.world:
        raise RunRefused(f"{len(examples)} examples cannot be shared by {dist.world} processes", EXIT_DATASET)
    if args.mask_steps > 0 and not any(ex.objects for ex in examples):
        raise RunRefused("--mask-steps needs object masks in the dataset (NAME.objects.json files or \"objects\" in "
                         "the captions JSONL); none were found", EXIT_DATASET)
    if args.mask_steps > args.steps:
        raise RunRefused(f"--mask-steps {args.mask_steps} is more than --steps {args.steps}", EXIT_USAGE)


def _model_and_examples(args, examples, dist: Dist, fingerprint):
    """(MODEL, this rank's encoded examples with their object masks, the dataset's cache key)."""
    from .encode import encode_dataset, encode_objects, load_components

    shard = examples[dist.rank :: dist.world]
    model, clip, vae = load_components(args)
    key = fingerprint(
        examples, args.resolution, getattr(model.model, "model_type", ""), args.checkpoint or args.model_factory
    )
    data = encode_dataset(args, shard, model, clip, vae, key, dist)
    # Every rank attaches its shard's masks, None for images without: a rank whose shard has none still runs the
    # mask loss (zero weight) in each mask-supervised step, so no rank waits for another's gradients.
    data = data.with_objects(encode_objects(shard, clip, args.resolution))
    del clip, vae
    import comfy.model_management as mm

    mm.soft_empty_cache()
    return model, data, key


def _train_config(args, dist: Dist, has_masks: bool):
    from comfyui_maskattn.masks.train import TrainConfig, resolve_mask_steps, resolve_warmup

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=resolve_warmup(args.warmup, args.steps),
        grad_clip=args.grad_clip,
        seed=args.seed,
        precision=_precision(args.precision, dist.device),
        objective=args.objective,
        mask_steps=resolve_mask_steps(args.mask_steps, args.steps, has_masks),
        mask_outside=args.mask_outside,
        head=args.head,
    )


def _init_gates(args):
    from comfyui_maskattn.masks.gatefile import load_gates

    return load_gates(args.init) if args.init else None


def _resume_state(args, out: Path, layout: dict) -> dict | None:
    """The checkpoint --resume names (None without --resume); refused when it was trained on another layout."""
    from comfyui_maskattn.masks.train import load_state

    if not args.resume:
        return None
    path = out / "latest.pt" if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        raise RunRefused(f"--resume: no checkpoint at {path}", EXIT_USAGE)
    resume = load_state(path)
    saved_layout = resume.get("extra", {}).get("layout")
    if saved_layout != layout:
        raise RunRefused(f"{path.name} was trained with another gate layout or dataset ({saved_layout} vs {layout}); "
                         f"start a new run folder", EXIT_USAGE)
    return resume


class RunProgress:
    """The run's callbacks: the start line, RUN_DIR/loss.csv, the progress bar and the checkpoints (rank 0 writes)."""

    def __init__(self, args, dist: Dist, out: Path, layout: dict, config, gates, examples: int, resumed: bool):
        self.args, self.dist, self.out, self.layout = args, dist, out, layout
        self.config, self.gates, self.examples, self.resumed = config, gates, examples, resumed
        self.csv_path = out / "loss.csv"
        self.log_file = self.writer = self.bar = None
        self.start = time.perf_counter()

    def checkpoint(self, trainer, final=False):
        from comfyui_maskattn.masks.train import save_state

        if not self.dist.main:
            return
        state = trainer.state_dict()
        state["extra"] = {"layout": self.layout,
                          "args": {k: v for k, v in vars(self.args).items() if k != "resume"}}
        if not final:
            save_state(state, self.out / "checkpoints" / f"step_{trainer.step:07d}.pt")
        save_state(state, self.out / "latest.pt")

    def begin(self, trainer, session):
        config, dist = self.config, self.dist
        if self.resumed:
            say(dist, f"resumed at step {trainer.step}")
        say(
            dist,
            f"training {self.gates.parameter_count():,} gate parameters at {len(self.gates.site_heads)} layers on "
            f"{self.examples} examples ({dist.world} process(es), {session.device}, {config.precision}), "
            f"objective {config.objective}"
            + (f" after {config.mask_steps} mask-supervised steps (background {config.mask_outside})"
               if config.mask_steps else "")
            + f", steps {trainer.step}->{config.steps}",
        )
        if dist.main:
            self._open_log(trainer.step)
            if not self.args.no_progress:
                from tqdm import tqdm

                self.bar = tqdm(total=config.steps, initial=trainer.step, desc="MaskAttn gates", unit="step",
                                dynamic_ncols=True)
        self.start = time.perf_counter()

    def _open_log(self, step: int):
        rows = []
        if self.resumed and self.csv_path.is_file():  # keep the log consistent with the resumed step
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self.log_file = open(self.csv_path, "w", newline="")
        self.writer = csv.DictWriter(self.log_file,
                                     fieldnames=["step", "loss", "lr", "grad_norm", "skipped", "seconds"])
        self.writer.writeheader()
        self.writer.writerows(rows)

    def log_step(self, report):
        if not self.dist.main:
            return
        self.writer.writerow(
            {
                "step": report.step,
                "loss": f"{report.loss:.6g}",
                "lr": f"{report.lr:.6g}",
                "grad_norm": f"{report.grad_norm:.4g}",
                "skipped": int(report.skipped),
                "seconds": f"{time.perf_counter() - self.start:.3f}",
            }
        )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{report.lr:.2e}")
            self.bar.update(1)
        elif report.step % 50 == 0 or report.step == self.config.steps:
            print(f"step {report.step}/{self.config.steps} loss {report.loss:.4f} lr {report.lr:.2e}", flush=True)

    def periodic_checkpoint(self, trainer):
        if self.log_file is not None:
            self.log_file.flush()
        self.checkpoint(trainer)
        self.dist.barrier()

    def end(self, trainer, complete):
        self.close()
        if not complete:
            self.checkpoint(trainer)
            self.dist.barrier()
            return
        self.checkpoint(trainer, final=True)
        print(f"[rank {self.dist.rank}] final gate checksum {_checksum(self.gates.heads)}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.log_file is not None and not self.log_file.closed:
            self.log_file.close()


def _write_gates(args, out: Path, gates, config, run, examples: int):
    from comfyui_maskattn.masks.gatefile import save_gates

    gates.source = f"{args.name}.safetensors"
    path = save_gates(
        gates,
        out / f"{args.name}.safetensors",
        extra_metadata={
            "trained_steps": str(config.steps),
            "train_examples": str(examples),
            "train_resolution": str(args.resolution),
            "train_config": json.dumps(config.to_dict()),
            "base_model": Path(args.checkpoint).name if args.checkpoint else "",
        },
    )
    print(
        f"wrote {path}" + (f" ({run.skipped} steps skipped for non-finite values)" if run.skipped else ""),
        flush=True,
    )


if __name__ == "__main__":
    from .host import register_pack

    register_pack()
    sys.exit(main())
