"""``nodule``: whole nodules in random order until the budget is reached (the last nodule
may overshoot it by a few images); nested per seed like ``random``."""

from __future__ import annotations

from credanno.eval.strategies import Selection, SubsetContext, register_strategy


@register_strategy("nodule", modes=("nodule",))
def select(ctx: SubsetContext) -> Selection:
    from credanno.eval.subsets import label_subset

    rows = label_subset(ctx.table, n=ctx.budget, mode="nodule", seed=ctx.seed)
    return Selection(rows, ctx.table["nodule_id"].to_numpy()[rows])
