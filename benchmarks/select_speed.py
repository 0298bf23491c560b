"""Speed of ``credanno select`` against FAISS k-means alone.

``credanno select --strategy kmeans`` for 1% of 100,000 x 384 training features
(synthetic, in a feature store) -> 1,000 images, timed end to end (store read, L2
normalisation, spherical k-means, the assignment and nearest-image searches, ranking)
against ``faiss.Kmeans`` alone with the strategy's parameters (same k, 20 iterations,
seed, spherical, at most 40,000 training points sampled as FAISS samples) on the same
normalised array in memory, same process and threads. Targets: ratio <= 1.3 and <= 30 s
on 2 cores. ``--quick``: 20,000 x 384, 200 images.

Run: ``python benchmarks/select_speed.py [--quick]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 384


def _store(folder: Path, n_train: int) -> Path:
    """A feature store with ``n_train`` training rows (and a few test rows)."""
    from credanno import stores
    from credanno.synthetic import synthetic_features, synthetic_table

    table = synthetic_table(n_nodules=int(n_train / 4 / 0.97) + 10, per_nodule=4,
                            test_frac=0.02)
    train = table[table["split"] == "train"].head(n_train)
    table = table.loc[np.r_[train.index, table.index[table["split"] == "test"][:50]]]
    table = table.reset_index(drop=True)
    feats = synthetic_features(table, dim=DIM, signal=2.0)
    return stores.save(folder / "speed.h5", features={"cls": feats}, table=table,
                       provenance={"encoder": {"kind": "synthetic", "arch": "none"}})


def _faiss_alone(path: Path, k: int) -> float:
    """Seconds of ``faiss.Kmeans`` (the strategy's parameters) on the normalised array."""
    import faiss

    from credanno import stores
    from credanno.eval.strategies._picking import KMEANS_ITERATIONS, KMEANS_SAMPLE
    from credanno.numerics import l2_normalise

    with stores.open(path) as s:
        x = l2_normalise(s.features("train", "cls"))
    t0 = time.perf_counter()
    km = faiss.Kmeans(DIM, k, niter=KMEANS_ITERATIONS, seed=0, spherical=True,
                      min_points_per_centroid=1, max_points_per_centroid=-(-KMEANS_SAMPLE // k))
    km.train(x)
    return time.perf_counter() - t0


def run(quick: bool = False) -> list[dict]:
    import faiss

    from credanno.eval.selection import select

    n = 20_000 if quick else 100_000
    k = n // 100
    with tempfile.TemporaryDirectory() as tmp:
        path = _store(Path(tmp), n)
        select(path, "kmeans", 10, device="cpu")  # warm up: imports, page cache
        ref = _faiss_alone(path, k)
        t0 = time.perf_counter()
        picks = select(path, "kmeans", frac=0.01, device="cpu")
        ours = time.perf_counter() - t0
    assert len(picks.rows) == k, (len(picks.rows), k)
    threads = faiss.omp_get_max_threads()
    return [
        {"benchmark": "select_speed", "metric": f"kmeans 1% of {n} x {DIM} vs faiss.Kmeans",
         "value": round(ours, 3), "reference": round(ref, 3), "ratio": round(ours / ref, 3),
         "target": "<= 1.3", "ok": ours / ref <= 1.3},
        {"benchmark": "select_speed", "metric": f"kmeans 1% of {n} x {DIM} seconds "
         f"({threads} threads)", "value": round(ours, 3), "reference": 30.0,
         "ratio": round(ours / 30.0, 3), "target": "<= 30 s", "ok": ours <= 30.0},
    ]


if __name__ == "__main__":
    results = run(quick="--quick" in sys.argv)
    from credanno.bench.perf import print_rows

    print_rows(results)
