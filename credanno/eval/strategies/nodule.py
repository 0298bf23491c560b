"""``nodule``: whole nodules in random order until the budget is reached (the last nodule
may overshoot it by a few images); nested per seed like ``random``. Complementing a
labelled set adds the unlabelled images of each nodule in the same order."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from credanno.eval.strategies import Selection, SubsetContext, register_strategy
from credanno.eval.strategies._picking import Picker


@register_strategy("nodule", modes=("nodule",))
def select(ctx: SubsetContext) -> Selection:
    # nodules in label_subset's order (one permutation of the sorted nodule ids), each
    # nodule's rows in table order: the same subsets as label_subset(mode="nodule")
    _, inverse = np.unique(ctx.table["nodule_id"].to_numpy(), return_inverse=True)
    rank = np.argsort(ctx.rng.permutation(inverse.max() + 1))
    picker = Picker(replace(ctx, mode="nodule"))
    picker.take_in_order(np.argsort(rank[inverse], kind="stable"))
    return picker.selection()
