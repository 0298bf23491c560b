"""Multi-process training with ``torchrun``: process group, device and batch sharding.

``torchrun --nproc_per_node N -m credanno pretrain ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; we join a process group (NCCL on GPUs, Gloo on CPUs) and each rank takes a
contiguous shard of every global batch, drawn from one permutation that all ranks compute
from the seed (a distributed sampler without a sampler object). Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from credanno.errors import CredannoError


@dataclass
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``None``/"auto": the local rank's GPU if there is one, else the CPU."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CredannoError(
            f"unknown device {device!r}; pass --device cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CredannoError("--device cuda requested but no GPU is visible; pass --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the ``torchrun`` process group if the environment names one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistEnv(device=dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
        owns = True
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev,
                   owns_group=owns)


def cleanup(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """This rank's contiguous slice of a global batch of indices."""
    if len(batch) % env.world_size:
        raise CredannoError(f"batch size {len(batch)} is not divisible by {env.world_size} "
                            "processes; pass a --batch-size that is a multiple of the GPU count")
    per = len(batch) // env.world_size
    return batch[env.rank * per:(env.rank + 1) * per]


def broadcast_object(obj, env: DistEnv):
    """Rank 0's value of a picklable object on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= env.world_size
    return value


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
