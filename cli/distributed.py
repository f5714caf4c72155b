"""The command-line trainer's processes: one, or several under torchrun (DistributedDataParallel over the gate
parameters); rank 0 alone writes files and prints."""

from __future__ import annotations

import os


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
