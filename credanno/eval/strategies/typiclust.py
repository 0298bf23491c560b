"""``typiclust``: TypiClust (Hacohen, Dekel & Weinshall, "Active Learning on a Budget:
Opposite Strategies Suit High and Low Budgets", ICML 2022). Spherical k-means of the
L2-normalised training features into ``budget + labelled`` clusters; repeatedly, in the
cluster with the fewest labelled images (the largest among equals), label its most
*typical* image: typicality = 1 / mean squared distance to its 20 nearest neighbours in
the cluster (half the cluster when it is smaller, as the paper's code does). Label-free.
Score = typicality.
"""

from __future__ import annotations

import numpy as np

from credanno.eval.strategies import MODES, Selection, SubsetContext, register_strategy
from credanno.eval.strategies._picking import (
    cluster_count,
    feature_start,
    neighbours,
    spherical_kmeans,
)

#: neighbours of the typicality estimate (the paper's K)
K_NN = 20


def typicality(x: np.ndarray, device: str | None = None) -> np.ndarray:
    """1 / (mean squared L2 distance to the ``min(20, len // 2)`` nearest other rows + 1e-5)
    of every unit row of ``x`` (one cluster)."""
    m = len(x)
    if m <= 2:
        return np.ones(m)
    k = min(K_NN, m // 2)
    sims, _ = neighbours(x, x, k + 1, device)
    sq = np.maximum(2.0 - 2.0 * sims[:, 1:].astype(np.float64), 0.0)  # first is the row itself
    return 1.0 / (sq.mean(axis=1) + 1e-5)


@register_strategy("typiclust", modes=MODES)
def select(ctx: SubsetContext) -> Selection:
    picker, x, labelled = feature_start(ctx)
    if x is None:
        return picker.selection()
    k = cluster_count(x, ctx, labelled)
    assign = spherical_kmeans(x, k, ctx.seed, ctx.device).assign
    members = [np.flatnonzero(assign == c) for c in range(k)]
    size = np.array([len(m) for m in members])
    count = np.bincount(assign[labelled], minlength=k)
    typ: dict[int, np.ndarray] = {}
    while not picker.done:
        live = np.flatnonzero(np.bincount(assign, weights=picker.available, minlength=k))
        if not len(live):
            break
        c = int(live[np.lexsort((live, -size[live], count[live]))[0]])
        if c not in typ:  # typicality of the whole cluster, computed once
            typ[c] = typicality(x[members[c]], ctx.device)
        t = np.where(picker.available[members[c]], typ[c], -np.inf)
        best = int(np.argmax(t))
        added = picker.take(members[c][best], float(t[best]))
        np.add.at(count, assign[added], 1)
    return picker.selection()
