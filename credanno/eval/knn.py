"""k-NN classification on frozen features (the paper's section 3.1, experiment (i)).

Features are L2-normalised so that the dot product is the cosine similarity; the
neighbours of each test feature are searched with FAISS (``IndexFlatIP``, a GPU index
when faiss sees a GPU) among the *labelled* training features only, and each of the top
k neighbours votes for its class with weight ``exp(sim / T)`` (T = 0.1 in the paper's
code, 0.07 in DINO) or with weight 1 (``weighting="majority"``).

Many k are answered from one search with the largest k: votes are accumulated over the
sorted neighbour list and read off at every requested k. Many labels are answered from
the same search too, by offsetting each label's classes into one score matrix.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from credanno import checks
from credanno.errors import CredannoError, CredannoWarning
from credanno.eval.data import EvalData, StoreLike, open_eval_data
from credanno.labels import label_spec
from credanno.numerics import l2_normalise
from credanno.runtime import check_device

if TYPE_CHECKING:
    from credanno.eval.results import EvalResult
    from credanno.eval.specs import KnnSpec
    from credanno.eval.subsets import Subset, SubsetsLike

#: weighting name -> function(similarities (nq, K) sorted descending, T) -> weights (nq, K).
WEIGHTINGS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {}


def register_weighting(name: str):
    """Register a neighbour-weighting function under ``name`` (timm-style registry)."""

    def deco(fn):
        WEIGHTINGS[name] = fn
        return fn

    return deco


@register_weighting("exp")
def exp_weights(sims: np.ndarray, T: float) -> np.ndarray:
    """``exp(sim / T)`` (DINO's weighted k-NN); scaled per query by ``exp(-max / T)``,
    which changes neither the vote nor the normalised vote shares but avoids overflow."""
    s = sims.astype(np.float64, copy=False)
    return np.exp((s - s[:, :1]) / T)


@register_weighting("majority")
def majority_weights(sims: np.ndarray, T: float) -> np.ndarray:
    """Every neighbour counts once (plain majority vote)."""
    return np.ones(sims.shape, dtype=np.float64)


def get_weighting(name: str) -> Callable[[np.ndarray, float], np.ndarray]:
    try:
        return WEIGHTINGS[name]
    except KeyError:
        raise CredannoError(
            f"unknown weighting {name!r}; choose one of {', '.join(sorted(WEIGHTINGS))}"
        ) from None


def check_ks(ks: Iterable[int]) -> list[int]:
    """Sorted unique positive k; ``k <= 0`` is an error."""
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise CredannoError("no k given; pass e.g. --k 10,20,50")
    if ks[0] <= 0:
        raise CredannoError(f"k must be a positive number of neighbours, got {ks[0]}; "
                            "pass e.g. --k 20")
    return ks


_GPU_RES = None


def _gpu_index(faiss, device: str | None) -> int | None:
    """The faiss GPU to search on (``cuda:N`` -> N, ``cuda`` or automatic -> 0), or None
    for the CPU."""
    # the device name is read as everywhere else (credanno.runtime); whether faiss itself
    # has a GPU is its own question: a CPU-only faiss wheel beside a CUDA torch is common
    name = check_device(device)
    if name == "cpu":
        return None
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    if name is None:
        return 0 if n_gpus > 0 else None
    if n_gpus == 0:
        raise CredannoError("faiss sees no GPU; install faiss-gpu or pass --device cpu")
    index = int(name.partition(":")[2] or 0)
    if index >= n_gpus:
        raise CredannoError(f"--device {name}: faiss sees {n_gpus} GPU(s) "
                            f"(cuda:0 to cuda:{n_gpus - 1})")
    return index


def _flat_ip_index(dim: int, device: str | None, k: int):
    """An exact inner-product index, moved to the GPU when faiss has one."""
    import faiss

    index = faiss.IndexFlatIP(dim)
    # faiss GPU flat search supports k <= 2048; beyond that the CPU index is exact too.
    gpu = _gpu_index(faiss, device) if k <= 2048 else None
    if gpu is not None:
        global _GPU_RES
        if _GPU_RES is None:
            _GPU_RES = faiss.StandardGpuResources()  # one per process, for every GPU
        index = faiss.index_cpu_to_gpu(_GPU_RES, gpu, index)
    return index


def knn_search(bank: np.ndarray, queries: np.ndarray, k: int, *, normalize: bool = True,
               device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product neighbours of every query in ``bank`` (exact, FAISS).

    Returns ``(sims, idx)``, both (n_queries, k), sorted by decreasing similarity.
    ``k`` must not exceed ``len(bank)``.
    """
    if normalize:
        bank, queries = l2_normalise(bank), l2_normalise(queries)
    else:
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
    if bank.shape[1] != queries.shape[1]:
        raise CredannoError(f"bank has {bank.shape[1]}-d features but queries "
                            f"{queries.shape[1]}-d; use features of the same kind")
    if not 0 < k <= len(bank):
        raise CredannoError(f"k={k} needs 1..{len(bank)} bank rows")
    index = _flat_ip_index(bank.shape[1], device, k)
    index.add(bank)
    with _blas_blocks(len(bank)):
        sims, idx = index.search(queries, k)
    return sims, idx.astype(np.int64, copy=False)


#: Bank rows per sgemm block of faiss' exhaustive search. faiss' default (1024) leaves
#: large searches ~1.7x above the sgemm floor; 16384 gets within ~1.2x (measured on
#: 50k x 384, k=250) at the cost of a 4096 x 16384 float32 buffer (256 MB) while searching.
BLAS_DATABASE_BLOCK = 16384


@contextlib.contextmanager
def _blas_blocks(n_bank: int):
    """Temporarily raise faiss' database block size for large banks (restored after)."""
    import faiss

    cvar = faiss.cvar
    saved = cvar.distance_compute_blas_database_bs
    if n_bank > saved:
        cvar.distance_compute_blas_database_bs = min(BLAS_DATABASE_BLOCK, n_bank)
    try:
        yield
    finally:
        cvar.distance_compute_blas_database_bs = saved


def knn_search_blocks(blocks: Iterable[tuple[int, np.ndarray]], queries: np.ndarray, k: int,
                      *, normalize: bool = True,
                      device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over a bank streamed as ``(row_offset, block)`` pairs.

    Each block is searched on its own and the per-block top-k lists are merged with
    faiss' ``ResultHeap``, so the result equals one search over the whole bank while
    only one block is in memory at a time. Indices are global (offset + row in block).
    """
    import faiss

    queries = l2_normalise(queries) if normalize else np.ascontiguousarray(queries, np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    total = 0
    for offset, block in blocks:
        if len(block) == 0:
            continue
        block = l2_normalise(block) if normalize else np.ascontiguousarray(block, np.float32)
        sims, idx = knn_search(block, queries, min(k, len(block)), normalize=False,
                               device=device)
        _heap_add(heap, sims, idx + offset, k)
        total += len(block)
    if total < k:
        raise CredannoError(f"k={k} needs 1..{total} bank rows")
    heap.finalize()
    return heap.D, heap.I


def check_T(T: float) -> float:
    """The vote temperature: finite and > 0 (a NaN would make every vote NaN, silently)."""
    return checks.finite(T, "--T", low=0, example="0.1")


def knn_vote(sims: np.ndarray, neighbour_labels: np.ndarray, ks: Sequence[int],
             n_classes: int | Sequence[int], T: float = 0.1, weighting: str = "exp",
             ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Weighted votes of the sorted neighbour lists, read off at every k in ``ks``.

    ``neighbour_labels`` is (nq, K) for one label or (nq, K, L) for L labels (then
    ``n_classes`` is a sequence of L class counts). Each label's classes are offset into
    one (nq, sum C) score matrix, and the votes of neighbours ``[k_prev, k)`` are added
    with one ``bincount`` per k segment, so all labels and all k cost one pass over
    the K neighbours. Ties go to the lower class.

    Returns ``{k: (pred, proba)}`` with ``pred`` (nq,) or (nq, L) int64 and ``proba``
    the vote shares, (nq, C) or a list of L arrays (nq, C_l).
    """
    T = check_T(T)
    single = neighbour_labels.ndim == 2
    labs = neighbour_labels[..., None] if single else neighbour_labels
    counts = [int(n_classes)] if single else [int(c) for c in n_classes]
    nq, K, L = labs.shape
    if len(counts) != L:
        raise CredannoError(f"{L} label columns but {len(counts)} class counts")
    ks = check_ks(ks)
    if ks[-1] > K:
        raise CredannoError(f"k={ks[-1]} exceeds the {K} neighbours searched")
    if labs.size and (labs.min() < 0 or (labs >= np.asarray(counts)).any()):
        raise CredannoError("neighbour labels must be class indices 0..C-1 "
                            "(drop rows with missing labels, -1, from the bank)")
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])
    w = get_weighting(weighting)(sims, T)  # (nq, K)
    # flat score index of every (query, neighbour, label) vote
    flat = (np.arange(nq, dtype=np.int64)[:, None, None] * total
            + offsets[:-1][None, None, :] + labs.astype(np.int64))
    scores = np.zeros(nq * total, dtype=np.float64)
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    start = 0
    for k in ks:
        seg = flat[:, start:k, :]
        segw = np.broadcast_to(w[:, start:k, None], seg.shape)
        scores += np.bincount(seg.ravel(), weights=segw.ravel(), minlength=nq * total)
        start = k
        s = scores.reshape(nq, total)
        preds, probas = [], []
        for j in range(L):
            block = s[:, offsets[j]:offsets[j + 1]]
            preds.append(block.argmax(axis=1))
            probas.append(block / block.sum(axis=1, keepdims=True))
        if single:
            out[k] = (preds[0], probas[0])
        else:
            out[k] = (np.stack(preds, axis=1), probas)
    return out


