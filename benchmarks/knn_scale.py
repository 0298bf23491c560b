"""k-NN search at scale against the compute floor: a NumPy sgemm of the same shapes.

A 100k x 384 bank, 10k queries, k = 250 (L2-normalised float32). credanno's exact FAISS
search (``credanno.eval.knn.knn_search``) must compute all 10k x 100k similarities, as a
matrix product does, plus the top-k selection; the floor is ``np.matmul`` of the same
shapes (in blocks of 2048 queries, so the 4 GB product never exists at once). Also timed:
the blocked path that streams the bank in 25k-row blocks (``knn_search_blocks``).

Target: search <= 1.5x the floor. Run: ``python benchmarks/knn_scale.py [--quick]``.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def _row(metric, value, reference, ratio, target, ok):
    return {"benchmark": "knn_scale", "metric": metric, "value": round(value, 4),
            "reference": round(reference, 4), "ratio": round(ratio, 3), "target": target,
            "ok": bool(ok)}


def run(quick: bool = False) -> list[dict]:
    from credanno.eval.knn import knn_search, knn_search_blocks
    from credanno.numerics import l2_normalise

    n_bank, n_q, dim, k = (20_000, 2_000, 384, 250) if quick else (100_000, 10_000, 384, 250)
    rng = np.random.default_rng(0)
    bank = l2_normalise(rng.standard_normal((n_bank, dim), dtype=np.float32))
    queries = l2_normalise(rng.standard_normal((n_q, dim), dtype=np.float32))

    out = np.empty((2048, n_bank), dtype=np.float32)
    bank_t = bank.T

    def floor():
        for s in range(0, n_q, 2048):
            q = queries[s:s + 2048]
            np.matmul(q, bank_t, out=out[:len(q)])

    floor()  # warm-up (thread pools, page faults)
    knn_search(bank[:1000], queries[:100], 10, normalize=False)
    t0 = time.perf_counter()
    floor()
    t_floor = time.perf_counter() - t0
    t0 = time.perf_counter()
    sims, idx = knn_search(bank, queries, k, normalize=False)
    t_search = time.perf_counter() - t0
    block = max(n_bank // 4, k)
    t0 = time.perf_counter()
    s2, i2 = knn_search_blocks(((o, bank[o:o + block]) for o in range(0, n_bank, block)),
                               queries, k, normalize=False)
    t_blocks = time.perf_counter() - t0
    same = float(np.mean(i2 == idx))
    ratio = t_search / t_floor
    return [
        _row(f"search {n_bank}x{dim} bank, {n_q} queries, k={k} s (vs sgemm floor)",
             t_search, t_floor, ratio, "<= 1.5", ratio <= 1.5),
        _row(f"blocked search ({block}-row blocks) s (vs sgemm floor)", t_blocks, t_floor,
             t_blocks / t_floor, "info", True),
        _row("blocked == in-memory neighbours (fraction)", same, 1.0, same, ">= 0.999",
             same >= 0.999),
    ]


if __name__ == "__main__":
    results = run(quick="--quick" in sys.argv)
    from credanno.bench.perf import print_rows

    print_rows(results)
