"""``credanno explore``: one self-contained HTML page to look at the learned space.

The page shows the cached t-SNE map of a store's split (:func:`credanno.viz.tsne.tsne_map`),
coloured by any label in the radiologists' words. Hovering a point shows its patch, ids,
the nodule's median ratings and this radiologist's own; clicking it lists its k nearest
*training* images by the cosine similarity k-NN uses and the k-NN vote for every label
(:mod:`credanno.eval.knn`: ``exp(sim / T)`` weights), a case-based explanation.

Everything is computed here, at export, and inlined as one JSON block (no server, no
network, no JavaScript library): the page opens from a USB stick. Thumbnails are 8-bit grey
32 x 32 arrays, base64 in the JSON (2,673 images are ~3.6 MB), drawn straight into
``ImageData``. Strings from files reach the page only inside that JSON, escaped so that
nothing in them can close the ``<script>`` element, and the page sets them with
``textContent`` only, never as HTML.
"""

from __future__ import annotations

import base64
import html
import json
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from credanno.errors import CredannoError, CredannoWarning
from credanno.labels import LABEL_NAMES, RATING_LEVELS, label_spec
from credanno.numerics import l2_normalise

#: the thumbnail side in pixels (the LIDC patches' size; other sizes are resampled)
THUMB = 32
ID_COLUMNS = ("annotation_id", "nodule_id", "scan_id")


@dataclass(frozen=True)
class ExplorerPage:
    """The page's HTML and what it holds (for the command's one-line summary and tests)."""

    html: str
    n_points: int
    n_images: int
    store: Path
    split: str
    #: why the page has no thumbnails (None when it has them)
    thumb_note: str | None
    cached_map: bool

    @property
    def size(self) -> int:
        return len(self.html.encode("utf-8"))


def check_color(color: str) -> str:
    """``--color``: one label name; anything else is one line listing the labels."""
    if color not in LABEL_NAMES:
        raise CredannoError(f"unknown --color {color!r}; choose one of "
                            f"{', '.join(LABEL_NAMES)}")
    return color


def explorer_page(store: str | os.PathLike | None = None, split: str = "test",
                  color: str = "malignancy", k: int = 8, *, kind: str = "cls", T: float = 0.1,
                  perplexity: float = 30.0, seed: int = 0, cache: bool = True,
                  cache_root: str | os.PathLike | None = None) -> ExplorerPage:
    """Build the explorer page of ``split`` (test | train | all) of a store.

    The map is :func:`~credanno.viz.tsne.tsne_map`'s (cached by ``credanno tsne``); the
    neighbours are searched among the store's training images with FAISS (as k-NN does).
    A patch file that is gone or changed (sha256) leaves the page without thumbnails and
    warns once.
    """
    from credanno import stores
    from credanno.eval.knn import check_ks, check_T
    from credanno.viz.tsne import tsne_map

    check_color(color)
    k = check_ks([k])[0]
    T = check_T(T)
    m = tsne_map(store, split=split, kind=kind, perplexity=perplexity, seed=seed,
                 cache=cache, cache_root=cache_root)
    with stores.open(m.store) as s:
        shown = np.arange(s.n) if split == "all" else s.rows(split)
        train = s.rows("train")
        if len(train) == 0:
            raise CredannoError(f"store {m.store} has no training images to show as "
                                "neighbours; embed a patch file with a train split")
        full = s.table()
        x = s.features(split=None, kind=kind)
        provenance = dict(s.provenance)
    if len(train) < 2 and np.isin(shown, train).any():
        raise CredannoError(f"store {m.store} has one training image; a training image "
                            "needs another as its neighbour (use --split test)")
    neighbours = _neighbours(x, shown, train, full, min(k, len(train)), T)
    rec_rows = np.unique(np.concatenate([shown, neighbours.rows.ravel()]))
    images, note = thumbnails(provenance, m.store, full.iloc[rec_rows])
    data = _page_data(m, full, shown, rec_rows, neighbours, images, note,
                      {"color": color, "k": int(neighbours.rows.shape[1]), "T": T, "kind": kind})
    page = render(data, title=f"credanno explorer: {m.store.name} ({split})")
    return ExplorerPage(html=page, n_points=len(shown), n_images=0 if images is None
                        else len(images), store=m.store, split=split, thumb_note=note,
                        cached_map=m.cached)


def write_explorer(out: str | os.PathLike, **options: Any) -> ExplorerPage:
    """:func:`explorer_page` written to ``out`` (atomically)."""
    from credanno._atomic import atomic_path

    page = explorer_page(**options)
    with atomic_path(Path(out), option="--out") as tmp:
        tmp.write_text(page.html, encoding="utf-8")
    return page


# ---------------------------------------------------------------- neighbours and votes


@dataclass(frozen=True)
class Neighbours:
    """Per shown point: its k nearest training images (store rows, similarities) and the
    k-NN vote of each label (``{label: (pred, share)}``, pred -1 when no bank)."""

    rows: np.ndarray
    sims: np.ndarray
    votes: dict[str, tuple[np.ndarray, np.ndarray]]


