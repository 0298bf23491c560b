"""Accuracy figures of the paper and the honest ones beside them.

- ``acc``: the paper's metric (section 3.1): an attribute prediction is correct within
  +/-1 of the aggregated rating (``LabelSpec.tolerance`` = 1), malignancy exactly (0).
  Accuracy is per image (annotation), not per nodule.
- ``exact_acc``: exact match for every label.
- ``balanced_acc``: mean recall over the classes present in the ground truth (exact).
- ``baseline_acc``: the best constant prediction, scored like ``acc`` on the same test
  rows (chosen with the test labels, so it is an upper bound for any constant rule).
- ``ci95``: percentile bootstrap interval of ``acc`` resampling test *nodules* (cluster
  bootstrap), since the images of one nodule are not independent.
- Fig. 2: the distribution of the number of attributes predicted correctly per image.
"""

from __future__ import annotations

import numpy as np


def correct(pred: np.ndarray, true: np.ndarray, tolerance: int = 0) -> np.ndarray:
    """Boolean array: ``|pred - true| <= tolerance``."""
    return np.abs(np.asarray(pred, np.int64) - np.asarray(true, np.int64)) <= tolerance


def accuracy(pred: np.ndarray, true: np.ndarray, tolerance: int = 0) -> float:
    """Fraction of predictions within ``tolerance`` of the truth (NaN for no rows)."""
    c = correct(pred, true, tolerance)
    return float(c.mean()) if c.size else float("nan")


def balanced_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``true`` (exact match)."""
    pred, true = np.asarray(pred), np.asarray(true)
    if true.size == 0:
        return float("nan")
    recalls = [np.mean(pred[true == c] == c) for c in np.unique(true)]
    return float(np.mean(recalls))


def balanced_accuracy_columns(preds: np.ndarray, true: np.ndarray) -> np.ndarray:
    """:func:`balanced_accuracy` of every column of ``preds`` (n, R) against ``true`` (n,)."""
    true = np.asarray(true)
    if true.size == 0:
        return np.full(preds.shape[1], np.nan)
    recalls = [(preds[true == c] == c).mean(axis=0) for c in np.unique(true)]
    return np.mean(recalls, axis=0)


def baseline_accuracy(true: np.ndarray, n_classes: int, tolerance: int = 0) -> float:
    """Accuracy of the best constant prediction, scored with the same tolerance."""
    true = np.asarray(true)
    if true.size == 0:
        return float("nan")
    return max(accuracy(np.full_like(true, c), true, tolerance) for c in range(n_classes))


def bootstrap_counts(groups: np.ndarray, n_boot: int = 1000,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster-bootstrap resamples as a (n_boot, n_groups) matrix of draw counts.

    Returns ``(counts, group_index)`` where ``group_index`` maps each row to its group.
    One matrix serves every metric evaluated on the same rows.
    """
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.size else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, max(n_groups, 1), size=(n_boot, n_groups))
    flat = (np.arange(n_boot)[:, None] * n_groups + draws).ravel()
    counts = np.bincount(flat, minlength=n_boot * n_groups).reshape(n_boot, n_groups)
    return counts.astype(np.float64), inverse


def bootstrap_ci(correct_rows: np.ndarray, groups: np.ndarray, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95,
                 counts: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Percentile interval of the accuracy, resampling groups (nodules) with replacement.

    ``correct_rows`` is (n,) or (n, R) for R results on the same rows; returns (2,) or
    (R, 2) with the lower and upper bound.
    """
    c = np.asarray(correct_rows, dtype=np.float64)
    single = c.ndim == 1
    c = c[:, None] if single else c
    if c.shape[0] == 0:
        out = np.full((c.shape[1], 2), np.nan)
        return out[0] if single else out
    draw, inverse = counts if counts is not None else bootstrap_counts(groups, n_boot, seed)
    if draw.shape[0] == 0:  # n_boot = 0: no interval asked for
        out = np.full((c.shape[1], 2), np.nan)
        return out[0] if single else out
    n_groups = draw.shape[1]
    R = c.shape[1]
    flat = (inverse[:, None] * R + np.arange(R)).ravel()
    per_group = np.bincount(flat, weights=c.ravel(), minlength=n_groups * R).reshape(-1, R)
    sizes = np.bincount(inverse, minlength=n_groups).astype(np.float64)
    accs = (draw @ per_group) / np.maximum(draw @ sizes, 1.0)[:, None]  # (B, R)
    alpha = (1 - level) / 2
    out = np.quantile(accs, [alpha, 1 - alpha], axis=0).T
    return out[0] if single else out


def n_correct_distribution(correct_matrix: np.ndarray) -> np.ndarray:
    """Fig. 2: counts of images with 0..A attributes correct, from an (n, A) boolean matrix."""
    c = np.asarray(correct_matrix, dtype=bool)
    return np.bincount(c.sum(axis=1), minlength=c.shape[1] + 1)
