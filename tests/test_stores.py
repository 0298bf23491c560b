"""Feature stores: API round trips, laziness, concurrency and every bad input."""

import multiprocessing as mp
import os

import h5py
import numpy as np
import pandas as pd
import pytest

from credanno import stores
from credanno.errors import CredannoError
from credanno.labels import LABEL_NAMES
from credanno.synthetic import synthetic_features, synthetic_table

PROV = {"encoder": {"kind": "timm", "arch": "vit_tiny", "sha256": "a" * 64, "which": "teacher"},
        "patch_file": {"path": "data/x.h5", "sha256": "b" * 64},
        "transform": {"resize": 32, "crop": 32}, "feature_sets": {"cls": "final CLS"}}


@pytest.fixture
def table():
    return synthetic_table(n_nodules=30, per_nodule=3, seed=1)


@pytest.fixture
def feats(table):
    cls = synthetic_features(table, dim=8, seed=2)
    last4 = np.concatenate([synthetic_features(table, dim=8, seed=s) for s in range(3, 7)], 1)
    return {"cls": cls, "last4": last4}


@pytest.fixture
def store_path(tmp_path, table, feats):
    return stores.save(tmp_path / "s.h5", feats, table, PROV)


def test_round_trip(store_path, table, feats):
    with stores.open(store_path) as s:
        assert (s.n, s.dim) == (len(table), 8)
        assert s.feature_sets == ["cls", "last4"]
        assert s.dims == {"cls": 8, "last4": 32}
        assert s.label_names == list(LABEL_NAMES)
        assert s.path == store_path
        train = table["split"].to_numpy() == "train"
        np.testing.assert_array_equal(s.rows("train"), np.flatnonzero(train))
        np.testing.assert_array_equal(s.rows("test"), np.flatnonzero(~train))
        for kind, x in feats.items():
            np.testing.assert_array_equal(s.features(kind=kind), x)
            got = s.features(split="train", kind=kind)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, x[train])
            np.testing.assert_array_equal(s.features("test", kind), x[~train])
        for name in LABEL_NAMES:
            y = s.labels(name, split="test")
            assert y.dtype == np.int64
            np.testing.assert_array_equal(y, table[name].to_numpy()[~train])
        pd.testing.assert_frame_equal(s.table(), table, check_dtype=False)
        test_df = s.table(split="test")
        assert list(test_df["annotation_id"]) == list(table["annotation_id"][~train])
        prov = s.provenance
        assert prov["encoder"] == PROV["encoder"] and prov["patch_file"] == PROV["patch_file"]
        assert prov["credanno_version"] and prov["created"]
        assert s.views() is None
        assert "n=90" in repr(s)
    with h5py.File(store_path, "r") as f:  # the schema any HDF5 reader sees
        assert f.attrs["schema"] == "credanno.store"
        assert f["features/cls"].shape == (len(table), 8)
        assert f["features/cls"].dtype == np.float32
        assert f["table/split"].asstr()[0] in ("train", "test")


def test_float16_and_streaming_with_views(tmp_path, table, feats):
    n_train = int((table["split"] == "train").sum())
    rng = np.random.default_rng(0)
    views = {k: rng.normal(size=(3, n_train, v.shape[1])).astype(np.float32)
             for k, v in feats.items()}
    with stores.create(tmp_path / "h.h5", table, {"cls": 8, "last4": 32}, PROV,
                       dtype="float16", views=3) as w:
        for a in range(0, len(table), 7):
            w.append({k: v[a:a + 7] for k, v in feats.items()})
        for a in range(0, n_train, 10):
            w.append_views({k: v[:, a:a + 10] for k, v in views.items()})
    with stores.open(tmp_path / "h.h5") as s:
        x = s.features(kind="last4")
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, feats["last4"], rtol=1e-3, atol=1e-3)
        v = s.views(kind="cls")
        assert v.shape == (3, n_train, 8) and v.dtype == np.float32
        np.testing.assert_allclose(v, views["cls"], rtol=1e-3, atol=1e-3)
        assert s.n_views == 3
    with h5py.File(tmp_path / "h.h5", "r") as f:
        assert f["features/cls"].dtype == np.float16


