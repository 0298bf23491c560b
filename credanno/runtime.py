"""Where the code runs: device, processes, precision, CPU threads and random generators.

One home for what every stage asks of the machine, so each decision is made one way:

- devices: :func:`check_device` validates a ``--device`` name without importing torch (the
  CLI parses it, the k-NN hands it to faiss); :func:`resolve_device` also checks it against
  the GPUs torch sees; ``None`` (or ``"auto"``) always means :func:`default_device`: ``cuda``
  when torch sees a GPU, else ``cpu``.
- processes: :class:`DistEnv` from :func:`init_distributed` (the ``torchrun`` process group,
  NCCL on GPUs, Gloo on CPUs) and :func:`cleanup`, with the few collectives pretraining and
  ``credanno embed`` use; no other module creates or destroys a process group.
- precision: :func:`autocast_dtype` maps an ``amp`` setting and a device to an autocast
  dtype (or none), :func:`autocast` enters it.
- threads: :func:`cpu_threads` limits torch's intra-op pool and the native BLAS/OpenMP
  pools (threadpoolctl) for a block and restores them afterwards.
- random numbers: :func:`generator` makes an explicit seeded ``torch.Generator``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from credanno.errors import CredannoError

if TYPE_CHECKING:
    import torch

VALID_DEVICES = "cpu, cuda or cuda:N"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


# -- devices -------------------------------------------------------------------------------
def check_device(device: str | None, option: str = "--device") -> str | None:
    """``device`` normalised if it names cpu, cuda or cuda:N; None (or "auto") = automatic.

    Anything else is a one-line error. Does not import torch.
    """
    if device is None:
        return None
    name = str(device).strip().lower()
    if name == "auto":
        return None
    if not _DEVICE.fullmatch(name):
        raise CredannoError(f"{option} {device!r} is not a device; use {VALID_DEVICES}")
    return name


def default_device() -> str:
    """The one rule for an unset ``--device``: ``cuda`` when torch sees a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None, option: str = "--device") -> str:
    """The device to use: ``device`` checked against the GPUs torch sees, or for None the
    :func:`default_device`."""
    name = check_device(device, option)
    if name is None:
        return default_device()
    if name.startswith("cuda"):
        n_gpus = _gpu_count()
        if n_gpus == 0:
            raise CredannoError(f"{option} {name} requested but torch sees no GPU; "
                                f"pass {option} cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= n_gpus:
            raise CredannoError(f"{option} {name}: torch sees {n_gpus} GPU(s) "
                                f"(cuda:0 to cuda:{n_gpus - 1})")
    return name


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torch_device(device: str | None, local_rank: int = 0,
                 option: str = "--device") -> torch.device:
    """:func:`resolve_device` as a ``torch.device``; a bare ``cuda`` is GPU ``local_rank``
    (under ``torchrun`` each process on a machine takes its own GPU)."""
    import torch

    name = resolve_device(device, option)
    if name == "cuda":
        return torch.device("cuda", local_rank)
    if name.startswith("cuda:") and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        # NCCL refuses two ranks on one GPU; say so before it does, in one line
        raise CredannoError(f"{option} {name} would put every torchrun process of this "
                            f"machine on one GPU; pass {option} cuda (one GPU per process)")
    return torch.device(name)


# -- processes -----------------------------------------------------------------------------
def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@dataclass
class DistEnv:
    """This process's place in the job (one process: rank 0 of 1 on the CPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=_cpu)
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, option: str = "--device") -> DistEnv:
    """This process's :class:`DistEnv`: joins the ``torchrun`` process group when the
    environment names one (``WORLD_SIZE`` > 1); pair with :func:`cleanup`."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch_device(device, local_rank, option)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistEnv(device=dev)
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
        owns = True
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev,
                   owns_group=owns)


def cleanup(env: DistEnv) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if env.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard(batch: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """This rank's contiguous slice of a global batch of indices."""
    if len(batch) % env.world_size:
        raise CredannoError(f"batch size {len(batch)} is not divisible by {env.world_size} "
                            "processes; pass a --batch-size that is a multiple of the GPU count")
    per = len(batch) // env.world_size
    return batch[env.rank * per:(env.rank + 1) * per]


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's value of a picklable object on every rank."""
    if not env.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum of ``value`` over the ranks (``value`` itself in one process)."""
    if env.distributed:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
    return value


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of ``value`` over the ranks (``value`` itself in one process)."""
    if env.distributed:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        value /= env.world_size
    return value


def all_gather(value: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """Every rank's ``value`` (same shape on all ranks), in rank order."""
    if not env.distributed:
        return [value]
    import torch
    import torch.distributed as dist

    gathered = [torch.empty_like(value) for _ in range(env.world_size)]
    dist.all_gather(gathered, value)
    return gathered


def barrier(env: DistEnv) -> None:
    """Wait until every rank gets here."""
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


# -- precision -----------------------------------------------------------------------------
def autocast_dtype(amp: str, device_type: str,
                   bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` setting on a device type (None = full precision).

    ``auto`` is bf16 on GPUs that support it and full precision elsewhere. bf16 keeps fp32's
    exponent range, so it needs no loss scaling; fp16 needs a GradScaler and a GPU.
    """
    import torch

    if device_type == "cuda" and bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if device_type == "cuda" and bf16_supported else None
    if amp == "bf16":
        if device_type == "cuda" and not bf16_supported:
            raise CredannoError("this GPU has no bf16 support; pass amp = \"fp16\" or \"none\"")
        return torch.bfloat16
    if amp == "fp16":
        if device_type != "cuda":
            raise CredannoError("fp16 autocast needs a GPU; use amp = \"bf16\" or \"none\" on CPU")
        return torch.float16
    raise CredannoError(f"unknown amp mode {amp!r}; choose auto, bf16, fp16 or none")


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device_type``, or nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type, dtype=dtype)


def precision_label(dtype: torch.dtype | None) -> str:
    """How features were computed, for provenance: ``bf16-autocast``, ``fp16-autocast``,
    ``fp32``."""
    if dtype is None:
        return "fp32"
    import torch

    return {torch.bfloat16: "bf16-autocast", torch.float16: "fp16-autocast"}[dtype]


# -- threads -------------------------------------------------------------------------------
@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """At most ``n`` threads in torch's intra-op pool and the native BLAS/OpenMP pools
    (numpy, scipy, faiss; via threadpoolctl) inside the block; the previous counts come back
    afterwards, also on error. ``None`` leaves everything as it is.

    torch's pool is process-wide and threadpoolctl does not reach it reliably (torch keeps
    its own count), hence ``torch.set_num_threads`` with the old value restored.
    """
    if n is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    n = int(n)
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(saved)


# -- random numbers ------------------------------------------------------------------------
def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``: pass it to every draw
    (``torch.randn(..., generator=g)``) instead of seeding torch's global generator."""
    import torch

    return torch.Generator(device=device).manual_seed(int(seed))
