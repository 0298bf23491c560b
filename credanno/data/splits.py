"""Train/test splits of the selected annotations: nodule-level (the paper's) or patient-level.

Paper, Sec. 3: "our training (70%) / testing (30%) split is on nodule level to ensure no
image of the same nodule exists in both training and testing sets". The public code
draws ``np.random.choice(["train", "val"], p=[0.7, 0.3])`` once per nodule from numpy's
global generator seeded with 42, visiting patients in the iteration order of a Python
``set`` of patient-id strings. That order follows Python's per-process string-hash
randomisation, so seed 42 alone does not determine the public split (see docs/data.md).

We keep the rule (an independent draw per nodule with probability 0.7 of "train") and
make it order-free: each unit's draw comes from its own generator
``np.random.default_rng([seed, key])``, where ``key`` is derived from the unit's id.
A nodule's side therefore depends only on the seed and its id, not on which other
patients happen to be selected. ``patient`` draws once per patient instead, so that no
patient has images on both sides. ``public`` reproduces the public label files' split
exactly (:mod:`credanno.data.public_split`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import pandas as pd

from credanno.errors import CredannoError

TRAIN_FRACTION = 0.7

#: name -> function(table, seed, train_fraction) -> boolean "is train" per row
_SPLITS: dict[str, Callable[[pd.DataFrame, int, float], np.ndarray]] = {}


def register_split(name: str):
    """Register a split rule: ``fn(table, seed, train_fraction) -> bool array (train)``."""
    def wrap(fn: Callable[[pd.DataFrame, int, float], np.ndarray]):
        _SPLITS[name] = fn
        return fn
    return wrap


def unit_draw(seed: int, unit: str) -> float:
    """The uniform draw in [0, 1) of one split unit (a nodule or patient id)."""
    key = int.from_bytes(hashlib.sha256(unit.encode()).digest()[:8], "little")
    return float(np.random.default_rng([int(seed), key]).random())


def _draw_per_unit(units: pd.Series, seed: int, train_fraction: float) -> np.ndarray:
    draws = {u: unit_draw(seed, u) for u in pd.unique(units)}
    return units.map(draws).to_numpy() < train_fraction


@register_split("nodule")
def _nodule_split(table: pd.DataFrame, seed: int, train_fraction: float) -> np.ndarray:
    return _draw_per_unit(table["nodule_id"].astype(str), seed, train_fraction)


@register_split("patient")
def _patient_split(table: pd.DataFrame, seed: int, train_fraction: float) -> np.ndarray:
    return _draw_per_unit(table["patient_id"].astype(str), seed, train_fraction)


@register_split("public")
def _public_split(table: pd.DataFrame, seed: int, train_fraction: float) -> np.ndarray:
    """The public label files' split (seed and fraction do not apply): nodules listed in
    :data:`credanno.data.public_split.PUBLIC_TEST_NODULES` are test, all others train."""
    from credanno.data.public_split import PUBLIC_TEST_NODULES

    if "nodule_index" not in table.columns:
        raise CredannoError("the public split needs the LIDC selection's nodule_index "
                            "column; use --source phantom or lidc")
    keys = zip(table["scan_id"].astype(int), table["nodule_index"].astype(int), strict=True)
    return np.array([k not in PUBLIC_TEST_NODULES for k in keys], dtype=bool)


def split_names() -> list[str]:
    return list(_SPLITS)


def assign_split(table: pd.DataFrame, mode: str = "nodule", seed: int = 42,
                 train_fraction: float = TRAIN_FRACTION) -> pd.DataFrame:
    """Add the ``split`` column and order rows train first, then test (stable otherwise)."""
    if mode not in _SPLITS:
        raise CredannoError(f"unknown split {mode!r}; choose one of: {', '.join(_SPLITS)}")
    is_train = np.asarray(_SPLITS[mode](table, int(seed), train_fraction), dtype=bool)
    out = table.copy()
    out["split"] = np.where(is_train, "train", "test")
    order = np.argsort(~is_train, kind="stable")
    return out.iloc[order].reset_index(drop=True)
