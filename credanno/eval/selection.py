"""Choosing which training images to label (``credanno select``).

:func:`select` runs one label-free strategy of :mod:`credanno.eval.strategies` over a
feature store's training split and returns the images to annotate, ranked (the order the
strategy picked them), with the strategy's own score, and a record of the run (parameters,
store provenance and content identity) for the JSON sidecar. cRedAnno+ (Lu et al., ISBI
2023) picks with ``kmeans``; ``typiclust``, ``probcover`` and ``coreset`` are the other
cold-start rules, ``random`` the paper's. Labels are never read: the strategy gets the
table without label columns, and a strategy that declares it reads labels is refused
(the images to annotate have none yet).

A labelled set (``labelled``: a file of ids, or training-row positions) is complemented:
its images are never picked and the budget counts new picks only.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from credanno.errors import CredannoError

#: ``--per`` -> the strategies' draw unit
PER: dict[str, str] = {"image": "annotation", "nodule": "one-per-nodule",
                       "whole-nodule": "nodule"}

#: what each built-in strategy's score means (the sidecar records it)
SCORES: dict[str, str] = {
    "random": "none (NaN): random order",
    "nodule": "none (NaN): random order of nodules",
    "kmeans": "cosine similarity of the image to its k-means centre",
    "typiclust": "typicality: 1 / mean squared distance to the 20 nearest images of its cluster",
    "probcover": "coverage gain: images newly inside the pick's delta-ball",
    "coreset": "cosine distance to the nearest image labelled before it (k-center greedy)",
}

#: the columns of the picks table, in order
COLUMNS: tuple[str, ...] = ("annotation_id", "nodule_id", "patient_id", "rank", "score")


@dataclass(frozen=True)
class Picks:
    """The images to label: ``table`` (``annotation_id, nodule_id, patient_id, rank,
    score``, best first), ``rows`` (their training-row positions) and ``params`` (what ran:
    strategy, budget, seed, draw unit, labelled set, store provenance and identity)."""

    table: pd.DataFrame
    rows: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)


def select(store: Any = None, strategy: str = "kmeans", budget: int | None = None, *,
           frac: float | None = None, seed: int = 0, kind: str = "cls",
           labelled: str | os.PathLike | np.ndarray | None = None, per: str = "image",
           device: str | None = None) -> Picks:
    """The ``budget`` (or ``frac`` of the training split) training images ``strategy``
    would label next, ranked.

    ``store``: a path, an open store, or None for the newest under ``stores/``;
    ``labelled``: images already labelled (a file as ``--subset-file`` reads it, or
    training-row positions), complemented; ``per``: ``image``, ``nodule`` (at most one
    image per nodule) or ``whole-nodule`` (whole nodules counted against the budget, the
    last may overshoot it); ``device``: where FAISS runs (None: a GPU when faiss has one).
    """
    from credanno.checks import seed as check_seed
    from credanno.eval.data import _open
    from credanno.runtime import check_device

    seed, device = check_seed(seed), check_device(device)
    strat, mode = _strategy(strategy, per)
    started = time.perf_counter()
    s, owned = _open(store)
    try:
        table = s.table("train").reset_index(drop=True)
        x = _features(s, kind)
        known, record = _labelled(labelled, s)
        n_budget = _budget(budget, frac, table, known, mode)
        rows, scores, groups = _run(strat, table, x, n_budget, seed, frac, known, mode, device)
        params = _params(s, strat.name, per, n_budget, frac, seed, kind, record, device,
                         len(table))
    finally:
        if owned:
            s.close()
    out = table.loc[rows, list(COLUMNS[:3])].reset_index(drop=True)
    out["rank"] = np.arange(1, len(rows) + 1)
    out["score"] = scores
    params.update(n_picked=len(rows), seconds=round(time.perf_counter() - started, 3))
    if groups is not None:
        params["n_nodules"] = len(np.unique(groups))
    return Picks(out, rows, params)


def _strategy(name: str, per: str):
    """The registered strategy and its draw unit; label-reading strategies refused."""
    from credanno.eval.strategies import STRATEGIES, get_strategy

    if per not in PER:
        raise CredannoError(f"unknown --per {per!r}; choose one of {', '.join(PER)}")
    mode = PER[per]
    if name == "random" and mode == "nodule":
        name = "nodule"  # as `--subset nodule` folds random into whole nodules
    strat = get_strategy(name)
    if strat.reads_labels:
        free = [n for n, s in STRATEGIES.items() if not s.reads_labels]
        raise CredannoError(f"strategy {name!r} reads labels, and the images to label have "
                            f"none yet; choose a label-free one: {', '.join(free)}")
    if mode not in strat.modes:
        units = {v: k for k, v in PER.items()}
        allowed = ", ".join(units[m] for m in strat.modes)
        raise CredannoError(f"strategy {name!r} does not draw --per {per}; use --per "
                            f"{allowed}")
    return strat, mode


def _features(s: Any, kind: str) -> np.ndarray:
    """The training features of ``kind``, refused by name when the store lacks the set."""
    if kind not in s.feature_sets:
        raise CredannoError(f"store {s.path} has no feature set {kind!r} (it has "
                            f"{', '.join(s.feature_sets)}); pass --kind "
                            f"{next(iter(s.feature_sets))}")
    return s.features("train", kind)


def _labelled(labelled: Any, s: Any) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Training-row positions of the images already labelled, and their record."""
    n_train = len(s.rows("train"))
    if labelled is None:
        return np.zeros(0, np.int64), None
    if not isinstance(labelled, (str, os.PathLike)):
        rows = np.unique(np.asarray(labelled, dtype=np.int64))
        if rows.size and (rows.min() < 0 or rows.max() >= n_train):
            raise CredannoError(f"labelled rows must lie in 0..{n_train - 1} (training rows)")
        return rows, {"rows": int(rows.size)}
    return _labelled_file(Path(labelled), s)


