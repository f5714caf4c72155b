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
here are only the command line, the dataset, the files and the progress display.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

EXIT_DATASET = 2
EXIT_USAGE = 3


def build_parser() -> argparse.ArgumentParser:
    from comfyui_maskattn.masks.objectives import OBJECTIVES
    from comfyui_maskattn.masks.supervised import MASK_OUTSIDE
    from comfyui_maskattn.masks.topology import PLACEMENTS, STAGE_CHOICES
    from comfyui_maskattn.masks.train import TRAIN_DEFAULTS as D

    p = argparse.ArgumentParser(
        prog="python -m cli.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("model and data")
    src.add_argument("--checkpoint", help="checkpoint file, or a name in ComfyUI's models/checkpoints")
    src.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, or the ComfyUI this pack is in)")
    src.add_argument("--data", required=True, help="dataset folder: images with same-name .txt captions")
    src.add_argument("--captions", help="captions JSONL instead of .txt files (file_name/text per line)")
    src.add_argument("--resolution", type=int, default=1024, help="square training size in pixels (multiple of 64)")
    src.add_argument("--output", required=True, help="run folder: loss.csv, checkpoints, cache and the gate file")
    src.add_argument("--name", default="maskattn_gates", help="file name of the final gate file")
    src.add_argument("--model-factory", help=argparse.SUPPRESS)  # "module:function" or "file.py:function" (tests)
    g = p.add_argument_group("gates")
    g.add_argument("--stage", default=D["stage"], choices=list(STAGE_CHOICES))
    g.add_argument("--placement", default=D["placement"], choices=list(PLACEMENTS))
    g.add_argument("--hidden", type=int, default=D["hidden"], help="gate MLP width")
    g.add_argument("--init", help="start from this gate file (.safetensors) instead of fresh heads")
    g.add_argument(
        "--init-bias",
        type=float,
        default=None,
        help="logit bias of fresh heads (default: the objective's; 2 starts open, every pair kept; 0 is the "
        "reference's init)",
    )
    t = p.add_argument_group("optimisation")
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
        "use --objective; -1: every step",
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
    t.add_argument("--warmup", type=int, default=-1, help=f"warmup steps (-1: {share} of --steps)")
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
    r = p.add_argument_group("checkpoints")
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
    return p


# --- distributed ----------------------------------------------------------------------------------------------------
class Dist:
    def __init__(self, cpu: bool):
        import torch

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and not cpu
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group(backend="nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True on every rank iff every rank passed True (so all ranks stop together)."""
        if self.world == 1:
            return ok
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag)
        return int(flag) == 0

    def close(self):
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def say(dist: Dist, *args):
    if dist.main:
        print(*args, flush=True)


# --- model ----------------------------------------------------------------------------------------------------------
def _load_factory(spec: str):
    target, _, func = spec.partition(":")
    if target.endswith(".py"):
        s = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, func)


def load_components(args):
    """(MODEL, CLIP, VAE) through ComfyUI's own checkpoint loader (or a test factory)."""
    if args.model_factory:
        return _load_factory(args.model_factory)()
    if not args.checkpoint:
        raise SystemExit("--checkpoint is required")
    import comfy.sd
    import folder_paths

    path = Path(args.checkpoint).expanduser()
    if not path.is_file():
        found = folder_paths.get_full_path("checkpoints", args.checkpoint)
        if not found:
            raise SystemExit(
                f"checkpoint {args.checkpoint!r} not found (neither a file nor a name in models/checkpoints)"
            )
        path = Path(found)
    out = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
    )
    return out[0], out[1], out[2]


