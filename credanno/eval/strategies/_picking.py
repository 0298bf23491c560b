"""Shared machinery of the selection strategies: the budget and draw-unit bookkeeping
(:class:`Picker`) and the FAISS pieces (spherical k-means, neighbour searches on
L2-normalised features, CPU or GPU).

Every strategy picks greedily, one training row at a time, through a :class:`Picker`,
which owns the rules they share: rows already labelled (``ctx.labelled``) are never
picked and do not count against the budget; ``mode="one-per-nodule"`` allows at most one
image per nodule (counting the labelled ones); ``mode="nodule"`` takes a picked image's
whole nodule, until at least the budget is labelled (the last nodule may overshoot it by a
few images, as the ``nodule`` strategy does). The order of picking is the rank.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from credanno.eval.strategies import Selection, SubsetContext


class Picker:
    """Greedy picks under one context's budget, labelled rows and draw unit."""

    def __init__(self, ctx: SubsetContext) -> None:
        n = len(ctx.table)
        self.budget, self.mode = int(ctx.budget), ctx.mode
        self.available = np.ones(n, dtype=bool)
        labelled = np.asarray(ctx.labelled, dtype=np.int64)
        self.available[labelled] = False
        self.nodule = None
        if self.mode != "annotation":
            self.nodule_ids = ctx.table["nodule_id"].to_numpy()
            _, self.nodule = np.unique(self.nodule_ids, return_inverse=True)
            order = np.argsort(self.nodule, kind="stable")
            starts = np.searchsorted(self.nodule[order], np.arange(self.nodule.max() + 2))
            self._members = (order, starts)
            if self.mode == "one-per-nodule":
                self.available[np.isin(self.nodule, self.nodule[labelled])] = False
        self.rows: list[int] = []
        self.scores: list[float] = []

    @property
    def done(self) -> bool:
        """The budget is spent, or nothing is left to pick."""
        return len(self.rows) >= self.budget or not self.available.any()

    def members(self, row: int) -> np.ndarray:
        """The rows of ``row``'s nodule (row order)."""
        order, starts = self._members
        g = self.nodule[row]
        return order[starts[g]:starts[g + 1]]

    def take(self, row: int, score: float = float("nan")) -> np.ndarray:
        """Pick ``row`` (must be available); returns every row this adds (its whole
        nodule's unpicked, unlabelled images under ``mode="nodule"``)."""
        row = int(row)
        if self.mode == "nodule":
            rest = [r for r in self.members(row) if self.available[r] and r != row]
            added = np.array([row, *rest], dtype=np.int64)
        else:
            added = np.array([row], dtype=np.int64)
        if self.mode == "one-per-nodule":
            self.available[self.members(row)] = False
        self.available[added] = False
        self.rows += added.tolist()
        self.scores += [float(score)] * len(added)
        return added

    def take_all_if_within_budget(self) -> bool:
        """Pick every available row (row order) when the budget covers them all; whether it
        did (a strategy then has nothing to choose)."""
        if self.mode == "annotation" and self.budget >= self.available.sum():
            self.take_in_order(np.flatnonzero(self.available))
            return True
        return False

    def take_in_order(self, order: np.ndarray, scores: np.ndarray | None = None) -> None:
        """Pick the available rows of ``order`` one after another until done."""
        for i, row in enumerate(order):
            if self.done:
                return
            if self.available[row]:
                self.take(row, float("nan") if scores is None else scores[i])

    def selection(self) -> Selection:
        """The picks as a :class:`Selection` (rows in order of picking)."""
        rows = np.asarray(self.rows, dtype=np.int64)
        groups = None
        if self.mode == "nodule":
            groups = self.nodule_ids[rows]
        return Selection(rows, groups, np.asarray(self.scores, dtype=np.float64))


def unit_features(ctx: SubsetContext) -> np.ndarray:
    """The training features, rows L2-normalised (cosine geometry, as the k-NN uses)."""
    from credanno.numerics import l2_normalise

    return l2_normalise(ctx.features, what="training features")


def faiss_gpu(device: str | None) -> int | None:
    """The faiss GPU to use (the k-NN's rule: ``cpu`` never, ``cuda[:N]`` that GPU, None a
    GPU when faiss has one), or None for the CPU."""
    import faiss

    from credanno.eval.knn import _gpu_index

    return _gpu_index(faiss, device)