@pytest.mark.parametrize("max_runs", [64, 2])
def test_non_contiguous_splits(tmp_path, monkeypatch, max_runs):
    import credanno.stores.reader as reader

    monkeypatch.setattr(reader, "_MAX_RUNS", max_runs)  # 2: the block-wise path
    monkeypatch.setattr(reader, "_BLOCK_BYTES", 640)  # several blocks of 20 rows
    table = synthetic_table(n_nodules=100, per_nodule=2, seed=4)
    order = np.random.default_rng(3).permutation(len(table))
    shuffled = table.iloc[order].reset_index(drop=True)
    x = synthetic_features(shuffled, dim=8, seed=5)
    stores.save(tmp_path / "mixed.h5", {"cls": x}, shuffled)
    with stores.open(tmp_path / "mixed.h5") as s:
        for split in ("train", "test"):
            mask = shuffled["split"].to_numpy() == split
            np.testing.assert_array_equal(s.features(split), x[mask])
            np.testing.assert_array_equal(s.labels("malignancy", split),
                                          shuffled["malignancy"].to_numpy()[mask])
            pd.testing.assert_frame_equal(
                s.table(split), shuffled[mask].reset_index(drop=True), check_dtype=False)


def test_opening_reads_no_feature_data(store_path, monkeypatch):
    reads = []
    real_getitem, real_read_direct = h5py.Dataset.__getitem__, h5py.Dataset.read_direct

    def getitem(self, *a, **k):
        reads.append(self.name)
        return real_getitem(self, *a, **k)

    def read_direct(self, *a, **k):
        reads.append(self.name)
        return real_read_direct(self, *a, **k)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
    monkeypatch.setattr(h5py.Dataset, "read_direct", read_direct)
    with stores.open(store_path) as s:
        _ = (s.n, s.dim, s.feature_sets, s.label_names, s.provenance, s.dims)
        s.labels("malignancy", "train")
        s.table("test")
        assert not [r for r in reads if r.startswith("/features")]
        s.features("test", kind="last4")
        assert [r for r in reads if r.startswith("/features")] == ["/features/last4"]


def _read_split(args):
    store, split = args
    if isinstance(store, str):
        store = stores.open(store)
    with store:
        return store.features(split=split, kind="last4"), os.getpid()


def test_concurrent_readers_and_reader_beside_writer(tmp_path, store_path, table, feats):
    # A writer of another file is open (and half written) while readers run in processes.
    w = stores.create(tmp_path / "other.h5", table, {"cls": 8}, PROV)
    w.append({"cls": feats["cls"][:20]})
    train = table["split"].to_numpy() == "train"
    with stores.open(store_path) as s:
        jobs = [(s, "train"), (str(store_path), "test"), (str(store_path), "train"),
                (s, None)]
        with mp.get_context("spawn").Pool(2) as pool:
            results = pool.map(_read_split, jobs)
        np.testing.assert_array_equal(s.features("train", "last4"), feats["last4"][train])
    assert len({pid for _, pid in results}) >= 1 and os.getpid() not in {p for _, p in results}
    expected = [feats["last4"][train], feats["last4"][~train], feats["last4"][train],
                feats["last4"]]
    for (got, _), want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    w.append({"cls": feats["cls"][20:]})
    w.close()
    with stores.open(tmp_path / "other.h5") as o:
        np.testing.assert_array_equal(o.features(), feats["cls"])


def test_rewriting_a_store_keeps_open_readers_working(store_path, table, feats):
    reader = stores.open(store_path)
    w = stores.create(store_path, table, {"cls": 8}, {"encoder": {"arch": "new"}})
    w.append({"cls": feats["cls"] + 1})
    np.testing.assert_array_equal(reader.features(), feats["cls"])  # old file still there
    w.close()
    np.testing.assert_array_equal(reader.features(), feats["cls"])  # renamed over: old inode
    reader.close()
    with stores.open(store_path) as s:
        np.testing.assert_array_equal(s.features(), feats["cls"] + 1)
    with pytest.raises(CredannoError, match="closed"):
        reader.features()


