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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    the ``with`` block). Build one from arrays with :meth:`from_arrays`.
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
        """What a result records about its data: feature set, stores and provenance."""
        if not self.paths:
            return {}
        return {"kind": self.kind, "stores": self.paths, "provenance": self.provenance}

    def train_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Training features as ``(offset, block)`` of ``block_rows`` rows, read one block at a
        time from the store (training rows are a contiguous range in table order)."""
        if self.train_x is not None:
            for start in range(0, len(self.train_x), block_rows):
                yield start, self.train_x[start:start + block_rows]
            return
        store = self._train_store
        for start, block in store.feature_blocks("train", self.kind, block_rows):
            yield start, require_finite(block, f"{store.path} training features")


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


def open_eval_data(store: StoreLike = None, kind: str | None = "cls",
                   labels: Sequence[str] | str | None = None, *,
                   test_store: StoreLike = None, load_train: bool = True,
                   views: bool = False) -> EvalData:
    """Read what an evaluation needs from one store (or a train and a test store).

    Use it as ``with open_eval_data(...) as data:``: with ``load_train=False`` the training
    store stays open for :meth:`EvalData.train_blocks` and is closed at the end of the block.
    """
    from credanno import stores

    train_s, own_train = _open(store)
    test_s, own_test = (train_s, False) if test_store is None else _open(test_store)
    try:
        if test_s is not train_s:
            stores.check_compatible(train_s, test_s)
        if kind is None:  # the probes' default: the paper's last-4-blocks CLS, if stored
            kind = "last4" if "last4" in train_s.feature_sets else train_s.default_kind
            if kind != "last4":
                warnings.warn(f"{train_s.path} has no 'last4' features; the probes use "
                              f"{kind!r} instead (re-embed to store last4)", CredannoWarning,
                              stacklevel=3)
        train_table = train_s.table("train").reset_index(drop=True)
        test_table = test_s.table("test").reset_index(drop=True)
        if len(train_table) == 0:
            raise CredannoError(f"{train_s.path} has no training rows; embed a patch file "
                                "with a train split")
        if len(test_table) == 0:
            raise CredannoError(f"{test_s.path} has no test rows; embed a patch file with "
                                "a test split")
        available = [n for n in train_s.label_names if n in test_s.label_names]
        if labels is None:
            # all labels that have at least one training and one test label
            available = [n for n in available
                         if (train_table[n] >= 0).any() and (test_table[n] >= 0).any()]
        names = resolve_labels(labels, available, str(train_s.path))
        for n in names:
            if not (train_table[n] >= 0).any():
                raise CredannoError(f"{train_s.path} has no training labels for {n!r} "
                                    "(all missing); drop it from --labels")
            if not (test_table[n] >= 0).any():
                raise CredannoError(f"{test_s.path} has no test labels for {n!r} "
                                    "(all missing); drop it from --labels")
        test_x = require_finite(test_s.features("test", kind), f"{test_s.path} test features")
        train_x = require_finite(train_s.features("train", kind),
                                 f"{train_s.path} training features") if load_train else None
        train_views = train_s.views("train", kind) if views else None
        if train_views is not None:
            train_views = require_finite(train_views.reshape(-1, train_views.shape[-1]),
                                         f"{train_s.path} view features"
                                         ).reshape(train_views.shape)
        dim_train = (train_x.shape[1] if train_x is not None
                     else train_s._dataset("features", kind).shape[1])
        if test_x.shape[1] != dim_train:
            raise CredannoError(f"train features are {dim_train}-d but test features "
                                f"{test_x.shape[1]}-d; use stores of the same encoder")
        return EvalData(train_table=train_table, test_table=test_table, test_x=test_x,
                        train_x=train_x, labels=names, provenance=dict(train_s.provenance),
                        paths={"train": str(train_s.path), "test": str(test_s.path)},
                        train_views=train_views, _train_store=train_s, kind=kind,
                        _own=own_train and not load_train)
    except BaseException:
        if own_train and not load_train:
            train_s.close()
        raise
    finally:
        if own_test and test_s is not train_s:
            test_s.close()
        if own_train and load_train:
            train_s.close()
