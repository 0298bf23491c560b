"""Which stores belong together: provenance comparison and the newest store."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from credanno.errors import CredannoError
from credanno.paths import STORES_DIR, newest
from credanno.stores.reader import Store, open_store

#: Provenance entries that decide whether two stores' features are comparable: the same
#: encoder weights, seen through the same transform, on the same patch file.
IDENTITY_KEYS: tuple[str, ...] = (
    "encoder.kind", "encoder.arch", "encoder.kwargs", "encoder.sha256", "encoder.which",
    "encoder.weights_sha256", "encoder.init_seed", "patch_file.sha256", "transform",
)


def _lookup(prov: Mapping[str, Any], dotted: str) -> Any:
    node: Any = prov
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) > 16 and " " not in text else text


def _provenance(s: Store | str | os.PathLike | Mapping[str, Any]) -> tuple[str, Mapping]:
    if isinstance(s, Store):
        return str(s.path), s.provenance
    if isinstance(s, Mapping):
        return "provenance", s
    with open_store(s) as store:
        return str(store.path), store.provenance


def check_compatible(a: Store | str | os.PathLike | Mapping[str, Any],
                     b: Store | str | os.PathLike | Mapping[str, Any]) -> None:
    """Raise :class:`CredannoError` naming every provenance difference between two stores.

    ``a`` and ``b`` are stores, paths or provenance dicts. Features from different encoders
    (architecture, weights, teacher vs student) or patch files live in different spaces,
    so e.g. a k-NN bank from one and queries from the other would be meaningless.
    """
    name_a, prov_a = _provenance(a)
    name_b, prov_b = _provenance(b)
    diffs = []
    for key in IDENTITY_KEYS:
        va, vb = _lookup(prov_a, key), _lookup(prov_b, key)
        if va != vb:
            diffs.append(f"{key} {_short(va)} vs {_short(vb)}")
    if diffs:
        raise CredannoError(
            f"stores {name_a} and {name_b} differ in {'; '.join(diffs)}; embed both with the "
            "same encoder and patch file")


def latest(root: str | os.PathLike = STORES_DIR) -> Path:
    """The most recently written store under ``root`` (error if there is none)."""
    found = newest("*.h5", Path(root))
    if found is None:
        raise CredannoError(f"no feature store under {root}/; create one with `credanno embed`")
    return found