def test_fork_reopens_its_own_handle(store_path, feats):
    s = stores.open(store_path)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put(s.features(kind="cls").sum()))
    p.start()
    got = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0
    assert got == pytest.approx(feats["cls"].sum())
    np.testing.assert_array_equal(s.features(kind="cls"), feats["cls"])
    s.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_refused_and_nothing_left(tmp_path, table, feats, bad):
    x = feats["cls"].copy()
    x[5, 3] = bad
    with pytest.raises(CredannoError, match="NaN or Inf"):
        stores.save(tmp_path / "bad.h5", {"cls": x}, table)
    assert list(tmp_path.iterdir()) == []


def test_writer_bad_inputs(tmp_path, table, feats, store_path):
    before = store_path.read_bytes()
    cases = [
        (lambda w: w.append({"cls": feats["cls"][:5, :4]}), "expected"),
        (lambda w: w.append({"last4": feats["last4"][:5]}), "every feature set"),
        (lambda w: w.append({"cls": feats["cls"], "x": feats["cls"]}), "every feature set"),
        (lambda w: w.append({"cls": np.concatenate([feats["cls"]] * 2)}), "too many rows"),
        (lambda w: w.append_views({"cls": feats["cls"][None]}), "views=0"),
        (lambda w: w.close(), "incomplete"),
    ]
    for action, match in cases:
        w = stores.create(store_path, table, {"cls": 8}, PROV)
        w.append({"cls": feats["cls"][:5]})
        with pytest.raises(CredannoError, match=match):
            action(w)
        assert store_path.read_bytes() == before  # the old store is untouched
    with pytest.raises(CredannoError, match="overflow float16"):
        stores.save(tmp_path / "d.h5", {"cls": feats["cls"] * 1e6}, table, dtype="float16")
    with pytest.raises(CredannoError, match="dtype"):
        stores.create(tmp_path / "d.h5", table, {"cls": 8}, dtype="int8")
    with pytest.raises(CredannoError, match="at least one feature set"):
        stores.create(tmp_path / "d.h5", table, {})
    with pytest.raises(CredannoError, match="lacks columns"):
        stores.create(tmp_path / "d.h5", table.drop(columns=["malignancy"]), {"cls": 8})
    with pytest.raises(CredannoError, match="2-D"):
        stores.save(tmp_path / "d.h5", {"cls": feats["cls"][0]}, table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_exception_or_interrupt_leaves_no_store(tmp_path, table, feats):
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with stores.create(tmp_path / "x.h5", table, {"cls": 8}) as w:
                w.append({"cls": feats["cls"][:10]})
                raise exc
    w = stores.create(tmp_path / "y.h5", table, {"cls": 8})
    w.append({"cls": feats["cls"][:10]})
    del w  # dropped without close(): its temp file goes too
    assert list(tmp_path.iterdir()) == []


def test_bad_files_give_one_line(tmp_path, store_path, tiny_patch_file):
    def fails(path, match):
        with pytest.raises(CredannoError, match=match) as info:
            stores.open(path)
        assert "\n" not in str(info.value)

    fails(tmp_path / "missing.h5", "not found; create it with `credanno embed`")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(store_path.read_bytes()[: store_path.stat().st_size // 2])
    fails(truncated, "truncated or corrupt")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(os.urandom(4096))
    fails(junk, "truncated or corrupt")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    fails(foreign, "not a credanno feature store")
    fails(tiny_patch_file, "is a patch file, not a feature store")
    newer = tmp_path / "newer.h5"
    newer.write_bytes(store_path.read_bytes())
    with h5py.File(newer, "a") as f:
        f.attrs["schema_version"] = stores.SCHEMA_VERSION + 1
    fails(newer, "newer than this credanno reads.*upgrade credanno")
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(store_path.read_bytes())
    with h5py.File(damaged, "a") as f:
        del f["features/last4"]
    fails(damaged, "damaged or incomplete")
    wrong = tmp_path / "wrong.h5"
    wrong.write_bytes(store_path.read_bytes())
    with h5py.File(wrong, "a") as f:
        f.attrs["provenance"] = "{not json"
    fails(wrong, "not valid JSON")


def test_reader_bad_arguments(store_path):
    with stores.open(store_path) as s:
        with pytest.raises(CredannoError, match="no feature set 'last8'; available: cls, last4"):
            s.features(kind="last8")
        with pytest.raises(CredannoError, match="unknown split 'val'"):
            s.features(split="val")
        with pytest.raises(CredannoError, match="valid labels"):
            s.labels("roundness")
        with pytest.raises(CredannoError, match="training rows only"):
            s.views(split="test")
        with pytest.raises(CredannoError, match="unknown table columns"):
            s.table(columns=["nope"])


def test_check_compatible_names_the_difference(tmp_path, table, feats):
    a = stores.save(tmp_path / "a.h5", {"cls": feats["cls"]}, table, PROV)
    same = stores.save(tmp_path / "same.h5", {"cls": feats["cls"]}, table, PROV)
    stores.check_compatible(a, same)
    other = {**PROV, "encoder": {**PROV["encoder"], "sha256": "c" * 64, "which": "student"}}
    b = stores.save(tmp_path / "b.h5", {"cls": feats["cls"]}, table, other)
    with pytest.raises(CredannoError, match="encoder.sha256 aaaa.*encoder.which teacher vs "
                                            "student"):
        stores.check_compatible(a, b)
    moved = {**PROV, "patch_file": {"path": "elsewhere.h5", "sha256": "b" * 64}}
    stores.check_compatible(PROV, moved)  # same bytes elsewhere: compatible
    with stores.open(a) as sa:
        with pytest.raises(CredannoError, match="patch_file.sha256"):
            stores.check_compatible(sa, {**PROV, "patch_file": {"sha256": "d" * 64}})


def test_latest(tmp_path, table, feats):
    with pytest.raises(CredannoError, match="no feature store under"):
        stores.latest(tmp_path)
    a = stores.save(tmp_path / "a.h5", {"cls": feats["cls"]}, table)
    b = stores.save(tmp_path / "b.h5", {"cls": feats["cls"]}, table)
    os.utime(a, (1, 1))
    assert stores.latest(tmp_path) == b


def test_locking_switch(store_path, monkeypatch):
    monkeypatch.setenv(stores.LOCKING_ENV, "0")
    assert stores.hdf5_locking() is False
    with stores.open(store_path) as s:
        assert s.features().shape[0] == s.n
    monkeypatch.setenv(stores.LOCKING_ENV, "best-effort")
    assert stores.hdf5_locking() == "best-effort"
    monkeypatch.setenv(stores.LOCKING_ENV, "maybe")
    with pytest.raises(CredannoError, match="CREDANNO_HDF5_LOCKING"):
        stores.open(store_path)
    monkeypatch.delenv(stores.LOCKING_ENV)
    assert stores.hdf5_locking() is None
    with stores.open(store_path, locking=False) as s:
        assert s.n > 0


def test_compressed_store_is_chunked_by_rows(tmp_path, table, feats):
    n_train = int((table["split"] == "train").sum())
    views = {k: np.ones((2, n_train, v.shape[1]), np.float32) for k, v in feats.items()}
    path = stores.save(tmp_path / "z.h5", feats, table, PROV, views=views, compression="gzip")
    with h5py.File(path, "r") as f:
        assert f["features/last4"].compression == "gzip"
        assert f["features/last4"].chunks[1] == 32
        assert f["views/cls"].chunks[0] == 1
    with stores.open(path) as s:
        np.testing.assert_array_equal(s.features("test", "last4"),
                                      feats["last4"][table["split"].to_numpy() == "test"])
        np.testing.assert_array_equal(s.views(kind="cls"), views["cls"])


def test_lock_failures_point_to_the_switch(store_path, table, tmp_path, monkeypatch):
    import credanno.stores.schema as schema

    def no_locks(*a, **k):
        raise OSError("Unable to synchronously open file (unable to lock file, errno = 37, "
                      "error message = 'No locks available')")

    monkeypatch.setattr(schema.h5py, "File", no_locks)
    with pytest.raises(CredannoError, match="CREDANNO_HDF5_LOCKING=0"):
        stores.open(store_path)
    with pytest.raises(CredannoError, match="cannot create .*CREDANNO_HDF5_LOCKING=0"):
        stores.create(tmp_path / "n.h5", table, {"cls": 8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_provenance_must_be_json(tmp_path, table, feats):
    with pytest.raises(CredannoError, match="provenance cannot be stored"):
        stores.save(tmp_path / "p.h5", {"cls": feats["cls"]}, table, {"model": object()})
    assert list(tmp_path.iterdir()) == []
