"""Label-subset strategies: which training images keep their labels, as a registry.

A strategy is one small function ``select(ctx) -> rows`` (or a :class:`Selection` of rows
and the groups they were drawn by), registered with :func:`register_strategy`. It receives
a :class:`SubsetContext`: the training table, the training features (read on first use),
the budget (how many images to label) and the seed. A strategy that does not declare
``reads_labels=True`` is handed the table *without* its label columns (labels, median
ratings, raw ratings), so a label-free rule cannot peek, by construction.

Built in: ``random`` (images one by one, the paper's), ``nodule`` (whole nodules),
``stratified`` (the budget shared between the classes of a label; reads labels) and the
label-free selection rules of ``credanno select``: ``kmeans`` (cRedAnno+'s sparse
seeding), ``typiclust``, ``probcover`` and ``coreset``. A strategy may *complement* images
already labelled (``ctx.labelled``): the budget then counts new picks only.
:func:`credanno.eval.subsets.draw_subsets` and :func:`credanno.eval.selection.select` call
them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd

from credanno.errors import CredannoError
from credanno.labels import LABEL_NAMES
from credanno.table import RATING_COLUMNS, RAW_COLUMNS

#: the table columns that carry labels; hidden from strategies that do not read labels
LABEL_COLUMNS: tuple[str, ...] = (*LABEL_NAMES, *RATING_COLUMNS, *RAW_COLUMNS)
#: draw units: images one by one, whole nodules (the last may overshoot the budget), or
#: images with at most one per nodule
MODES: tuple[str, ...] = ("annotation", "nodule", "one-per-nodule")

Features = np.ndarray | Callable[[], np.ndarray] | None


class Selection(NamedTuple):
    """What a strategy picked: training-row positions (in the order picked) and, where it
    drew whole groups (nodules), each row's group (so a validation part can be carved from
    whole groups); ``scores`` is the strategy's own score of each pick, where it has one."""

    rows: np.ndarray
    groups: np.ndarray | None = None
    scores: np.ndarray | None = None


class _LazyFeatures:
    """Training features read on first use and kept, shared by every draw of one sweep."""

    def __init__(self, features: Features) -> None:
        self._source, self._value = features, None

    def get(self) -> np.ndarray:
        if self._value is None:
            src = self._source
            if src is None:
                raise CredannoError("this subset strategy needs the training features; "
                                    "pass features to draw_subsets")
            self._value = np.asarray(src() if callable(src) else src)
        return self._value


@dataclass(frozen=True)
class SubsetContext:
    """What a strategy sees for one draw.

    ``table``: the training rows (0-based positions are what a strategy returns), without
    label columns unless the strategy reads labels; ``budget``: images to label;
    ``seed``: the draw's seed; ``frac``/``n``: the label fraction or count asked for (one
    is None); ``mode``: ``"annotation"`` or ``"nodule"``; ``stratify``: the label whose
    classes share the budget (stratified only). ``features`` reads the training features
    (rows in table order) on first use. ``labelled``: training rows already labelled, which
    a strategy complements (never picks again; the budget counts new picks only);
    ``device``: where FAISS runs (None: a GPU when faiss has one).
    """

    table: pd.DataFrame
    budget: int
    seed: int
    frac: float | None = None
    n: int | None = None
    mode: str = "annotation"
    stratify: str | None = None
    _features: _LazyFeatures = field(default_factory=lambda: _LazyFeatures(None), repr=False)
    labelled: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    device: str | None = None

    @property
    def features(self) -> np.ndarray:
        """(n_train, D) training features, rows in table order (read on first use)."""
        return self._features.get()

    @property
    def rng(self) -> np.random.Generator:
        """A fresh generator of this draw's seed."""
        return np.random.default_rng(int(self.seed))


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its function, whether it reads labels, the draw units
    (``modes``) it supports."""

    name: str
    select: Callable[[SubsetContext], np.ndarray | Selection]
    reads_labels: bool = False
    modes: tuple[str, ...] = ("annotation",)


#: strategy name -> :class:`Strategy`, in registration order
STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, *, reads_labels: bool = False,
                      modes: tuple[str, ...] = ("annotation",)):
    """Register ``select(ctx)`` under ``name``; ``reads_labels=True`` hands it the label
    columns, ``modes`` the draw units it supports (``annotation``, ``nodule``)."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown modes {bad}; use {MODES}")

    def deco(fn: Callable[[SubsetContext], np.ndarray | Selection]):
        STRATEGIES[name] = Strategy(name, fn, reads_labels, tuple(modes))
        return fn

    return deco


def strategy_names() -> list[str]:
    """Registered strategy names (the built-in ones first)."""
    return list(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The strategy ``name``; an unknown name lists the registered ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise CredannoError(f"unknown subset strategy {name!r}; choose one of "
                            f"{', '.join(STRATEGIES)}") from None


def label_free(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` without its label columns (what a label-free strategy is handed)."""
    return table.drop(columns=[c for c in LABEL_COLUMNS if c in table.columns])


def pick(name: str, table: pd.DataFrame, features: Features, budget: int, seed: int, *,
         labelled: np.ndarray | None = None, device: str | None = None) -> Selection:
    """``budget`` training images (one by one) picked by strategy ``name`` from ``table``
    (the training rows; a label-free strategy gets it without label columns) and
    ``features`` (an array or a function returning one, read if the strategy asks),
    complementing the rows ``labelled``; the answer checked and sorted
    (:func:`check_selection`)."""
    strat = get_strategy(name)
    ctx = SubsetContext(table if strat.reads_labels else label_free(table), budget, seed,
                        None, budget, "annotation", None, _LazyFeatures(features),
                        labelled=np.zeros(0, np.int64) if labelled is None else labelled,
                        device=device)
    return check_selection(strat.select(ctx), len(table), name)


def check_selection(picked: np.ndarray | Selection, n_rows: int, name: str) -> Selection:
    """A strategy's answer as sorted unique in-range rows (groups kept aligned)."""
    sel = picked if isinstance(picked, Selection) else Selection(np.asarray(picked))
    rows = np.asarray(sel.rows)
    if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        raise CredannoError(f"subset strategy {name!r} must return 1-d integer row positions")
    if rows.size == 0:
        raise CredannoError(f"subset strategy {name!r} selected no training rows")
    if rows.min() < 0 or rows.max() >= n_rows:
        raise CredannoError(f"subset strategy {name!r} returned rows outside 0..{n_rows - 1}")
    uniq, first = np.unique(rows, return_index=True)
    groups = None if sel.groups is None else np.asarray(sel.groups)[first]
    scores = None if sel.scores is None else np.asarray(sel.scores)[first]
    return Selection(uniq.astype(np.int64), groups, scores)


# the built-in strategies register themselves on import, in this order (the CLI lists them)
import credanno.eval.strategies.random  # noqa: E402, F401, I001
import credanno.eval.strategies.nodule  # noqa: E402, F401
import credanno.eval.strategies.stratified  # noqa: E402, F401
import credanno.eval.strategies.kmeans  # noqa: E402, F401
import credanno.eval.strategies.typiclust  # noqa: E402, F401
import credanno.eval.strategies.probcover  # noqa: E402, F401
import credanno.eval.strategies.coreset  # noqa: E402, F401
