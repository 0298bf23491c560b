"""Label fractions: which training images keep their labels ("partial annotation").

The paper's partial-annotation experiments give labels to a random fraction of the
training images (1% of 1904 = 19, 10% = 190), drawn per annotation and not stratified.
A nodule-wise variant draws whole nodules instead, so that the labelled images of one
nodule are never split between labelled and unlabelled. A subset is a pure function of
(training rows, fraction or count, mode, stratification, seed); test rows never enter.

Unstratified subsets of one seed are nested: the first ``n`` rows of one random order, so 1% of a
seed lies inside 10% of the same seed (annotation-reduction curves stay comparable).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

from credanno.errors import CredannoError, CredannoWarning
from credanno.labels import label_spec

if TYPE_CHECKING:
    from credanno.eval.specs import SubsetSpec

MODES: tuple[str, ...] = ("annotation", "nodule")


def check_frac(frac: float) -> float:
    """A label fraction: a number in (0, 1]."""
    try:
        frac = float(frac)
    except (TypeError, ValueError):
        raise CredannoError(f"label fraction {frac!r} is not a number; "
                            "pass e.g. --frac 0.01,0.1,1") from None
    if not 0 < frac <= 1:
        raise CredannoError(f"label fraction must be in (0, 1], got {frac:g}; "
                            "pass e.g. --frac 0.01,0.1,1")
    return frac


def subset_size(n_rows: int, frac: float | None = None, n: int | None = None) -> int:
    """Labelled images for a fraction (``round(frac * n_rows)``, at least 1) or a count."""
    if (frac is None) == (n is None):
        raise CredannoError("give exactly one of a label fraction (--frac) or a count (--n-labels)")
    if frac is not None:
        return max(1, int(round(check_frac(frac) * n_rows)))
    n = int(n)
    if n <= 0:
        raise CredannoError(f"number of labelled images must be positive, got {n}")
    if n > n_rows:
        raise CredannoError(f"--n-labels {n} exceeds the {n_rows} training images; "
                            f"pass at most {n_rows}")
    return n


def stratify_column(stratify: str | bool | None) -> str | None:
    """The label a subset is stratified by: None/False none, True malignancy, else a name."""
    if stratify is None or stratify is False:
        return None
    if stratify is True:
        return "malignancy"
    return label_spec(str(stratify)).name


def _allocate(sizes: np.ndarray, target: int) -> np.ndarray:
    """Largest-remainder allocation of ``target`` over groups in proportion to ``sizes``,
    at least one per non-empty group while the target allows."""
    share = sizes / sizes.sum() * target
    alloc = np.floor(share).astype(int)
    if target >= (sizes > 0).sum():
        alloc = np.maximum(alloc, (sizes > 0).astype(int))
    alloc = np.minimum(alloc, sizes)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    i = 0
    while alloc.sum() < target:
        g = order[i % len(order)]
        if alloc[g] < sizes[g]:
            alloc[g] += 1
        i += 1
    while alloc.sum() > target:
        g = int(np.argmax(alloc - share))
        alloc[g] -= 1
    return alloc


def label_subset(table_train: pd.DataFrame, frac: float | None = None, n: int | None = None,
                 mode: str = "annotation", stratify: str | bool | None = None,
                 seed: int = 0) -> np.ndarray:
    """Sorted positions (0-based rows of ``table_train``) of the labelled training images.

    - ``mode="annotation"``: ``round(frac * N)`` (or ``n``) random images, as in the paper.
    - ``mode="nodule"``: whole nodules in random order until at least that many images
      are labelled (the last nodule may overshoot the target by a few images).
    - ``stratify``: a label name (``True`` = malignancy): the target is shared between
      that label's classes in proportion to their sizes, at least one image each (rows
      missing the label form their own group).

    ``table_train`` must hold training rows only; a test row is an error.
    """
    if mode not in MODES:
        raise CredannoError(f"unknown subset mode {mode!r}; choose one of {', '.join(MODES)}")
    if "split" in table_train.columns and (table_train["split"].astype(str) == "test").any():
        raise CredannoError("label subsets are drawn from training rows only; "
                            "pass the table of the training split")
    n_rows = len(table_train)
    if n_rows == 0:
        raise CredannoError("the training split is empty; the store has no training rows")
    target = subset_size(n_rows, frac, n)
    rng = np.random.default_rng(int(seed))
    col = stratify_column(stratify)

    if mode == "annotation":
        units = np.arange(n_rows)
        unit_of_row = units
        unit_size = np.ones(n_rows, dtype=int)
        unit_class = table_train[col].to_numpy() if col else np.zeros(n_rows, int)
    else:
        nodules = table_train["nodule_id"].to_numpy()
        uniq, unit_of_row, unit_size = np.unique(nodules, return_inverse=True,
                                                 return_counts=True)
        units = np.arange(len(uniq))
        if col:
            first = np.zeros(len(uniq), dtype=int)
            first[unit_of_row[::-1]] = np.arange(n_rows)[::-1]
            unit_class = table_train[col].to_numpy()[first]
        else:
            unit_class = np.zeros(len(uniq), int)

    classes, cls_idx = np.unique(unit_class, return_inverse=True)
    # per-class random orders; one order per class keeps subsets of one seed nested
    orders = [rng.permutation(units[cls_idx == c]) for c in range(len(classes))]
    class_rows = np.array([unit_size[o].sum() for o in orders])
    quota = _allocate(class_rows, target) if col else np.array([target])
    chosen = []
    for order, q in zip(orders, quota, strict=True):
        cum = np.cumsum(unit_size[order])
        take = int(np.searchsorted(cum, q, side="left")) + 1 if q > 0 else 0
        chosen.append(order[:take])
    picked = np.concatenate(chosen) if chosen else np.zeros(0, int)
    if mode == "annotation":
        return np.sort(picked).astype(np.int64)
    return np.flatnonzero(np.isin(unit_of_row, picked)).astype(np.int64)


def missing_classes(train_labels: np.ndarray, subset_labels: np.ndarray) -> list[int]:
    """Classes present in the whole training split but absent from the labelled subset."""
    have = set(np.unique(subset_labels[subset_labels >= 0]).tolist())
    return sorted(set(np.unique(train_labels[train_labels >= 0]).tolist()) - have)


def warn_missing_classes(report: dict[tuple[float, str], list[int]]) -> None:
    """One warning per label fraction naming the labels (and seeds) left without a class."""
    by_frac: dict[float, dict[str, list[int]]] = {}
    for (frac, label), seeds in report.items():
        by_frac.setdefault(frac, {})[label] = seeds
    for frac, per_label in by_frac.items():
        parts = ", ".join(f"{lab} (seed{'s' if len(s) > 1 else ''} "
                          f"{','.join(map(str, sorted(s)))})" for lab, s in per_label.items())
        warnings.warn(f"label fraction {frac:g} leaves classes without labelled examples for "
                      f"{parts}; those classes cannot be predicted there",
                      CredannoWarning, stacklevel=3)


class Subset(NamedTuple):
    """One labelled subset: the training rows that keep their labels, the fraction and seed
    it was drawn for, and its rows' nodules where it was drawn nodule-wise (so that a
    validation part can be carved from whole nodules)."""

    frac: float
    seed: int
    rows: np.ndarray
    groups: np.ndarray | None = None


def draw_subsets(spec: SubsetSpec, table_train: pd.DataFrame) -> list[Subset]:
    """Every subset of ``spec`` (fractions, then seeds) drawn from ``table_train``; the one
    source of labelled rows for k-NN, the probes and the end-to-end baseline."""
    nodules = table_train["nodule_id"].to_numpy() if spec.mode == "nodule" else None
    out = []
    for frac, f_arg, n_arg in spec.sizes(len(table_train)):
        for seed in spec.seeds:
            rows = label_subset(table_train, frac=f_arg, n=n_arg, mode=spec.mode,
                                stratify=spec.stratify, seed=seed)
            out.append(Subset(frac, seed, rows, None if nodules is None else nodules[rows]))
    return out


def warn_subsets_missing_classes(subsets: list[Subset], labels_all: np.ndarray,
                                 names: list[str]) -> None:
    """One warning per fraction naming labels whose subset misses a class of the training
    split (``labels_all``: (n_train, L) int labels, -1 missing, columns named ``names``)."""
    absent: dict[tuple[float, str], list[int]] = {}
    for s in subsets:
        for j, name in enumerate(names):
            if missing_classes(labels_all[:, j], labels_all[s.rows, j]):
                absent.setdefault((s.frac, name), []).append(s.seed)
    if absent:
        warn_missing_classes(absent)
