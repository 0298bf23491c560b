"""Label-preserving geometric views of grey patches, drawn from the shared counter RNG.

A nodule has no canonical in-plane orientation, so a horizontal flip, a multiple of 90
degrees of rotation and a shift of a few pixels (reflect padding) leave every rating the
same -- the geometric part of DINO's augmentations (Caron et al. 2021), without the
photometric part that would change attribute ratings such as calcification or texture (the
paper's section 3.1 keeps the encoder frozen, so probes see only these views).

Every draw is a pure function of (seed, view or epoch, image index) through
:mod:`credanno.augment.rng`, so a view of image ``i`` is the same alone or in any batch, on
any device and under any number of ``torchrun`` ranks. ``credanno embed --views`` stores
such views (view number = ``view``, image index = table row); the end-to-end supervised
baseline draws one per image and epoch (``view`` = epoch, index = row of its training set).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from credanno.augment.rng import mix64, sample_keys, uniforms
from credanno.errors import CredannoError

#: separates the view draws from DINO's crop and partner draws of the same key
_SALT = 0x5EED_71E3_5A1E_0001

#: how views are made, written to a store's provenance so the store says so
SCHEME = ("credanno.augment.views/1: counter hash of (seed, view, row); "
          "horizontal flip p=0.5, k*90 deg rotation, shift |d|<=max_shift px (reflect pad)")


@dataclass(frozen=True)
class ViewParams:
    """Per-image draws of one batch: flip (bool), quarter turns (0..3), shifts in px."""

    flip: torch.Tensor
    quarter_turns: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor


@dataclass(frozen=True)
class ViewAugmentation:
    """Callable ``(images (B, ..., H, W), rows (B,), view) -> views`` of square patches.

    ``max_shift`` is the largest shift in pixels (0: flips and rotations only); ``seed``
    makes another family of views.
    """

    max_shift: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.max_shift) < 0:
            raise CredannoError(f"view max_shift must be >= 0, got {self.max_shift}")

    def to_dict(self) -> dict[str, Any]:
        """Provenance: the parameters and the scheme that made the views."""
        return {**asdict(self), "scheme": SCHEME}

    def draw(self, rows: Any, view: int, device: torch.device | str = "cpu") -> ViewParams:
        """The random parameters of view ``view`` of each image in ``rows``."""
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64).reshape(-1), device=device)
        keys = mix64(sample_keys(int(self.seed), int(view), idx) ^ _SALT)
        u = uniforms(keys, 4)
        s = int(self.max_shift)

        def shift(col: torch.Tensor) -> torch.Tensor:
            return (col * (2 * s + 1)).long().clamp(max=2 * s) - s

        return ViewParams(flip=u[:, 0] < 0.5, quarter_turns=(u[:, 1] * 4).long().clamp(max=3),
                          dy=shift(u[:, 2]), dx=shift(u[:, 3]))

    def params(self, row: int, view: int) -> tuple[bool, int, int, int]:
        """``(flip, quarter_turns, dy, dx)`` of one image's view, as plain numbers."""
        p = self.draw([row], view)
        return (bool(p.flip[0]), int(p.quarter_turns[0]), int(p.dy[0]), int(p.dx[0]))

    def __call__(self, images: torch.Tensor, rows: Any, view: int) -> torch.Tensor:
        """View number ``view`` of each image (rows of ``images`` are images ``rows``)."""
        h, w = images.shape[-2:]
        if h != w:
            raise CredannoError(f"views need square images, got {h}x{w}; crop them first")
        if self.max_shift >= h:
            raise CredannoError(f"view max_shift {self.max_shift} must be below the image "
                                f"size {h}; pass a smaller max_shift")
        p = self.draw(rows, view, images.device)
        if len(p.flip) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(p.flip)} rows")
        lead = (-1,) + (1,) * (images.ndim - 1)
        x = torch.where(p.flip.view(lead), images.flip(-1), images)
        return _shift(_quarter_turns(x, p.quarter_turns), p.dy, p.dx, int(self.max_shift))


def _quarter_turns(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Image ``b`` turned by ``k[b]`` * 90 degrees (one batched rot90 per turn count)."""
    out = x.clone()
    for turns in (1, 2, 3):
        pick = k == turns
        if bool(pick.any()):
            out[pick] = torch.rot90(x[pick], turns, dims=(-2, -1))
    return out


def _shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, s: int) -> torch.Tensor:
    """Image ``b`` moved by (``dy[b]``, ``dx[b]``) px, reflect-padded: one gather."""
    if s == 0:
        return x
    shape = x.shape
    b, h, w = shape[0], shape[-2], shape[-1]
    flat = x.reshape(b, -1, h, w)
    padded = F.pad(flat, (s, s, s, s), mode="reflect")
    ys = torch.arange(h, device=x.device)[None, :] + s + dy[:, None]     # (B, H)
    xs = torch.arange(w, device=x.device)[None, :] + s + dx[:, None]     # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(flat.shape[1], device=x.device)[None, :, None, None]
    out = padded[bi, ci, ys[:, None, :, None], xs[:, None, None, :]]
    return out.reshape(shape)