def encode_dataset(args, examples, model, clip, vae, fingerprint: str, dist: Dist):
    """Latents and text states of this rank's examples, computed once and cached in RUN_DIR/cache."""
    import torch
    from safetensors.torch import load_file, save_file

    from comfyui_maskattn.cli.dataset import load_image
    from comfyui_maskattn.nodes.gate_training import TrainingExamples, prepare_examples

    cache_dir = Path(args.output) / "cache"
    cache = cache_dir / f"{fingerprint}-r{dist.rank}of{dist.world}.safetensors"
    if cache.is_file():
        try:
            t = load_file(str(cache))
            n = int(t["count"])
            extras = {}
            for key in t:
                if key.startswith("extra."):
                    prefix, i = key.rsplit(".", 1)
                    extras.setdefault(prefix[len("extra.") :], {})[int(i)] = t[key]
            return TrainingExamples(
                t["latents"],
                [t[f"context.{i}"] for i in range(n)],
                {k: [v[i] for i in range(n)] for k, v in extras.items()},
            )
        except Exception as e:  # a damaged cache is rebuilt
            print(f"[rank {dist.rank}] cache {cache.name} unusable ({e}); encoding again", flush=True)
    res = args.resolution
    latents, conds = [], []
    with torch.inference_mode():
        for ex in examples:
            pixels = load_image(ex.image, res)
            latents.append(vae.encode(pixels[:, :, :, :3]).float().cpu())
            tokens = clip.tokenize(ex.caption)
            cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
            conds.append(
                [
                    cond.float().cpu(),
                    {
                        "pooled_output": pooled.float().cpu(),
                        "width": res,
                        "height": res,
                        "crop_w": 0,
                        "crop_h": 0,
                        "target_width": res,
                        "target_height": res,
                    },
                ]
            )
    prepared = prepare_examples(model, {"samples": torch.cat(latents)}, conds)
    tensors = {"latents": prepared.latents.contiguous(), "count": torch.tensor(len(prepared))}
    for i, c in enumerate(prepared.contexts):
        tensors[f"context.{i}"] = c.contiguous()
    for name, values in prepared.extras.items():
        for i, v in enumerate(values):
            tensors[f"extra.{name}.{i}"] = v.contiguous()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".partial")
    save_file(tensors, str(tmp))
    os.replace(tmp, cache)
    return prepared


def encode_objects(examples, clip, resolution: int):
    """ObjectMasks per example (None without objects): masks cropped like the images, phrases mapped to tokens."""
    from comfyui_maskattn.cli.dataset import load_object_mask
    from comfyui_maskattn.masks.supervised import object_masks
    from comfyui_maskattn.nodes.tokens import clip_tokens

    out = []
    for ex in examples:
        if not ex.objects:
            out.append(None)
            continue
        tokens, vocab = clip_tokens(clip, ex.caption)
        planes = [load_object_mask(ex, obj, resolution) for obj in ex.objects]
        try:
            out.append(object_masks(ex.caption, [o.phrase for o in ex.objects], planes, tokens, vocab))
        except ValueError as e:
            raise SystemExit(f"error: {ex.image.name}: object masks: {e}") from None
    return out


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