def nearest(x_n: np.ndarray, bank: np.ndarray, queries: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k store rows of ``bank`` for every store row in ``queries`` (cosine, FAISS), a
    query never being its own neighbour (leave-one-out for training images)."""
    from credanno.eval.knn import knn_search

    extra = 1 if np.isin(queries, bank).any() else 0
    kk = min(k + extra, len(bank))
    sims, idx = knn_search(x_n[bank], x_n[queries], kk, normalize=False)
    rows = bank[idx]
    if not extra:
        return sims, rows
    keep = rows != queries[:, None]
    # drop the self match where present, else the last (k + 1-th) neighbour
    keep[keep.all(axis=1), -1] = False
    return sims[keep].reshape(len(queries), -1), rows[keep].reshape(len(queries), -1)


def _neighbours(x: np.ndarray, shown: np.ndarray, train: np.ndarray, table: pd.DataFrame,
                k: int, T: float) -> Neighbours:
    """The listed neighbours (all training images) and every label's vote (its bank: the
    training images rated for it, as in :func:`credanno.eval.knn.knn_sweep`)."""
    from credanno.eval.knn import knn_vote

    x_n = l2_normalise(x)
    sims, rows = nearest(x_n, train, shown, k)
    labels = table[list(LABEL_NAMES)].to_numpy().astype(np.int64)
    groups: dict[bytes, list[int]] = {}
    for j in range(len(LABEL_NAMES)):
        groups.setdefault((labels[train, j] >= 0).tobytes(), []).append(j)
    votes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, idxs in groups.items():
        bank = train[np.frombuffer(key, dtype=bool)]
        if len(bank) == 0 or (len(bank) == 1 and np.isin(shown, bank).any()):
            for j in idxs:
                votes[LABEL_NAMES[j]] = (np.full(len(shown), -1), np.zeros(len(shown)))
            continue
        b_sims, b_rows = (sims, rows) if len(bank) == len(train) else nearest(
            x_n, bank, shown, k)
        kk = b_rows.shape[1]
        counts = [label_spec(LABEL_NAMES[j]).n_classes for j in idxs]
        pred, proba = knn_vote(b_sims, labels[b_rows][:, :, idxs], [kk], counts, T)[kk]
        for col, j in enumerate(idxs):
            votes[LABEL_NAMES[j]] = (pred[:, col], proba[col].max(axis=1))
    return Neighbours(rows=rows, sims=sims, votes=votes)


# ---------------------------------------------------------------- thumbnails


def thumbnails(provenance: dict[str, Any], store: Path,
               table: pd.DataFrame) -> tuple[np.ndarray | None, str | None]:
    """(uint8 (n, 32, 32) patches of ``table``'s rows, None) from the patch file the store
    was embedded from, or (None, why not) with one :class:`CredannoWarning`."""
    images, note = _read_thumbnails(provenance, store, table)
    if note is not None:
        warnings.warn(note, CredannoWarning, stacklevel=3)
    return images, note


def _read_thumbnails(provenance: dict[str, Any], store: Path,
                     table: pd.DataFrame) -> tuple[np.ndarray | None, str | None]:
    from credanno.data.patchfile import file_sha256, read_patch_file
    from credanno.outputs import one_line
    from credanno.viz.source import _maybe_json, patch_file_of

    recorded = _maybe_json(provenance.get("patch_file"))
    recorded = recorded if isinstance(recorded, dict) else {}
    path = patch_file_of(provenance, store)
    if path is None and not recorded.get("path"):
        return None, ("the store's provenance names no patch file; the page has no "
                      "thumbnails (stores made by `credanno embed` name theirs)")
    if path is None:
        return None, (f"patch file {one_line(recorded['path'])} not found; the page has no "
                      "thumbnails (put it back where `credanno embed` read it to see them)")
    sha = recorded.get("sha256")
    if sha and file_sha256(path) != sha:
        return None, (f"patch file {one_line(path)} has changed since the store was embedded "
                      "(sha256 differs); the page has no thumbnails (re-embed, or restore "
                      "the original file)")
    try:
        patches = read_patch_file(path)
    except CredannoError as exc:
        return None, f"{one_line(exc)}; the page has no thumbnails"
    where = pd.Series(np.arange(len(patches.table)), index=patches.table["annotation_id"])
    ids = table["annotation_id"].to_numpy()
    if not np.isin(ids, where.index).all():
        return None, (f"patch file {one_line(path)} lacks some of the store's annotation ids; "
                      "the page has no thumbnails")
    return to_thumbs(patches.images[where.loc[ids].to_numpy()]), None


def to_thumbs(images: np.ndarray) -> np.ndarray:
    """(n, H, H) floats in [0, 1] -> (n, 32, 32) uint8 (block means, or nearest pixels
    when H is not a multiple of 32)."""
    imgs = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    size = imgs.shape[1]
    if size != THUMB:
        if size % THUMB == 0:
            f = size // THUMB
            imgs = imgs.reshape(len(imgs), THUMB, f, THUMB, f).mean(axis=(2, 4))
        else:
            pick = (np.arange(THUMB) * size) // THUMB
            imgs = imgs[:, pick][:, :, pick]
    return np.round(imgs * 255).astype(np.uint8)


# ---------------------------------------------------------------- page data and HTML


def _source_text(provenance: dict[str, Any], store: Path) -> tuple[str, bool]:
    """What data the store shows, as plain text (the page sets it as text, not HTML)."""
    from credanno.viz.source import SOURCE_WORDS, describe_source

    src = describe_source(provenance, store)
    if src.kind in SOURCE_WORDS:
        return SOURCE_WORDS[src.kind], src.is_real
    # describe_source escapes for Markdown; the kind itself is one plain line
    return (src.text if src.kind == "unknown" else f"{src.kind} data"), False


def _records(full: pd.DataFrame, rows: np.ndarray, has_images: bool) -> dict[str, Any]:
    """Column lists of the table rows the page shows (points and neighbours)."""
    t = full.iloc[rows]
    rec: dict[str, Any] = {c: t[c].astype(np.int64).tolist() for c in ID_COLUMNS}
    rec["patient_id"] = t["patient_id"].astype(str).tolist()
    rec["split"] = t["split"].astype(str).tolist()
    rec["diameter"] = np.round(t["diameter"].to_numpy(np.float64), 1).tolist()
    rec["label"] = {n: t[n].astype(np.int64).tolist() for n in LABEL_NAMES}
    rec["rating"] = {n: _floats(t, f"rating_{n}", 2) for n in LABEL_NAMES}
    rec["raw"] = {n: _floats(t, f"raw_{n}", 0) for n in LABEL_NAMES}
    rec["img"] = list(range(len(rows))) if has_images else [-1] * len(rows)
    return rec


def _floats(t: pd.DataFrame, column: str, digits: int) -> list[float | None]:
    """A rating column as JSON numbers (None where missing or not in the table)."""
    if column not in t.columns:
        return [None] * len(t)
    v = np.round(t[column].to_numpy(np.float64), digits)
    return [None if not np.isfinite(a) else (int(a) if digits == 0 else float(a)) for a in v]


def _label_info() -> list[dict[str, Any]]:
    from credanno.viz.figures import label_colours

    return [{"name": n, "words": list(label_spec(n).words), "levels": RATING_LEVELS[n],
             "short": label_spec(n).short,
             "colours": label_colours(label_spec(n))} for n in LABEL_NAMES]


def _page_data(m: Any, full: pd.DataFrame, shown: np.ndarray, rec_rows: np.ndarray,
               nb: Neighbours, images: np.ndarray | None, note: str | None,
               opts: dict[str, Any]) -> dict[str, Any]:
    """Everything the page draws, as one JSON-ready dict."""
    from credanno.viz.figures import MISSING_COLOUR

    pos = {int(r): i for i, r in enumerate(rec_rows)}
    source, real = _source_text(m.provenance, m.store)
    coords = np.round(np.asarray(m.coords, dtype=np.float64), 3)
    return {
        "meta": {"store": m.store.name, "split": m.split, "n": len(shown), "source": source,
                 "real": real, "perplexity": round(float(m.params["perplexity"]), 2),
                 "thumb": THUMB, "thumbNote": note, "missingColour": MISSING_COLOUR, **opts},
        "labels": _label_info(),
        "points": {"x": coords[:, 0].tolist(), "y": coords[:, 1].tolist(),
                   "rec": [pos[int(r)] for r in shown]},
        "neighbours": {"rec": [[pos[int(r)] for r in row] for row in nb.rows],
                       "sim": np.round(nb.sims.astype(np.float64), 4).tolist()},
        "votes": {n: {"pred": p.astype(np.int64).tolist(),
                      "share": np.round(s.astype(np.float64), 3).tolist()}
                  for n, (p, s) in nb.votes.items()},
        "records": _records(full, rec_rows, images is not None),
        "images": "" if images is None else base64.b64encode(images.tobytes()).decode("ascii"),
    }


def script_json(obj: Any) -> str:
    """JSON safe inside an HTML ``<script>`` element: ``< > &`` and the JavaScript line
    separators are ``\\u`` escapes, so no string can end the element or open a comment."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def template() -> str:
    """The page (``credanno/viz/explorer.html``, package data): CSS and script inline."""
    return resources.files("credanno.viz").joinpath("explorer.html").read_text(encoding="utf-8")


def render(data: dict[str, Any], title: str) -> str:
    """The template with the title (HTML-escaped) and the data (script-safe JSON)."""
    page = template().replace("__CREDANNO_TITLE__", html.escape(title))
    head, sep, tail = page.partition("__CREDANNO_DATA__")
    if not sep:
        raise CredannoError("the explorer template lacks its data slot; reinstall credanno")
    return head + script_json(data) + tail
