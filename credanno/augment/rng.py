"""Counter-based randomness: every random draw of the project is a pure function of its coordinates.

A random number is a hash (SplitMix64's finaliser) of (seed, epoch or view, image index,
crop or draw, parameter), computed with integer tensor ops on the device. Nothing depends on
hidden generator state, so an image's draws do not depend on the batch it lands in, on the
device or on the number of ranks, and a resumed run draws exactly what an uninterrupted one
would. DINO's multi-crop (:mod:`credanno.pretrain.multicrop`), embed's stored views and the
supervised baseline's views (:mod:`credanno.augment.views`) all draw from here.

Code that cannot take a generator (timm's weight initialisation, drop path) runs under
:func:`forked_seed`, which seeds the global generators only inside a ``fork_rng`` block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # as a signed int64
M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
M2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic): a bijective hash."""
    x = x + GOLDEN
    x = (x ^ _shr(x, 30)) * M1
    x = (x ^ _shr(x, 27)) * M2
    return x ^ _shr(x, 31)


def sample_keys(seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """One int64 key per image of this epoch, from which all its crops are drawn."""
    base = mix64(mix64(torch.tensor([seed], dtype=torch.int64)) + epoch)
    return mix64(base.to(indices.device) + indices.to(torch.int64) * M1)


def crop_keys(keys: torch.Tensor, crop_ids: list[int]) -> torch.Tensor:
    """(len(crop_ids) * B,) keys, crop-major: one per (crop, image) of a batch's ``keys``."""
    ids = torch.tensor(crop_ids, dtype=torch.int64, device=keys.device)
    return mix64(keys[None, :] + ids[:, None] * GOLDEN).reshape(-1)


def uniforms(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(len(keys), n) float32 uniforms in [0, 1), a pure function of the keys."""
    counters = torch.arange(1, n + 1, device=keys.device, dtype=torch.int64) * M2
    bits = mix64(keys[:, None] ^ counters[None, :])
    return _shr(bits, 40).to(torch.float32) / float(1 << 24)


def derive_seed(*parts: int) -> int:
    """A non-negative 63-bit seed hashed from integer ``parts`` (e.g. seed, epoch, rank)."""
    x = torch.tensor([0], dtype=torch.int64)
    for part in parts:
        x = mix64(x + int(part))
    return int(x.item()) & ((1 << 63) - 1)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The same image order on every rank, a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 0x5EED))
    return torch.randperm(n, generator=g)


@contextlib.contextmanager
def forked_seed(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with torch's CPU generator (and ``device``'s, on CUDA) seeded by
    ``seed``, and restore both afterwards.

    For library code that draws from the global generator and takes no ``torch.Generator``
    (timm's initialisation, dropout, drop path): its draws become a function of ``seed``
    alone, and the caller's global random state is left as it was. Unlike
    ``torch.manual_seed``, no other device's generator is touched (nor queued to be seeded
    when CUDA starts).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = []
    if dev.type == "cuda":
        cuda = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(int(seed))
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(int(seed))
        yield