def _run(args, examples, dist: Dist, fingerprint) -> int:

    from comfyui_maskattn.masks.gatefile import load_gates, save_gates
    from comfyui_maskattn.masks.train import TrainConfig, load_state, resolve_mask_steps, resolve_warmup, save_state
    from comfyui_maskattn.nodes import gate_training  # the one training run, shared with the Train node

    if len(examples) < dist.world:
        say(dist, f"error: {len(examples)} examples cannot be shared by {dist.world} processes")
        return EXIT_DATASET
    if args.mask_steps and not any(ex.objects for ex in examples):
        say(dist, "error: --mask-steps needs object masks in the dataset (NAME.objects.json files or \"objects\" in "
                  "the captions JSONL); none were found")
        return EXIT_DATASET
    if args.mask_steps > args.steps:
        say(dist, f"error: --mask-steps {args.mask_steps} is more than --steps {args.steps}")
        return EXIT_USAGE
    mask_steps = resolve_mask_steps(args.mask_steps, args.steps)
    out = Path(args.output)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
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

    precision = _precision(args.precision, dist.device)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=resolve_warmup(args.warmup, args.steps),
        grad_clip=args.grad_clip,
        seed=args.seed,
        precision=precision,
        objective=args.objective,
        mask_steps=mask_steps,
        mask_outside=args.mask_outside,
    )
    gates = gate_training.start_gates(
        model,
        load_gates(args.init) if args.init else None,
        stage=args.stage,
        placement=args.placement,
        hidden=args.hidden,
        seed=args.seed,
        objective=args.objective,
        init_bias=args.init_bias,
    )
    layout = {
        "stage": gates.stage,
        "placement": gates.placement,
        "hidden": gates.hidden_dim,
        "sites": sorted(".".join(map(str, k)) for k in gates.site_heads),
        "init": args.init or args.init_bias,
        "dataset": key,
    }

    resume = None
    if args.resume:
        path = out / "latest.pt" if args.resume == "auto" else Path(args.resume)
        if not path.is_file():
            say(dist, f"error: --resume: no checkpoint at {path}")
            return EXIT_USAGE
        resume = load_state(path)
        saved_layout = resume.get("extra", {}).get("layout")
        if saved_layout != layout:
            say(
                dist,
                f"error: {path.name} was trained with another gate layout or dataset "
                f"({saved_layout} vs {layout}); start a new run folder",
            )
            return EXIT_USAGE

    csv_path = out / "loss.csv"
    log_file = writer = bar = None
    start = time.perf_counter()

    def checkpoint(trainer, final=False):
        if not dist.main:
            return
        state = trainer.state_dict()
        state["extra"] = {"layout": layout, "args": {k: v for k, v in vars(args).items() if k != "resume"}}
        if not final:
            save_state(state, out / "checkpoints" / f"step_{trainer.step:07d}.pt")
        save_state(state, out / "latest.pt")

    def begin(trainer, session):
        nonlocal log_file, writer, bar, start
        if resume is not None:
            say(dist, f"resumed at step {trainer.step}")
        say(
            dist,
            f"training {gates.parameter_count():,} gate parameters at {len(gates.site_heads)} layers on "
            f"{len(examples)} examples ({dist.world} process(es), {session.device}, {precision}), "
            f"objective {config.objective}"
            + (f" after {config.mask_steps} mask-supervised steps (background {config.mask_outside})"
               if config.mask_steps else "")
            + f", steps {trainer.step}->{config.steps}",
        )
        if dist.main:
            rows = []
            if resume is not None and csv_path.is_file():  # keep the log consistent with the resumed step
                with open(csv_path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= trainer.step]
            log_file = open(csv_path, "w", newline="")
            writer = csv.DictWriter(log_file, fieldnames=["step", "loss", "lr", "grad_norm", "skipped", "seconds"])
            writer.writeheader()
            writer.writerows(rows)
            if not args.no_progress:
                from tqdm import tqdm

                bar = tqdm(total=config.steps, initial=trainer.step, desc="MaskAttn gates", unit="step",
                           dynamic_ncols=True)
        start = time.perf_counter()

    def log_step(report):
        if not dist.main:
            return
        writer.writerow(
            {
                "step": report.step,
                "loss": f"{report.loss:.6g}",
                "lr": f"{report.lr:.6g}",
                "grad_norm": f"{report.grad_norm:.4g}",
                "skipped": int(report.skipped),
                "seconds": f"{time.perf_counter() - start:.3f}",
            }
        )
        if bar is not None:
            bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{report.lr:.2e}")
            bar.update(1)
        elif report.step % 50 == 0 or report.step == config.steps:
            print(f"step {report.step}/{config.steps} loss {report.loss:.4f} lr {report.lr:.2e}", flush=True)

    def periodic_checkpoint(trainer):
        if log_file is not None:
            log_file.flush()
        checkpoint(trainer)
        dist.barrier()

    def end(trainer, complete):
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
        if not complete:
            checkpoint(trainer)
            dist.barrier()
            return
        checkpoint(trainer, final=True)
        print(f"[rank {dist.rank}] final gate checksum {_checksum(gates.heads)}", flush=True)

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
            on_start=begin,
            on_step=log_step,
            save_every=args.save_every,
            on_checkpoint=periodic_checkpoint,
            stop_after=args.stop_after,
            on_end=end,
        )
    except gate_training.ResumeError as e:
        say(dist, f"error: --resume: {e}")
        return EXIT_USAGE
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None and not log_file.closed:
            log_file.close()
    data = None  # free before writing
    if not run.complete:
        say(dist, f"stopped after step {run.step} of {config.steps}; continue with --resume")
        return 0
    gate_training.finished_gates(gates, config.steps)
    if dist.main:
        gates.source = f"{args.name}.safetensors"
        path = save_gates(
            gates,
            out / f"{args.name}.safetensors",
            extra_metadata={
                "trained_steps": str(config.steps),
                "train_examples": str(len(examples)),
                "train_resolution": str(args.resolution),
                "train_config": json.dumps(config.to_dict()),
                "base_model": Path(args.checkpoint).name if args.checkpoint else "",
            },
        )
        print(
            f"wrote {path}" + (f" ({run.skipped} steps skipped for non-finite values)" if run.skipped else ""),
            flush=True,
        )
    dist.barrier()
    return 0


if __name__ == "__main__":
    from .host import register_pack

    register_pack()
    sys.exit(main())
