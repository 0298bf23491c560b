"""``coreset``: k-center greedy (Sener & Savarese, "Active Learning for Convolutional
Neural Networks: A Core-Set Approach", ICLR 2018): repeatedly label the image farthest
(cosine distance) from every image labelled so far. Starts from the labelled set when
there is one, else from a random image of the seed. Label-free. Score = the picked
image's distance to the nearest labelled one when picked (NaN for a random start).
"""

from __future__ import annotations

import numpy as np

from credanno.eval.strategies import MODES, Selection, SubsetContext, register_strategy
from credanno.eval.strategies._picking import (
    feature_start,
    neighbours,
)


@register_strategy("coreset", modes=MODES)
def select(ctx: SubsetContext) -> Selection:
    picker, x, labelled = feature_start(ctx)
    if x is None:
        return picker.selection()
    if len(labelled):
        sims, _ = neighbours(x[labelled], x, 1, ctx.device)
        dist = 1.0 - sims[:, 0].astype(np.float64)
    else:
        dist = np.full(len(x), np.inf)
        start = ctx.rng.choice(np.flatnonzero(picker.available))
        _update(dist, x, picker.take(start))
    while not picker.done:
        # the farthest available image; ties to the lowest row, so a seed's picks repeat
        row = int(np.argmax(np.where(picker.available, dist, -np.inf)))
        _update(dist, x, picker.take(row, float(dist[row])))
    return picker.selection()


def _update(dist: np.ndarray, x: np.ndarray, added: np.ndarray) -> None:
    """Distances to the nearest labelled image, after labelling ``added``."""
    for row in added:
        np.minimum(dist, 1.0 - (x @ x[row]).astype(np.float64), out=dist)
