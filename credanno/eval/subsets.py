"""Label subsets: which training images keep their labels ("partial annotation").

The paper's partial-annotation experiments give labels to a random fraction of the
training images (1% of 1904 = 19, 10% = 190), drawn per annotation and not stratified.
A nodule-wise variant draws whole nodules instead, so that the labelled images of one
nodule are never split between labelled and unlabelled. How a subset is chosen is a
strategy of :mod:`credanno.eval.strategies`; a subset is a pure function of (training rows,
their features, budget, strategy, seed); test rows never enter. A subset can also be
given: a file of ids (:func:`read_subset_file`) or explicit row arrays
(:func:`resolve_subsets`).

Unstratified subsets of one seed are nested: the first ``n`` rows of one random order, so 1% of a
seed lies inside 10% of the same seed (annotation-reduction curves stay comparable).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from credanno.errors import CredannoError, CredannoWarning
from credanno.eval.strategies import (
    MODES,
    Features,
    Selection,
    SubsetContext,
    _LazyFeatures,
    check_selection,
    get_strategy,
    label_free,
)
from credanno.labels import label_spec

if TYPE_CHECKING:
    from credanno.eval.specs import SubsetSpec

__all__ = ["MODES", "Subset", "check_frac", "draw_subsets", "label_subset", "read_subset_file",
           "resolve_subsets", "subset_size"]


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
    if mode not in MODES[:2]:  # the built-in draws: images one by one or whole nodules
        raise CredannoError(f"unknown subset mode {mode!r}; choose one of "
                            f"{', '.join(MODES[:2])}")
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
    it was drawn for, and its rows' groups (nodules) where it was drawn by whole groups (so
    that a validation part can be carved from whole nodules)."""

    frac: float
    seed: int
    rows: np.ndarray
    groups: np.ndarray | None = None


if TYPE_CHECKING:
    #: what ``knn_sweep``/``probe_sweep`` accept as ``subsets``: a spec, or explicit
    #: subsets (each a :class:`Subset` or an int array of training-row positions)
    SubsetsLike = SubsetSpec | Sequence[Subset | np.ndarray | Sequence[int]] | None


def draw_subsets(spec: SubsetSpec, table_train: pd.DataFrame,
                 features: Features = None) -> list[Subset]:
    """Every subset of ``spec`` (fractions, then seeds) drawn from ``table_train``; the one
    source of labelled rows for k-NN, the probes and the end-to-end baseline.

    ``features``: the training features (rows in table order), an array or a function
    returning one, read only if the strategy asks for them.
    """
    return _draw(spec, table_train, features)[0]


def _draw(spec: SubsetSpec, table_train: pd.DataFrame,
          features: Features) -> tuple[list[Subset], dict[str, Any]]:
    """The subsets of ``spec`` and what a result records about them."""
    record = spec.record()
    if spec.file is not None:
        subset, record["subset_file"] = _read_subset_file(spec.file, table_train)
        return [subset._replace(seed=seed) for seed in spec.seeds], record
    _check_train_only(table_train)
    strategy = get_strategy(spec.strategy)
    table = table_train if strategy.reads_labels else label_free(table_train)
    lazy = _LazyFeatures(features)
    out = []
    for frac, f_arg, n_arg in spec.sizes(len(table_train)):
        budget = subset_size(len(table_train), f_arg, n_arg)
        for seed in spec.seeds:
            ctx = SubsetContext(table, budget, int(seed), f_arg, n_arg, spec.mode,
                                spec.stratify, lazy)
            sel = check_selection(strategy.select(ctx), len(table_train), strategy.name)
            out.append(Subset(frac, int(seed), sel.rows, sel.groups))
    return out, record


def _check_train_only(table_train: pd.DataFrame) -> None:
    if "split" in table_train.columns and (table_train["split"].astype(str) == "test").any():
        raise CredannoError("label subsets are drawn from training rows only; "
                            "pass the table of the training split")
    if len(table_train) == 0:
        raise CredannoError("the training split is empty; the store has no training rows")


