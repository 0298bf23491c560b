"""``random``: the paper's draw, images one by one in one random order per seed (so the
subsets of one seed are nested: 1% lies inside 10%)."""

from __future__ import annotations

import numpy as np

from credanno.eval.strategies import SubsetContext, register_strategy


@register_strategy("random")
def select(ctx: SubsetContext) -> np.ndarray:
    from credanno.eval.subsets import label_subset

    return label_subset(ctx.table, n=ctx.budget, mode="annotation", seed=ctx.seed)