def _labelled_file(path: Path, s: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The training rows a ``--labelled`` file names; test or unknown ids refused."""
    from credanno.eval.subsets import _parse_ids

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CredannoError(f"cannot read --labelled {path}: {e.strerror or e}") from None
    column, ids = _parse_ids(raw, path)
    full = s.table(None)
    split = dict(zip(full[column].tolist(), full["split"].astype(str).tolist(), strict=False))
    test = [v for v in dict.fromkeys(ids) if split.get(v) == "test"]
    if test:
        raise CredannoError(f"--labelled {path} names {len(test)} test images ({column} "
                            f"{', '.join(map(str, test[:5]))}); the test split is never "
                            "labelled for training, list training images only")
    unknown = [v for v in dict.fromkeys(ids) if v not in split]
    if unknown:
        raise CredannoError(f"--labelled {path} names {len(unknown)} {column}s the store does "
                            f"not hold, e.g. {', '.join(map(str, unknown[:5]))}")
    train = s.table("train")[column].to_numpy()
    rows = np.flatnonzero(np.isin(train, ids)).astype(np.int64)
    return rows, {"path": str(path.resolve()), "sha256": hashlib.sha256(raw).hexdigest(),
                  "n_images": int(rows.size)}


def _budget(budget: int | None, frac: float | None, table: pd.DataFrame,
            labelled: np.ndarray, mode: str) -> int:
    """Images to pick: ``budget``, or ``frac`` of the training split; at most what is left
    unlabelled (for ``one-per-nodule``, the nodules without a labelled image)."""
    from credanno.eval.subsets import check_frac

    if (budget is None) == (frac is None):
        raise CredannoError("give exactly one of --budget N or --frac F")
    n_train = len(table)
    if frac is not None:
        n = max(1, int(round(check_frac(frac) * n_train)))
    else:
        n = int(budget)
        if n <= 0:
            raise CredannoError(f"--budget must be a positive number of images, got {n}")
    free = n_train - len(labelled)
    what = f"{free} unlabelled training images"
    if mode == "one-per-nodule":
        nod = table["nodule_id"].to_numpy()
        free = len(np.setdiff1d(np.unique(nod), nod[labelled]))
        what = f"{free} training nodules without a labelled image (--per nodule)"
    if n > free:
        asked = f"--budget {n}" if frac is None else f"--frac {frac:g} ({n} images)"
        raise CredannoError(f"{asked} exceeds the {what}; pass at most {free}")
    return n


def _run(strat, table: pd.DataFrame, x: np.ndarray, budget: int, seed: int,
         frac: float | None, labelled: np.ndarray, mode: str, device: str | None):
    """``(rows, scores, groups)`` of one strategy run, rows in the order picked."""
    from credanno.eval.strategies import Selection, SubsetContext, _LazyFeatures, label_free

    ctx = SubsetContext(label_free(table), budget, seed, frac, None if frac else budget, mode,
                        None, _LazyFeatures(x), labelled=labelled, device=device)
    sel = strat.select(ctx)
    sel = sel if isinstance(sel, Selection) else Selection(np.asarray(sel))
    rows = np.asarray(sel.rows, dtype=np.int64)
    if len(np.unique(rows)) != len(rows) or np.isin(rows, labelled).any() or not len(rows):
        raise CredannoError(f"strategy {strat.name!r} returned repeated, labelled or no rows")
    scores = np.full(len(rows), np.nan) if sel.scores is None else np.asarray(sel.scores)
    return rows, scores, sel.groups


def _params(s: Any, name: str, per: str, budget: int, frac: float | None, seed: int,
            kind: str, labelled: dict | None, device: str | None, n_train: int) -> dict:
    """The JSON sidecar: the run's parameters, the store's provenance and identity."""
    from credanno import __version__
    from credanno.cache import content_identity
    from credanno.eval.strategies._picking import faiss_gpu

    gpu = faiss_gpu(device) if name not in ("random", "nodule") else None
    return {"command": "credanno select", "version": __version__, "strategy": name,
            "score": SCORES.get(name, "the strategy's own"), "budget": budget, "frac": frac,
            "seed": seed, "per": per, "kind": kind, "labelled": labelled,
            "n_train": n_train, "device": "cpu" if gpu is None else f"cuda:{gpu}",
            "store": {"path": str(Path(s.path).resolve()),
                      "content_identity": content_identity(s),
                      "provenance": s.provenance}}


def write_picks(picks: Picks, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the picks CSV at ``out`` and its JSON sidecar beside it (``.json``)."""
    from credanno.outputs import write_csv, write_json

    out = Path(out)
    sidecar = out.with_suffix(".json") if out.suffix != ".json" else out.with_name(
        out.name + ".params.json")
    csv = write_csv(picks.table, out, option="--out", index=False)
    write_json({**picks.params, "picks": str(csv.resolve())}, sidecar, option="--out")
    return csv, sidecar
