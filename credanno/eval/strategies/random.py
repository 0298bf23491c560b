"""``random``: the paper's draw, images one by one in one random order per seed (so the
subsets of one seed are nested: 1% lies inside 10%). Complementing a labelled set skips
its images in the same order; ``one-per-nodule`` skips images of nodules already used."""

from __future__ import annotations

from credanno.eval.strategies import Selection, SubsetContext, register_strategy
from credanno.eval.strategies._picking import Picker


@register_strategy("random", modes=("annotation", "one-per-nodule"))
def select(ctx: SubsetContext) -> Selection:
    # the first `budget` rows of rng.permutation(n): label_subset's draw, row for row
    picker = Picker(ctx)
    picker.take_in_order(ctx.rng.permutation(len(ctx.table)))
    return picker.selection()
