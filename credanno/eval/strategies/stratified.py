"""``stratified``: the budget shared between the classes of a label (malignancy unless
another is named) in proportion to their sizes, at least one image each; images one by
one or whole nodules (``mode``). It reads labels, so it declares so."""

from __future__ import annotations

from credanno.eval.strategies import Selection, SubsetContext, register_strategy


@register_strategy("stratified", reads_labels=True, modes=("annotation", "nodule"))
def select(ctx: SubsetContext) -> Selection:
    from credanno.eval.subsets import label_subset

    rows = label_subset(ctx.table, n=ctx.budget, mode=ctx.mode,
                        stratify=ctx.stratify or "malignancy", seed=ctx.seed)
    groups = ctx.table["nodule_id"].to_numpy()[rows] if ctx.mode == "nodule" else None
    return Selection(rows, groups)
