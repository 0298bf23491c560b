"""One home for the ``--device`` argument: which names are valid, and what ``None`` means.

``check_device`` validates the name without importing torch (for the k-NN, whose device
goes to faiss, and for early checks); ``resolve_device`` also checks that torch sees the GPU.
"""

from __future__ import annotations

import re

from credanno.errors import CredannoError

VALID_DEVICES = "cpu, cuda or cuda:N"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device(device: str | None, option: str = "--device") -> str | None:
    """``device`` unchanged if it names cpu, cuda or cuda:N (None = automatic), else an error."""
    if device is None:
        return None
    name = str(device).strip().lower()
    if not _DEVICE.fullmatch(name):
        raise CredannoError(f"{option} {device!r} is not a device; use {VALID_DEVICES}")
    return name


def resolve_device(device: str | None, option: str = "--device") -> str:
    """The torch device to use: ``device`` checked against the GPUs torch sees, or, for
    None, ``cuda`` when one is available and ``cpu`` otherwise."""
    import torch

    name = check_device(device, option)
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpus == 0:
            raise CredannoError(f"{option} {name} requested but torch sees no GPU; "
                                f"pass {option} cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= n_gpus:
            raise CredannoError(f"{option} {name}: torch sees {n_gpus} GPU(s) "
                                f"(cuda:0 to cuda:{n_gpus - 1})")
    return name