def knn_classify(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray,
                 ks: Sequence[int] | int, n_classes: int, T: float = 0.1,
                 weighting: str = "exp", *, device: str | None = None,
                 warn: bool = True) -> dict[int, np.ndarray]:
    """Weighted k-NN predictions for ``queries`` from a labelled ``bank`` (arrays in, out).

    Features are L2-normalised here; bank rows labelled -1 (missing) are left out. Every k
    in ``ks`` is answered from one search with the largest k; a k larger than the bank is
    clamped to the bank size with a :class:`CredannoWarning`. Returns ``{k: predictions}``
    keyed by the requested k.
    """
    ks = check_ks([ks] if np.isscalar(ks) else ks)
    bank_labels = np.asarray(bank_labels).astype(np.int64)
    keep = bank_labels >= 0
    bank = np.asarray(bank)[keep]
    bank_labels = bank_labels[keep]
    if len(bank) == 0:
        raise CredannoError("the k-NN bank has no labelled rows; label some training rows")
    eff = {k: min(k, len(bank)) for k in ks}
    if warn and ks[-1] > len(bank):
        warnings.warn(f"k={ks[-1]} is larger than the {len(bank)} labelled bank rows; "
                      f"clamped to {len(bank)}", CredannoWarning, stacklevel=2)
    kmax = max(eff.values())
    sims, idx = knn_search(bank, queries, kmax, device=device)
    votes = knn_vote(sims, bank_labels[idx], sorted(set(eff.values())), n_classes, T, weighting)
    return {k: votes[eff[k]][0] for k in ks}


