"""The thin layer between feature stores and the array-level evaluation cores.

Train rows are the training split of the (train) store, test rows the test split of the
(test) store; when two stores are given their provenance must match
(:func:`credanno.stores.check_compatible`), since features of different encoders or
patch files live in different spaces.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from credanno.errors import CredannoError, CredannoWarning
from credanno.labels import LABEL_NAMES, label_spec
from credanno.numerics import require_finite

StoreLike = Any  # credanno.stores.Store | str | os.PathLike | None


@dataclass
class EvalData:
    """Features and tables of both splits; a context manager owning the store it opened.

    ``train_x`` is None when the training features are streamed from the store instead
    (:meth:`train_blocks`); the store then stays open until :meth:`close` (or the end of
    the ``with`` block). Build one from arrays with :meth:`from_arrays`. ``where``: the
    sub-population (``--where``) the rows were restricted to, with its row counts; training
    rows are then numbered within it.
    """

    train_table: pd.DataFrame
    test_table: pd.DataFrame
    test_x: np.ndarray
    train_x: np.ndarray | None
    labels: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    train_views: np.ndarray | None = None
    _train_store: Any = None
    kind: str | None = "cls"
    _own: bool = False
    where: dict[str, Any] | None = None  # the --where expression and its row counts
    _train_rows: np.ndarray | None = None  # rows of the store's training split kept by where

    @classmethod
    def from_arrays(cls, train_x: np.ndarray, train_table: pd.DataFrame, test_x: np.ndarray,
                    test_table: pd.DataFrame, labels: Sequence[str] | None = None, *,
                    train_views: np.ndarray | None = None) -> EvalData:
        """Evaluation data from in-memory features (rows in the tables' order); ``labels``
        None = every label column the training table has."""
        if labels is None:
            labels = [n for n in LABEL_NAMES if n in train_table.columns]
        return cls(train_table=train_table, test_table=test_table, test_x=test_x,
                   train_x=train_x, labels=list(labels), train_views=train_views, kind=None)

    def __enter__(self) -> EvalData:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the training store if it was opened here and kept open for block reads."""
        if self._own and self._train_store is not None:
            self._train_store.close()
        self._train_store = None

    def record(self) -> dict[str, Any]:
        """What a result records about its data: feature set, stores and provenance, and
        the ``--where`` expression with its row counts."""
        out: dict[str, Any] = {}
        if self.paths:
            out = {"kind": self.kind, "stores": self.paths, "provenance": self.provenance}
        if self.where is not None:
            out["where"] = dict(self.where)
        return out

    def train_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Training features as ``(offset, block)`` of at most ``block_rows`` rows, read one
        block at a time from the store (training rows are a contiguous range in table
        order); with ``where``, each block keeps its selected rows and offsets count them."""
        if self.train_x is not None:
            for start in range(0, len(self.train_x), block_rows):
                yield start, self.train_x[start:start + block_rows]
            return
        store, rows = self._train_store, self._train_rows
        for start, block in store.feature_blocks("train", self.kind, block_rows):
            block = require_finite(block, f"{store.path} training features")
            if rows is None:
                yield start, block
                continue
            lo, hi = np.searchsorted(rows, [start, start + len(block)])
            if hi > lo:
                yield int(lo), block[rows[lo:hi] - start]

    def train_features(self) -> np.ndarray:
        """All training features (rows in table order), read from the store when they are
        streamed; for subset strategies that select by features."""
        if self.train_x is not None:
            return self.train_x
        store = self._train_store
        if store is None:
            raise CredannoError("no training features given (train_x or a store)")
        x = store.features("train", self.kind)
        if self._train_rows is not None:
            x = x[self._train_rows]
        return require_finite(x, f"{store.path} training features")

    def subpopulation(self, where: str | None) -> EvalData:
        """These in-memory data restricted to the rows ``where`` selects (a pandas query
        over the per-image table), train and test alike; None: unchanged."""
        if where is None:
            return self
        if self.train_x is None:
            raise CredannoError("subpopulation needs in-memory training features; pass "
                                "where to open_eval_data instead")
        sel = restrict(self.train_table, self.test_table, where)
        views = None if self.train_views is None else self.train_views[:, sel.train_rows]
        for n in self.labels:
            _check_has_labels(sel.train_table, sel.test_table, n, "the data", "the data")
        return replace(self, train_table=sel.train_table, test_table=sel.test_table,
                       train_x=self.train_x[sel.train_rows], test_x=self.test_x[sel.test_rows],
                       train_views=views, where=sel.record, _train_rows=None)


def resolve_labels(labels: Sequence[str] | str | None, available: Sequence[str],
                   where: str) -> list[str]:
    """Requested label names (validated, in the paper's order); None = all the store has."""
    if labels is None:
        return [n for n in LABEL_NAMES if n in available]
    if isinstance(labels, str):
        labels = [s.strip() for s in labels.split(",") if s.strip()]
    names = [label_spec(n).name for n in labels]  # unknown name -> lists valid ones
    for n in names:
        if n not in available:
            raise CredannoError(f"{where} has no {n!r} labels (it has: "
                                f"{', '.join(available) or 'none'}); drop it from --labels")
    if not names:
        raise CredannoError(f"no labels requested; choose from {', '.join(LABEL_NAMES)}")
    return sorted(set(names), key=LABEL_NAMES.index)


def _open(store: StoreLike):
    from credanno import stores

    if store is None:
        return stores.open(stores.latest()), True
    if isinstance(store, (str, os.PathLike, Path)):
        return stores.open(store), True
    return store, False


class Restricted(NamedTuple):
    """Both splits' tables restricted by a ``--where`` expression: the kept rows' positions
    in the full tables, the restricted tables, and what a result records."""

    train_rows: np.ndarray
    test_rows: np.ndarray
    train_table: pd.DataFrame
    test_table: pd.DataFrame
    record: dict[str, Any]


def _column_names(table: pd.DataFrame) -> str:
    """The table's columns, the per-label rating columns folded into their pattern."""
    cols = [str(c) for c in table.columns]
    short = [c for c in cols if not c.startswith(("rating_", "raw_"))]
    extra = [p + "<label>" for p in ("rating_", "raw_") if any(c.startswith(p) for c in cols)]
    return ", ".join(short + extra)


def where_rows(table: pd.DataFrame, where: str) -> np.ndarray:
    """Positions of the rows of ``table`` that ``where`` selects: a pandas query over the
    per-image table (``"diameter >= 10"``, ``"patient_id != 'LIDC-IDRI-0078'"``)."""
    try:
        mask = table.eval(where)
    except Exception as e:  # pandas raises NameError, SyntaxError, KeyError, ValueError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = (f"; columns: {_column_names(table)}" if isinstance(e, NameError)
                else "; e.g. --where \"diameter >= 10\"")
        raise CredannoError(f"--where {where!r} is not a query over the image table "
                            f"({reason}){hint}") from None
    if not isinstance(mask, pd.Series) or mask.dtype != bool or len(mask) != len(table):
        raise CredannoError(f"--where {where!r} does not give true or false per image; write "
                            "a condition, e.g. --where \"diameter >= 10\"")
    return np.flatnonzero(mask.to_numpy()).astype(np.int64)


def restrict(train_table: pd.DataFrame, test_table: pd.DataFrame, where: str) -> Restricted:
    """Both splits restricted to the rows ``where`` selects; selecting no training or no
    test image is an error naming the expression."""
    where = str(where)
    train_rows, test_rows = where_rows(train_table, where), where_rows(test_table, where)
    for rows, table, split in ((train_rows, train_table, "training"),
                               (test_rows, test_table, "test")):
        if len(rows) == 0:
            raise CredannoError(f"--where {where!r} selects none of the {len(table)} {split} "
                                "images; loosen it")
    record = {"expr": where, "n_train": len(train_rows), "n_test": len(test_rows),
              "n_train_total": len(train_table), "n_test_total": len(test_table)}
    out = []
    for rows, table in ((train_rows, train_table), (test_rows, test_table)):
        t = table.iloc[rows].reset_index(drop=True)
        t.attrs["where"] = where  # named by errors about rows outside it (subset files)
        out.append(t)
    return Restricted(train_rows, test_rows, out[0], out[1], record)


def _check_has_labels(train_table: pd.DataFrame, test_table: pd.DataFrame, name: str,
                      train_where: str, test_where: str) -> None:
    """Label ``name`` must have at least one training and one test label."""
    if not (train_table[name] >= 0).any():
        raise CredannoError(f"{train_where} has no training labels for {name!r} "
                            "(all missing); drop it from --labels")
    if not (test_table[name] >= 0).any():
        raise CredannoError(f"{test_where} has no test labels for {name!r} "
                            "(all missing); drop it from --labels")


def _resolve_kind(train_s, kind: str | None) -> str:
    if kind is None:  # the probes' default: the paper's last-4-blocks CLS, if stored
        kind = "last4" if "last4" in train_s.feature_sets else train_s.default_kind
        if kind != "last4":
            warnings.warn(f"{train_s.path} has no 'last4' features; the probes use "
                          f"{kind!r} instead (re-embed to store last4)", CredannoWarning,
                          stacklevel=4)
    return kind


def _tables(train_s, test_s, where: str | None) -> tuple[pd.DataFrame, pd.DataFrame,
                                                          Restricted | None]:
    """Both splits' tables (restricted by ``where``), each with at least one row."""
    train_table = train_s.table("train").reset_index(drop=True)
    test_table = test_s.table("test").reset_index(drop=True)
    if len(train_table) == 0:
        raise CredannoError(f"{train_s.path} has no training rows; embed a patch file "
                            "with a train split")
    if len(test_table) == 0:
        raise CredannoError(f"{test_s.path} has no test rows; embed a patch file with "
                            "a test split")
    if where is None:
        return train_table, test_table, None
    sel = restrict(train_table, test_table, where)
    return sel.train_table, sel.test_table, sel


def _label_names(train_s, test_s, train_table: pd.DataFrame, test_table: pd.DataFrame,
                 labels: Sequence[str] | str | None) -> list[str]:
    available = [n for n in train_s.label_names if n in test_s.label_names]
    if labels is None:
        # all labels that have at least one training and one test label
        available = [n for n in available
                     if (train_table[n] >= 0).any() and (test_table[n] >= 0).any()]
    names = resolve_labels(labels, available, str(train_s.path))
    for n in names:
        _check_has_labels(train_table, test_table, n, str(train_s.path), str(test_s.path))
    return names


def _read_features(train_s, test_s, kind: str, sel: Restricted | None, load_train: bool,
                   views: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Test features, training features (None when streamed) and training views (None
    unless asked for and stored), restricted to ``sel``'s rows."""
    test_x = test_s.features("test", kind)
    train_x = train_s.features("train", kind) if load_train else None
    train_views = train_s.views("train", kind) if views else None
    if sel is not None:
        test_x = test_x[sel.test_rows]
        train_x = None if train_x is None else train_x[sel.train_rows]
        train_views = None if train_views is None else train_views[:, sel.train_rows]
    test_x = require_finite(test_x, f"{test_s.path} test features")
    if train_x is not None:
        train_x = require_finite(train_x, f"{train_s.path} training features")
    if train_views is not None:
        train_views = require_finite(train_views.reshape(-1, train_views.shape[-1]),
                                     f"{train_s.path} view features"
                                     ).reshape(train_views.shape)
    dim_train = (train_x.shape[1] if train_x is not None
                 else train_s._dataset("features", kind).shape[1])
    if test_x.shape[1] != dim_train:
        raise CredannoError(f"train features are {dim_train}-d but test features "
                            f"{test_x.shape[1]}-d; use stores of the same encoder")
    return test_x, train_x, train_views


def open_eval_data(store: StoreLike = None, kind: str | None = "cls",
                   labels: Sequence[str] | str | None = None, *,
                   test_store: StoreLike = None, load_train: bool = True,
                   views: bool = False, where: str | None = None) -> EvalData:
    """Read what an evaluation needs from one store (or a train and a test store).

    Use it as ``with open_eval_data(...) as data:``: with ``load_train=False`` the training
    store stays open for :meth:`EvalData.train_blocks` and is closed at the end of the block.
    ``where``: a pandas query over the per-image table (``"diameter >= 10"``) restricting
    both the training rows (the bank) and the test rows.
    """
    from credanno import stores

    train_s, own_train = _open(store)
    test_s, own_test = (train_s, False) if test_store is None else _open(test_store)
    try:
        if test_s is not train_s:
            stores.check_compatible(train_s, test_s)
        kind = _resolve_kind(train_s, kind)
        train_table, test_table, sel = _tables(train_s, test_s, where)
        names = _label_names(train_s, test_s, train_table, test_table, labels)
        test_x, train_x, train_views = _read_features(train_s, test_s, kind, sel, load_train,
                                                      views)
        return EvalData(train_table=train_table, test_table=test_table, test_x=test_x,
                        train_x=train_x, labels=names, provenance=dict(train_s.provenance),
                        paths={"train": str(train_s.path), "test": str(test_s.path)},
                        train_views=train_views, _train_store=train_s, kind=kind,
                        _own=own_train and not load_train,
                        where=None if sel is None else sel.record,
                        _train_rows=None if sel is None else sel.train_rows)
    except BaseException:
        if own_train and not load_train:
            train_s.close()
        raise
    finally:
        if own_test and test_s is not train_s:
            test_s.close()
        if own_train and load_train:
            train_s.close()
