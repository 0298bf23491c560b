"""The paper's k-NN sweep on a LIDC-size store: credanno against two per-configuration loops.

Sweep: 8 labels (malignancy + the 7 summary attributes) x 7 k (10..250) x 3 label
fractions (1%, 10%, 100%) x 5 seeds on 1904 train / 769 test 384-d features (synthetic,
with label signal). credanno does one FAISS search per (fraction, seed) subset and votes
all labels and k from it, and also computes every metric (bootstrap CIs included).

References, timed in the same process on the same subsets:

- ``dense loop``: like the paper's code (DINO's ``knn_classifier``): for every subset,
  label and k, ``torch.mm`` of test against labelled train features, ``topk(k)``,
  exp(sim / T) one-hot votes, argmax, accuracy;
- ``sklearn``: ``KNeighborsClassifier(k, metric="cosine", algorithm="brute")`` with the
  same exp(sim / T) weights, fitted and predicted per subset, label and k.

Target: credanno >= 20x faster than both. ``agreement`` checks that the predictions match.
Run: ``python benchmarks/knn_sweep.py [--quick]``.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np

KS = (10, 20, 50, 100, 150, 200, 250)
FRACS = (0.01, 0.1, 1.0)
T = 0.1


def lidc_size_data(n_train: int = 1904, n_test: int = 769, dim: int = 384, seed: int = 0):
    """A table and features of the public split's size (train first, then test)."""
    from credanno.synthetic import synthetic_features, synthetic_table

    t = synthetic_table(n_nodules=740, per_nodule=4, test_frac=0.3, seed=seed)
    train = t[t["split"] == "train"].head(n_train)
    test = t[t["split"] == "test"].head(n_test)
    if len(train) < n_train or len(test) < n_test:
        raise RuntimeError("synthetic table too small for the requested split")
    x = synthetic_features(t, dim=dim, signal=0.5, seed=seed)
    return (x[train.index], train.reset_index(drop=True), x[test.index],
            test.reset_index(drop=True))


def dense_loop(train_x, train_t, test_x, test_t, subsets, labels, ks):
    """Per (subset, label, k): torch.mm + topk + weighted vote, as in the paper's code."""
    import torch

    from credanno.labels import label_spec

    tr = torch.nn.functional.normalize(torch.from_numpy(train_x), dim=1)
    te = torch.nn.functional.normalize(torch.from_numpy(test_x), dim=1)
    out = {}
    for key, rows in subsets.items():
        bank = tr[torch.from_numpy(rows)]
        for label in labels:
            C = label_spec(label).n_classes
            y_bank = torch.from_numpy(train_t[label].to_numpy()[rows])
            y_test = torch.from_numpy(test_t[label].to_numpy().copy())  # pandas 3: read-only
            for k in ks:
                kk = min(k, len(rows))
                sim = torch.mm(te, bank.T)
                s, i = sim.topk(kk, dim=1)
                votes = torch.zeros(len(te), C)
                votes.scatter_add_(1, y_bank[i], (s / T).exp())
                pred = votes.argmax(1)
                out[(key, label, k)] = pred.numpy()
                _ = (pred == y_test).float().mean().item()
    return out


def sklearn_loop(train_x, train_t, test_x, test_t, subsets, labels, ks):
    """Per (subset, label, k): KNeighborsClassifier fit + predict with exp(sim / T) weights."""
    from sklearn.neighbors import KNeighborsClassifier

    def weights(dist):  # cosine distance = 1 - sim; shift per row like credanno (same argmax)
        return np.exp((1 - dist) / T - ((1 - dist) / T).max(axis=1, keepdims=True))

    out = {}
    for key, rows in subsets.items():
        for label in labels:
            y = train_t[label].to_numpy()[rows]
            for k in ks:
                clf = KNeighborsClassifier(min(k, len(rows)), metric="cosine",
                                           algorithm="brute", weights=weights)
                clf.fit(train_x[rows], y)
                out[(key, label, k)] = clf.predict(test_x)
    return out


def _row(metric, value, reference, ratio, target, ok):
    return {"benchmark": "knn_sweep", "metric": metric, "value": round(value, 4),
            "reference": round(reference, 4), "ratio": round(ratio, 3), "target": target,
            "ok": bool(ok)}


def run(quick: bool = False) -> list[dict]:
    from credanno.errors import CredannoWarning
    from credanno.eval.data import EvalData
    from credanno.eval.knn import knn_sweep
    from credanno.eval.specs import KnnSpec, SubsetSpec
    from credanno.eval.subsets import label_subset
    from credanno.labels import SUMMARY_ATTRIBUTES

    labels = ["malignancy", *SUMMARY_ATTRIBUTES]
    seeds = list(range(2 if quick else 5))
    ks = KS
    train_x, train_t, test_x, test_t = lidc_size_data()
    subsets = {(f, s): label_subset(train_t, frac=f, seed=s) for f in FRACS for s in seeds}
    n_conf = len(subsets) * len(labels) * len(ks)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CredannoWarning)
        data = EvalData.from_arrays(train_x, train_t, test_x, test_t, labels)
        knn_sweep(data, SubsetSpec(fracs=[0.1]), KnnSpec(ks=[10]))  # warm-up
        t0 = time.perf_counter()
        res = knn_sweep(data, SubsetSpec(fracs=FRACS, seeds=seeds), KnnSpec(ks=ks))
        t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    dense = dense_loop(train_x, train_t, test_x, test_t, subsets, labels, ks)
    t_dense = time.perf_counter() - t0
    t0 = time.perf_counter()
    skl = sklearn_loop(train_x, train_t, test_x, test_t, subsets, labels, ks)
    t_skl = time.perf_counter() - t0

    by_key = {(c.frac, c.seed, c.k): c for c in res._configs}
    agree_d, agree_s, total = 0, 0, 0
    for (key, label, k), pred in dense.items():
        mine = by_key[(key[0], key[1], k)].preds[label]
        agree_d += int((mine == pred).sum())
        agree_s += int((mine == skl[(key, label, k)]).sum())
        total += len(pred)
    rows = [
        _row(f"sweep {n_conf} configs ({len(subsets)} subsets) s, vs dense torch loop",
             t_ours, t_dense, t_dense / t_ours, ">= 20", t_dense / t_ours >= 20),
        _row("same sweep s, vs sklearn KNeighborsClassifier", t_ours, t_skl, t_skl / t_ours,
             ">= 20", t_skl / t_ours >= 20),
        _row("prediction agreement with dense loop", agree_d / total, 1.0, agree_d / total,
             ">= 0.999", agree_d / total >= 0.999),
        _row("prediction agreement with sklearn", agree_s / total, 1.0, agree_s / total,
             ">= 0.999", agree_s / total >= 0.999),
    ]
    return rows


if __name__ == "__main__":
    results = run(quick="--quick" in sys.argv)
    from credanno.bench.perf import print_rows

    print_rows(results)
