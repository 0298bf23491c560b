"""``probcover``: ProbCover (Yehuda, Dekel, Hacohen & Weinshall, "Active Learning Through a
Covering Lens", NeurIPS 2022). Every training image covers the images within cosine
distance ``delta`` of it (its delta-ball); greedily label the image whose ball covers the
most images not yet covered; once everything is covered, the rest is random. ``delta`` is
chosen from the features as the paper does: the largest radius at which ``ALPHA`` = 95% of
the balls are pure under k-means pseudo-classes. Label-free. Complementing a labelled set
starts with its balls covered. Score = the number of images a pick newly covers.
"""

from __future__ import annotations

import numpy as np

from credanno.eval.strategies import MODES, Selection, SubsetContext, register_strategy
from credanno.eval.strategies._picking import (
    feature_start,
    neighbours,
    spherical_kmeans,
)

#: share of delta-balls that must be pure under the pseudo-classes (the paper's alpha)
ALPHA = 0.95
#: k-means pseudo-classes of the purity criterion; the paper uses the number of classes,
#: which a label-free rule does not know: 2 (benign / malignant) is the task's
PSEUDO_CLASSES = 2
#: images whose distance to another pseudo-class is measured (a seeded sample beyond it)
PURITY_SAMPLE = 5000


def choose_delta(x: np.ndarray, seed: int, device: str | None) -> float:
    """The largest cosine radius at which ``ALPHA`` of the balls hold one pseudo-class:
    a ball around ``i`` is pure while ``delta`` is below ``i``'s distance to the nearest
    image of another pseudo-class, so delta is that distance's ``1 - ALPHA`` quantile."""
    pseudo = spherical_kmeans(x, min(PSEUDO_CLASSES, len(x)), seed, device).assign
    rng = np.random.default_rng(int(seed))
    rows = np.arange(len(x))
    if len(rows) > PURITY_SAMPLE:
        rows = np.sort(rng.choice(rows, PURITY_SAMPLE, replace=False))
    other = np.full(len(rows), 2.0)
    for c in np.unique(pseudo):
        q, bank = rows[pseudo[rows] == c], np.flatnonzero(pseudo != c)
        if len(q) and len(bank):
            sims, _ = neighbours(x[bank], x[q], 1, device)
            other[pseudo[rows] == c] = 1.0 - sims[:, 0]
    return float(max(np.quantile(other, 1.0 - ALPHA), 1e-6))


def balls(x: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """The delta-ball graph as CSR ``(lims, members)``: ball ``i`` is
    ``members[lims[i]:lims[i + 1]]`` (exact FAISS range search, itself included)."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, members = index.range_search(x, 1.0 - delta)
    return lims.astype(np.int64), members.astype(np.int64)


@register_strategy("probcover", modes=MODES)
def select(ctx: SubsetContext) -> Selection:
    picker, x, labelled = feature_start(ctx)
    if x is None:
        return picker.selection()
    lims, members = balls(x, choose_delta(x, ctx.seed, ctx.device))
    n = len(x)
    covered = np.zeros(n, dtype=bool)
    gain = np.diff(lims)  # uncovered images in each ball
    _cover(labelled, lims, members, covered, gain)
    # ties between equal gains go to a seeded order, so seeds differ where the rule allows
    tiebreak = n - ctx.rng.permutation(n)
    while not picker.done:
        key = np.where(picker.available, gain * (n + 1) + tiebreak, -1)
        row = int(np.argmax(key))
        if gain[row] <= 0:
            break
        added = picker.take(row, float(gain[row]))
        _cover(added, lims, members, covered, gain)
    rest = ctx.rng.permutation(n)  # all covered: the paper's rule, random for the rest
    picker.take_in_order(rest, np.zeros(n))
    return picker.selection()


def _cover(rows: np.ndarray, lims: np.ndarray, members: np.ndarray, covered: np.ndarray,
           gain: np.ndarray) -> None:
    """Mark the balls of ``rows`` covered and lower every ball's gain by what they cover
    (the graph is symmetric: the balls holding ``j`` are ``j``'s own ball)."""
    if not len(rows):
        return
    inside = np.unique(np.concatenate([members[lims[r]:lims[r + 1]] for r in rows]))
    new = inside[~covered[inside]]
    covered[new] = True
    if len(new):
        holders = np.concatenate([members[lims[j]:lims[j + 1]] for j in new])
        gain -= np.bincount(holders, minlength=len(gain))
        np.maximum(gain, 0, out=gain)