def _heap_add(heap, sims: np.ndarray, idx: np.ndarray, k: int) -> None:
    """Add a (nq, kb <= k) result list to a faiss ResultHeap, padding it to k columns."""
    if sims.shape[1] < k:
        pad = k - sims.shape[1]
        sims = np.concatenate([sims, np.full((len(sims), pad), -np.inf, np.float32)], 1)
        idx = np.concatenate([idx, np.full((len(idx), pad), -1, np.int64)], 1)
    heap.add_result(np.ascontiguousarray(sims, np.float32), np.ascontiguousarray(idx, np.int64))


def _search_banks(banks: list[np.ndarray], kneed: list[int], queries_n: np.ndarray,
                  train_n: np.ndarray | None, blocks: Iterable[tuple[int, np.ndarray]] | None,
                  device: str | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k of the queries in every bank (sorted training-row positions), as training-row
    positions. In memory: one FAISS search per bank. Streamed: every block is read once
    and searched for every bank, and per-bank ResultHeaps merge the blocks exactly."""
    if blocks is None:
        out = []
        for rows, k in zip(banks, kneed, strict=True):
            sims, idx = knn_search(train_n[rows], queries_n, k, normalize=False, device=device)
            out.append((sims, rows[idx]))
        return out
    import faiss

    heaps = [faiss.ResultHeap(len(queries_n), k, keep_max=True) for k in kneed]
    for offset, block in blocks:
        block_n = l2_normalise(block)
        lo_hi = [np.searchsorted(rows, [offset, offset + len(block)]) for rows in banks]
        for heap, rows, k, (lo, hi) in zip(heaps, banks, kneed, lo_hi, strict=True):
            if hi <= lo:
                continue
            sel = rows[lo:hi]
            sims, idx = knn_search(block_n[sel - offset], queries_n, min(k, len(sel)),
                                   normalize=False, device=device)
            _heap_add(heap, sims, sel[idx], k)
    out = []
    for heap in heaps:
        heap.finalize()
        out.append((heap.D, heap.I))
    return out


class _Bank(NamedTuple):
    """One search of a subset: its rows labelled for the labels ``label_idx`` (labels with
    the same labelled rows share a bank, normally all of them)."""

    rows: np.ndarray
    label_idx: list[int]


def _subset_banks(subset: Subset, lab_all: np.ndarray, labels: list[str], kmax: int,
                  clamped: set[int]) -> list[_Bank]:
    """The banks of one subset; bank sizes below ``kmax`` are added to ``clamped``."""
    groups: dict[bytes, list[int]] = {}
    masks = lab_all[subset.rows] >= 0
    for j in range(len(labels)):
        groups.setdefault(masks[:, j].tobytes(), []).append(j)
    banks = []
    for key, idxs in groups.items():
        rows = subset.rows[np.frombuffer(key, dtype=bool)]
        if len(rows) == 0:
            raise CredannoError(
                f"label fraction {subset.frac:g} (seed {subset.seed}) leaves no labelled rows "
                f"for {', '.join(labels[j] for j in idxs)}; use a larger --frac")
        if kmax > len(rows):
            clamped.add(len(rows))
        banks.append(_Bank(rows, idxs))
    return banks


def _search_all(banks: list[list[_Bank]], kmax: int, queries_n: np.ndarray,
                train_n: np.ndarray | None, blocks, device: str | None) -> list[list[tuple]]:
    """``(sims, idx)`` of every bank of every subset, from one search per distinct bank
    with the largest (clamped) k: at fraction 1 every seed labels the same rows, so their
    banks are searched once."""
    unique: dict[bytes, int] = {}
    for subset_banks in banks:
        for bank in subset_banks:
            unique.setdefault(bank.rows.tobytes(), len(unique))
    distinct = [np.frombuffer(key, dtype=np.int64) for key in unique]
    kneed = [min(kmax, len(rows)) for rows in distinct]
    found = _search_banks(distinct, kneed, queries_n, train_n, blocks, device)
    return [[found[unique[bank.rows.tobytes()]] for bank in subset_banks]
            for subset_banks in banks]


def _vote_subset(banks: list[_Bank], found: list[tuple], lab_all: np.ndarray,
                 labels: list[str], knn: KnnSpec) -> tuple[dict, dict]:
    """Predictions and vote shares ``{k: {label: array}}`` of one subset's searches."""
    n_classes = [label_spec(n).n_classes for n in labels]
    preds: dict[int, dict[str, np.ndarray]] = {k: {} for k in knn.ks}
    probas: dict[int, dict[str, np.ndarray]] = {k: {} for k in knn.ks}
    for bank, (sims, idx) in zip(banks, found, strict=True):
        idxs = bank.label_idx
        eff = {k: min(k, len(bank.rows)) for k in knn.ks}
        votes = knn_vote(sims, lab_all[idx][:, :, idxs], sorted(set(eff.values())),
                         [n_classes[j] for j in idxs], knn.T, knn.weighting)
        for k in knn.ks:
            p, pr = votes[eff[k]]
            for col, j in enumerate(idxs):
                preds[k][labels[j]] = p[:, col]
                probas[k][labels[j]] = pr[col]
    return preds, probas


def _knn_sweep_data(data: EvalData, subsets: SubsetsLike, knn: KnnSpec, n_boot: int,
                    progress: bool) -> EvalResult:
    """k-NN over subsets x k x labels of loaded (or streamed) evaluation data.

    One FAISS search with the largest k per subset (per group of labels with the same
    labelled rows, normally one), all k and all labels voted from it.
    """
    from credanno.eval.results import ConfigPredictions, build_result
    from credanno.eval.subsets import resolve_subsets, warn_subsets_missing_classes

    labels = list(data.labels)
    lab_all = data.train_table[labels].to_numpy().astype(np.int64)  # (n_train, L)
    queries_n = l2_normalise(data.test_x)
    streamed = knn.block_rows is not None or data.train_x is None
    if data.train_x is None and data._train_store is None:
        raise CredannoError("no training features given (train_x or a store)")
    train_n = None if streamed else l2_normalise(data.train_x)
    drawn, subset_record = resolve_subsets(subsets, data.train_table, data.train_features)
    clamped: set[int] = set()
    banks = [_subset_banks(s, lab_all, labels, knn.ks[-1], clamped) for s in drawn]
    warn_subsets_missing_classes(drawn, lab_all, labels)
    if clamped:
        warnings.warn(f"k={knn.ks[-1]} is larger than the labelled bank "
                      f"({', '.join(map(str, sorted(clamped)))} rows); k clamped to the bank "
                      "size there", CredannoWarning, stacklevel=3)
    blocks = data.train_blocks(knn.block_rows or len(data.train_table)) if streamed else None
    found = _search_all(banks, knn.ks[-1], queries_n, train_n, blocks, knn.device)
    configs: list[ConfigPredictions] = []
    it = zip(drawn, banks, found, strict=True)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(drawn), desc="k-NN", unit="subset", file=None)
    for subset, subset_banks, subset_found in it:
        preds, probas = _vote_subset(subset_banks, subset_found, lab_all, labels, knn)
        configs += [ConfigPredictions("knn", k, subset.frac, subset.seed, len(subset.rows),
                                      preds[k], probas[k]) for k in knn.ks]
    cfg = {"method": "knn", "ks": list(knn.ks), **subset_record, "T": knn.T,
           "weighting": knn.weighting, "labels": labels, **data.record()}
    return build_result(configs, data.test_table, labels, n_boot=n_boot, config=cfg)


