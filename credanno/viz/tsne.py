"""t-SNE maps of stored features (the paper's Fig. 3), cached so that recolouring is instant.

The paper maps the feature f of every test image to 2-D with t-SNE [van der Maaten & Hinton]
and colours the points by each ground-truth rating. We use openTSNE on L2-normalised
features (so Euclidean distance ranks neighbours like the cosine similarity k-NN uses).

Cache design: only the 2-D coordinates are cached (one :mod:`credanno.cache` entry per map,
kind ``tsne``), keyed by the store's content identity (its ``content_id``) and every
parameter that changes the map. The openTSNE embedding object is not pickled: it
holds the training features and an O(n k) affinity matrix, and it is only needed to place
*new* points with ``transform``. When that is asked for and the reference map is cached, we
rebuild the affinities of the training points (a nearest-neighbour search, seconds) around
the cached coordinates, which skips the expensive optimisation; the placed coordinates are
then cached too.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from credanno import checks
from credanno.cache import Cache, content_identity
from credanno.errors import CredannoError, CredannoWarning
from credanno.numerics import l2_normalise

SPLITS = ("train", "test", "all")
#: Bump when the way maps are computed changes, so that old cache entries are ignored.
CACHE_VERSION = 1


@dataclass
class TSNEMap:
    """2-D coordinates of one split of a store, with that split's table."""

    coords: np.ndarray
    table: pd.DataFrame
    split: str
    fit_split: str
    params: dict[str, Any]
    store: Path
    provenance: dict[str, Any] = field(default_factory=dict)
    #: True when the coordinates came from the cache (no optimisation ran).
    cached: bool = False

    def __len__(self) -> int:
        return len(self.coords)


def _split_arg(split: str) -> str | None:
    if split not in SPLITS:
        raise CredannoError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return None if split == "all" else split


def resolve_store(store: str | os.PathLike | None) -> Path:
    """The store to read: ``store`` if given (must exist), else the newest under ``stores/``."""
    from credanno import stores

    if store is None:
        return Path(stores.latest())
    path = Path(store)
    if not path.exists():
        raise CredannoError(f"store {path} not found; create one with `credanno embed` "
                            "or pass an existing --store")
    return path


def _load_cached(cache: Cache, key: dict[str, Any]) -> np.ndarray | None:
    entry = cache.get(key)  # a missing or damaged entry is recomputed, never trusted
    if entry is None or "coords" not in entry.arrays:
        return None
    return np.asarray(entry.arrays["coords"], dtype=np.float64)


def _save_cached(cache: Cache, key: dict[str, Any], coords: np.ndarray) -> None:
    # The cache only saves time: when it cannot be written, Cache.put warns and goes on.
    cache.put(key, {"coords": np.asarray(coords)})


def _normalise(x: np.ndarray) -> np.ndarray:
    return l2_normalise(x, dtype=np.float64, what="store features")


def _perplexity(perplexity: float, n: int) -> float:
    perplexity = checks.finite(perplexity, "--perplexity", low=0, example="30")
    if n < 4:
        raise CredannoError(f"t-SNE needs at least 4 points; the selected split has {n}")
    top = (n - 1) / 3.0
    if perplexity > top:
        warnings.warn(f"perplexity {perplexity:g} is too large for {n} points; using {top:.1f}",
                      CredannoWarning, stacklevel=3)
        return top
    return float(perplexity)


def _fit(x: np.ndarray, perplexity: float, seed: int, n_jobs: int):
    from openTSNE import TSNE

    return TSNE(perplexity=perplexity, random_state=seed, n_jobs=n_jobs,
                initialization="pca", metric="euclidean").fit(x)


def _rebuild(x: np.ndarray, coords: np.ndarray, perplexity: float, seed: int, n_jobs: int):
    """An openTSNE embedding around cached coordinates, able to ``transform`` new points."""
    from openTSNE import TSNEEmbedding
    from openTSNE.affinity import PerplexityBasedNN

    aff = PerplexityBasedNN(x, perplexity=perplexity, random_state=seed, n_jobs=n_jobs)
    return TSNEEmbedding(coords, aff, random_state=seed)


def tsne_map(store: str | os.PathLike | None = None, split: str = "test", kind: str = "cls",
             perplexity: float = 30.0, seed: int = 0, fit_split: str | None = None,
             cache: bool = True, cache_root: str | os.PathLike | None = None,
             n_jobs: int = 1) -> TSNEMap:
    """t-SNE coordinates of ``split`` of a store's ``kind`` features.

    ``fit_split=None`` fits the map on the points shown (the paper's Fig. 3: the test
    images). ``fit_split="train"`` fits on the training split and places the ``split``
    points into that map with openTSNE's ``transform``, so that test images land where the
    training images of their kind are.
    """
    from credanno import stores

    seed = checks.seed(seed)  # openTSNE takes a 32-bit unsigned seed
    checks.finite(perplexity, "--perplexity", low=0, example="30")  # before any work
    path = resolve_store(store)
    split_sel = _split_arg(split)
    fit_split = split if fit_split is None else fit_split
    fit_sel = _split_arg(fit_split)
    if fit_split != split and fit_split != "train":
        raise CredannoError(f"can only place points into a map of the training split; got "
                            f"fit_split={fit_split!r} (use 'train' or leave it unset)")
    tsne_cache = Cache("tsne", what="t-SNE map", root=cache_root, enabled=cache)

    with stores.open(path) as s:
        if kind not in s.feature_sets:
            raise CredannoError(f"store {path} has no feature set {kind!r}; it has "
                                f"{', '.join(s.feature_sets)} (use --kind)")
        table = s.table(split=split_sel).reset_index(drop=True)
        provenance = dict(s.provenance)
        n_fit = len(s.rows(fit_sel)) if fit_sel is not None else s.n
        perp = _perplexity(perplexity, min(n_fit, len(table)) if fit_split == split else n_fit)
        params = {"kind": kind, "perplexity": perp, "seed": seed, "method": "openTSNE",
                  "normalise": "l2", "version": CACHE_VERSION}
        # the identity of the file `s` has open (content_id), not of whatever is at path now
        ref_key = {"store": content_identity(s) if cache else None, "split": fit_split,
                   "fit_split": fit_split, **params}
        ref = _load_cached(tsne_cache, ref_key)
        was_cached = ref is not None

        if fit_split == split:
            if ref is None:
                ref = np.asarray(_fit(_normalise(s.features(split=split_sel, kind=kind)),
                                      perp, seed, n_jobs))
                _save_cached(tsne_cache, ref_key, ref)
            coords = ref
        else:
            key = {**ref_key, "split": split}
            coords = _load_cached(tsne_cache, key)
            was_cached = coords is not None
            if coords is None:
                x_fit = _normalise(s.features(split=fit_sel, kind=kind))
                emb = (_fit(x_fit, perp, seed, n_jobs) if ref is None
                       else _rebuild(x_fit, ref, perp, seed, n_jobs))
                if ref is None:
                    _save_cached(tsne_cache, ref_key, np.asarray(emb))
                coords = np.asarray(emb.transform(_normalise(s.features(split=split_sel,
                                                                        kind=kind))))
                _save_cached(tsne_cache, key, coords)

    return TSNEMap(coords=np.asarray(coords, dtype=np.float64), table=table, split=split,
                   fit_split=fit_split, params=params, store=path, provenance=provenance,
                   cached=was_cached)