def resolve_subsets(subsets: SubsetsLike, table_train: pd.DataFrame,
                    features: Features = None) -> tuple[list[Subset], dict[str, Any]]:
    """The labelled subsets of a sweep and what its result records about them.

    ``subsets``: a :class:`SubsetSpec` (drawn here), or explicit subsets, each a
    :class:`Subset` or an array of training-row positions (0-based rows of
    ``table_train``; a boolean mask of its length works too). An explicit array is
    recorded with fraction ``len(rows) / n_train`` and its position in the list as seed.
    """
    from credanno.eval.specs import SubsetSpec

    if subsets is None:
        subsets = SubsetSpec()
    if isinstance(subsets, SubsetSpec):
        return _draw(subsets, table_train, features)
    if isinstance(subsets, (Subset, np.ndarray)) or not isinstance(subsets, Sequence):
        raise CredannoError("subsets must be a SubsetSpec or a list of row arrays; wrap one "
                            "array in a list: subsets=[rows]")
    if not subsets:
        raise CredannoError("no subsets given; pass subsets=[rows, ...]")
    n = len(table_train)
    out = [_explicit(s, i, n) for i, s in enumerate(subsets)]
    return out, {"strategy": "explicit", "seeds": sorted({s.seed for s in out}), "mode": None,
                 "stratify": None, "n_subsets": len(out)}


def _explicit(subset: Subset | np.ndarray | Sequence[int], i: int, n_train: int) -> Subset:
    """One explicit subset, its rows checked (sorted, unique, within the training rows)."""
    if isinstance(subset, Subset):
        sel = check_selection(Selection(np.asarray(subset.rows), subset.groups), n_train,
                              f"explicit subset {i}")
        return subset._replace(rows=sel.rows, groups=sel.groups)
    rows = np.asarray(subset)
    if rows.dtype == bool:
        if rows.shape != (n_train,):
            raise CredannoError(f"explicit subset {i} is a mask of {rows.size} values for "
                                f"{n_train} training rows")
        rows = np.flatnonzero(rows)
    rows = check_selection(rows, n_train, f"explicit subset {i}").rows
    return Subset(len(rows) / n_train, i, rows, None)


def read_subset_file(path: str | os.PathLike, table_train: pd.DataFrame) -> Subset:
    """The labelled training rows a file names (fraction = their share, seed 0).

    The file is a CSV with an ``annotation_id`` column, or a ``nodule_id`` column (all of
    that nodule's training images), or one annotation id per line (``#`` comments and
    blank lines skipped). Ids that are not rows of ``table_train`` are an error naming how
    many and a few of them.
    """
    return _read_subset_file(path, table_train)[0]


def _read_subset_file(path: str | os.PathLike,
                      table_train: pd.DataFrame) -> tuple[Subset, dict[str, str]]:
    """The subset of a file and its record (absolute path, sha256 of the bytes read)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise CredannoError(f"cannot read --subset-file {p}: {e.strerror or e}") from None
    record = {"path": str(p.resolve()), "sha256": hashlib.sha256(raw).hexdigest()}
    column, ids = _parse_ids(raw, p)
    known = table_train[column].to_numpy()
    have = set(known.tolist())
    bad = [v for v in dict.fromkeys(ids) if v not in have]
    if bad:
        where = table_train.attrs.get("where")
        scope = f" selected by --where {where!r}" if where else ""
        raise CredannoError(f"{len(bad)} {column}s in {p} are not training images{scope}, "
                            f"e.g. {', '.join(map(str, bad[:5]))}; list training images only")
    rows = np.flatnonzero(np.isin(known, ids)).astype(np.int64)
    groups = table_train["nodule_id"].to_numpy()[rows] if column == "nodule_id" else None
    return Subset(len(rows) / len(table_train), 0, rows, groups), record


def _parse_ids(raw: bytes, path: Path) -> tuple[str, list[int]]:
    """``(column, ids)`` of a subset file: a CSV's ``annotation_id`` (or ``nodule_id``)
    column, or one annotation id per line."""
    text = raw.decode("utf-8-sig", errors="replace")
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise CredannoError(f"--subset-file {path} names no images; list annotation ids, "
                            "one per line, or a CSV with an annotation_id column")
    header = [c.strip().strip('"') for c in lines[0].split(",")]
    column = next((c for c in ("annotation_id", "nodule_id") if c in header), None)
    if column is not None:
        values = pd.read_csv(io.StringIO(text), comment="#", skipinitialspace=True)[column]
        values = [str(v).strip() for v in values.dropna()]
    elif len(header) == 1:
        column, values = "annotation_id", lines
    else:
        raise CredannoError(f"--subset-file {path} has no annotation_id or nodule_id column; "
                            "add one, or list one annotation id per line")
    return column, [_as_id(v, column, path) for v in values]


def _as_id(text: str, column: str, path: Path) -> int:
    """A whole-number id (``12`` or ``12.0``, as a CSV with gaps writes it)."""
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if value.is_integer():
            return int(value)
    raise CredannoError(f"--subset-file {path}: {text!r} is not an {column}; ids are whole "
                        "numbers")


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