def knn_sweep(store: StoreLike | EvalData = None, subsets: SubsetsLike = None,
              knn: KnnSpec | None = None, *, labels: Sequence[str] | str | None = None,
              test_store: StoreLike = None, where: str | None = None, n_boot: int = 1000,
              progress: bool = False) -> EvalResult:
    """k-NN evaluation of a feature store (default: the newest under ``stores/``).

    Train rows are the store's training split (or ``store``'s, with test rows from
    ``test_store``), test rows its test split; ``store`` may also be an :class:`EvalData`
    (e.g. :meth:`EvalData.from_arrays`), whose labels are then used. ``subsets`` says which
    training rows keep their labels: a :class:`SubsetSpec` (default: all labels, seed 0)
    or explicit subsets, a list of training-row arrays (or :class:`Subset`); ``knn``
    (default: k=20) the classifier; ``knn.block_rows`` streams the training features in
    blocks. ``where`` (a pandas query over the per-image table, ``"diameter >= 10"``)
    restricts the bank and the test rows alike; row arrays then number the rows it keeps.
    """
    from credanno.eval.specs import KnnSpec

    knn = KnnSpec() if knn is None else knn
    if isinstance(store, EvalData):
        return _knn_sweep_data(store.subpopulation(where), subsets, knn, n_boot, progress)
    with open_eval_data(store, knn.kind, labels, test_store=test_store,
                        load_train=knn.block_rows is None, where=where) as data:
        return _knn_sweep_data(data, subsets, knn, n_boot, progress)