#: k-means iterations (FAISS's default is 25; 20 is converged on these budgets)
KMEANS_ITERATIONS = 20
#: training points k-means samples at most (FAISS samples beyond max_points_per_centroid
#: x k anyway, 256 by default); every point is still assigned to its centre afterwards
KMEANS_SAMPLE = 40_000


class Clusters(NamedTuple):
    """Spherical k-means of unit rows: unit ``centres`` (k, D), each row's centre
    (``assign``), and each centre's nearest row (``nearest``) with its cosine (``sims``)."""

    centres: np.ndarray
    assign: np.ndarray
    nearest: np.ndarray
    sims: np.ndarray


def spherical_kmeans(x: np.ndarray, k: int, seed: int, device: str | None) -> Clusters:
    """Spherical k-means (unit centres, cosine assignment) of the unit rows ``x`` into
    ``k`` clusters with FAISS's ``Kmeans`` seeded by ``seed`` (on a GPU when faiss has
    one), then one pass over ``x`` for the assignment and each centre's nearest row."""
    import faiss

    gpu = faiss_gpu(device)
    # min_points_per_centroid=1: small training splits with large budgets are expected
    # here, and FAISS would otherwise print a warning to stderr
    km = faiss.Kmeans(x.shape[1], int(k), niter=KMEANS_ITERATIONS, seed=int(seed) % 2**31,
                      spherical=True, min_points_per_centroid=1,
                      max_points_per_centroid=max(1, -(-KMEANS_SAMPLE // int(k))),
                      verbose=False, gpu=False if gpu is None else 1)
    km.train(x)
    centres = np.ascontiguousarray(km.centroids, dtype=np.float32)
    return Clusters(centres, *assign_both_ways(x, centres))


def assign_both_ways(x: np.ndarray, centres: np.ndarray, block: int = 8192
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(assign, nearest, sims)``: each row's most similar centre and each centre's most
    similar row (ties to the lower index), from one blocked product ``x @ centres.T``."""
    k = len(centres)
    assign = np.empty(len(x), dtype=np.int64)
    nearest, sims = np.zeros(k, dtype=np.int64), np.full(k, -np.inf, dtype=np.float32)
    for a in range(0, len(x), block):
        s = x[a:a + block] @ centres.T
        assign[a:a + block] = np.argmax(s, axis=1)
        top = np.argmax(s, axis=0)
        best = s[top, np.arange(k)]
        better = best > sims
        nearest[better], sims[better] = top[better] + a, best[better]
    return assign, nearest, sims


def neighbours(bank: np.ndarray, queries: np.ndarray, k: int,
               device: str | None) -> tuple[np.ndarray, np.ndarray]:
    """``(cosine similarities, rows)`` of the ``k`` nearest unit rows of ``bank`` to each
    unit query, exact (FAISS ``IndexFlatIP``), best first."""
    from credanno.eval.knn import knn_search

    return knn_search(bank, queries, min(int(k), len(bank)), normalize=False, device=device)


def nearest_available(x: np.ndarray, centre: np.ndarray, nearest: int,
                      available: np.ndarray) -> tuple[int, float] | None:
    """The available row nearest to ``centre`` (cosine): its precomputed ``nearest`` row
    when still available, else by one scan of ``x``; None when no row is available."""
    if available[nearest]:
        return int(nearest), float(x[nearest] @ centre)
    if not available.any():
        return None
    sims = x @ centre
    sims[~available] = -np.inf
    row = int(np.argmax(sims))
    return row, float(sims[row])


def feature_start(ctx: SubsetContext) -> tuple[Picker, np.ndarray | None, np.ndarray]:
    """The common start of the feature-space strategies: ``(picker, x, labelled)``.

    When the budget covers every available row the picker has taken them all and ``x`` is
    None (nothing to choose); else ``x`` are the unit features and ``labelled`` the rows
    already labelled (int64).
    """
    picker = Picker(ctx)
    if picker.take_all_if_within_budget():
        return picker, None, np.empty(0, dtype=np.int64)
    return picker, unit_features(ctx), np.asarray(ctx.labelled, dtype=np.int64)


def cluster_count(x: np.ndarray, ctx: SubsetContext, labelled: np.ndarray) -> int:
    """Clusters for a budget that complements ``labelled``: one per pick and per labelled
    image (TypiClust, cRedAnno+), at most one per image."""
    return min(len(x), ctx.budget + len(labelled))

