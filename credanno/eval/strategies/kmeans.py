"""``kmeans``: cRedAnno+'s sparse seeding (Lu et al., "Annotation Exploitation in
Self-Explanatory Lung Nodule Diagnosis", ISBI 2023): spherical k-means of the
L2-normalised training features with as many centres as the budget, and for each centre
the training image nearest to it (cosine). Label-free.

Complementing a labelled set follows TypiClust's rule (Hacohen et al., ICML 2022):
``budget + labelled`` centres, the clusters holding a labelled image count as covered, and
the picks come from the largest uncovered clusters first. Rank = largest cluster first;
score = cosine similarity of the image to its centre.
"""

from __future__ import annotations

import numpy as np

from credanno.eval.strategies import MODES, Selection, SubsetContext, register_strategy
from credanno.eval.strategies._picking import (
    cluster_count,
    feature_start,
    nearest_available,
    spherical_kmeans,
)


def cluster_order(assign: np.ndarray, k: int, labelled: np.ndarray) -> np.ndarray:
    """Clusters with the fewest labelled images first, then the largest, then by index."""
    covered = np.bincount(assign[labelled], minlength=k)
    size = np.bincount(assign, minlength=k)
    return np.lexsort((np.arange(k), -size, covered))


@register_strategy("kmeans", modes=MODES)
def select(ctx: SubsetContext) -> Selection:
    picker, x, labelled = feature_start(ctx)
    if x is None:
        return picker.selection()
    k = cluster_count(x, ctx, labelled)
    cl = spherical_kmeans(x, k, ctx.seed, ctx.device)
    order = cluster_order(cl.assign, k, labelled)
    # a centre whose nearest image is taken (labelled, an earlier centre's, a used nodule)
    # gets the nearest one still available
    while not picker.done:  # a second pass only where nodule rules left centres empty
        for c in order:
            hit = None if picker.done else nearest_available(x, cl.centres[c], cl.nearest[c],
                                                             picker.available)
            if hit is None:
                break
            picker.take(*hit)
    return picker.selection()
