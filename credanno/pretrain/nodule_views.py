"""Views of one nodule from different radiologists' patches, for DINO's multi-crop."""

from __future__ import annotations

import numpy as np
import torch

from credanno.augment.rng import mix64, uniforms

#: salt separating the partner draw from the crop draws of the same key
_SALT = 0xBF58476D1CE4E5B9 - (1 << 64)


class SameNoduleViews:
    """Picks, per image, another radiologist's patch of the same nodule.

    LIDC nodules carry up to four annotations, each with its own central slice, so their
    patches are natural views of one nodule that differ in slice, outline and surroundings
    (on the phantom: in every rendered intensity, vessel and noise). With probability ``p``
    an image's second global crop and its local crops come from such a partner, which asks
    DINO for features shared by the nodule's views rather than by one patch's background.
    No rating is used: nodule identity is pylidc's clustering of the annotations.

    The choice is a pure function of the image's key (counter-based, as the crops), so it
    does not depend on batch, rank or device. Nodules with one annotation are their own
    partner.
    """

    def __init__(self, nodule_ids, p: float, device: torch.device | str = "cpu"):
        ids = np.asarray(nodule_ids)
        order = np.argsort(ids, kind="stable")
        _, first, inverse, counts = np.unique(ids[order], return_index=True,
                                              return_inverse=True, return_counts=True)
        pos = np.empty(len(ids), dtype=np.int64)
        pos[order] = np.arange(len(ids)) - first[inverse]
        start = np.empty(len(ids), dtype=np.int64)
        start[order] = first[inverse]
        count = np.empty(len(ids), dtype=np.int64)
        count[order] = counts[inverse]
        self.p = float(p)
        self.members = torch.as_tensor(order, device=device)   # rows grouped by nodule
        self.start = torch.as_tensor(start, device=device)     # row -> first slot of its nodule
        self.count = torch.as_tensor(count, device=device)     # row -> annotations of its nodule
        self.pos = torch.as_tensor(pos, device=device)         # row -> its own slot

    def __call__(self, indices: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Partner row of each row in ``indices`` (the row itself where none is drawn)."""
        u = uniforms(mix64(keys ^ _SALT), 2)
        count, pos = self.count[indices], self.pos[indices]
        others = (count - 1).clamp(min=1)
        pick = (u[:, 1] * others).long().clamp(max=others - 1)
        pick = pick + (pick >= pos).long()                   # skip the image itself
        partner = self.members[self.start[indices] + pick.clamp(max=count - 1)]
        use = (u[:, 0] < self.p) & (count > 1)
        return torch.where(use, partner, indices)
