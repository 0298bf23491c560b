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
patient has images on both sides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import pandas as pd

from credanno.errors import CredannoError

TRAIN_FRACTION = 0.7

_SPLITS: dict[str, Callable[[pd.DataFrame], pd.Series]] = {}


def register_split(name: str):
    """Register a function mapping the table to the column that defines the split's units."""
    def wrap(fn: Callable[[pd.DataFrame], pd.Series]):
        _SPLITS[name] = fn
        return fn
    return wrap


@register_split("nodule")
def _nodule_units(table: pd.DataFrame) -> pd.Series:
    return table["nodule_id"].astype(str)


@register_split("patient")
def _patient_units(table: pd.DataFrame) -> pd.Series:
    return table["patient_id"].astype(str)


def split_names() -> list[str]:
    return list(_SPLITS)


def unit_draw(seed: int, unit: str) -> float:
    """The uniform draw in [0, 1) of one split unit (a nodule or patient id)."""
    key = int.from_bytes(hashlib.sha256(unit.encode()).digest()[:8], "little")
    return float(np.random.default_rng([int(seed), key]).random())


def assign_split(table: pd.DataFrame, mode: str = "nodule", seed: int = 42,
                 train_fraction: float = TRAIN_FRACTION) -> pd.DataFrame:
    """Add the ``split`` column and order rows train first, then test (stable otherwise)."""
    if mode not in _SPLITS:
        raise CredannoError(f"unknown split {mode!r}; choose one of: {', '.join(_SPLITS)}")
    units = _SPLITS[mode](table)
    draws = {u: unit_draw(seed, u) for u in pd.unique(units)}
    is_train = units.map(draws).to_numpy() < train_fraction
    out = table.copy()
    out["split"] = np.where(is_train, "train", "test")
    order = np.argsort(~is_train, kind="stable")
    return out.iloc[order].reset_index(drop=True)
