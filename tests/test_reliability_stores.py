"""Issue 10 (reliability), items 1, 3 and 6: damaged patch files and stores are refused with
one line, and a store reads one file for its whole life (fork, spawn)."""

import multiprocessing as mp
import re
import shutil

import h5py
import numpy as np
import pytest
from helpers import cli_error

from credanno import stores
from credanno.data.patchfile import read_patch_file, write_patch_file
from credanno.errors import CredannoError
from credanno.synthetic import synthetic_features, synthetic_images, synthetic_table

PROV = {"encoder": {"kind": "synthetic", "arch": "none", "sha256": "a" * 64}}


@pytest.fixture
def table():
    return synthetic_table(n_nodules=40, per_nodule=3, seed=0)  # 120 rows


@pytest.fixture
def store_path(tmp_path, table):
    feats = {"cls": synthetic_features(table, dim=8), "last4": synthetic_features(table, dim=12)}
    return stores.save(tmp_path / "s.h5", feats, table, PROV)


def _rewrite(group: h5py.Group, name: str, data: np.ndarray, dtype=None) -> None:
    """Re-create a dataset (h5py cannot shrink a fixed-size one in place)."""
    dtype = dtype if dtype is not None else group[name].dtype
    del group[name]
    group.create_dataset(name, data=data, dtype=dtype)


# -- item 1: patch files ----------------------------------------------------------------------

def _damage_patch(path, how: str) -> None:
    with h5py.File(path, "a") as f:
        n = f["table"]["split"].shape[0]
        if how == "fewer_images":
            _rewrite(f, "images", f["images"][:100])
        elif how == "no_images":
            del f["images"]
        elif how == "no_table":
            del f["table"]
        elif how == "non_square":
            _rewrite(f, "images", f["images"][:, :, :30])
        elif how == "flat_images":
            _rewrite(f, "images", f["images"][...].reshape(n, -1))
        elif how == "short_column":
            _rewrite(f["table"], "diameter", f["table"]["diameter"][: n - 7])
        elif how == "unknown_split":
            split = f["table"]["split"].asstr()[...]
            split[5] = "val"
            _rewrite(f["table"], "split", split.astype(object), h5py.string_dtype())


PATCH_DAMAGE = {
    "fewer_images": "holds 100 images but the table has 120 rows",
    "no_images": "no /images dataset",
    "no_table": "no /table group",
    "non_square": "32 x 30 pixels, not square",
    "flat_images": r"not \(N, H, W\)",
    "short_column": "'diameter' has 113 rows",
    "unknown_split": r"split column has values \['val'\]",
}


@pytest.fixture
def patch_file(tmp_path, table):
    path = tmp_path / "patches.h5"
    write_patch_file(path, synthetic_images(table), table, {"source": "synthetic"})
    return path


@pytest.mark.parametrize("how", list(PATCH_DAMAGE))
def test_damaged_patch_file_is_refused_with_one_line(patch_file, how):
    _damage_patch(patch_file, how)
    for images in (True, False):
        with pytest.raises(CredannoError, match=PATCH_DAMAGE[how]) as info:
            read_patch_file(patch_file, images=images)
        msg = str(info.value)
        assert "\n" not in msg and str(patch_file) in msg and "credanno prepare" in msg


def test_patch_file_non_square_refused_at_write(tmp_path, table):
    with pytest.raises(CredannoError, match="square"):
        write_patch_file(tmp_path / "p.h5", np.zeros((len(table), 32, 30), np.float32), table)
    assert not (tmp_path / "p.h5").exists()


@pytest.mark.parametrize("how", ["fewer_images", "short_column", "non_square"])
def test_embed_refuses_damaged_patch_file(patch_file, tmp_path, capsys, how):
    _damage_patch(patch_file, how)
    out = tmp_path / "store.h5"
    line = cli_error(capsys, ["embed", "--encoder", "pixels", "--data", str(patch_file),
                               "--out", str(out), "--quiet"])
    assert "credanno prepare" in line and str(patch_file) in line
    assert not out.exists()  # the old code wrote 2,573 all-zero rows here and exited 0


@pytest.mark.parametrize("how", ["fewer_images", "no_images", "non_square"])
def test_pretrain_refuses_damaged_patch_file(patch_file, tmp_path, capsys, how):
    _damage_patch(patch_file, how)
    line = cli_error(capsys, ["pretrain", "--preset", "cpu-tiny", "--data", str(patch_file),
                               "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                               "--out", str(tmp_path / "run"), "--no-progress"])
    assert re.search(PATCH_DAMAGE[how], line)
    assert "credanno prepare" in line


def test_patch_file_has_a_content_id(patch_file, tmp_path, table):
    first = read_patch_file(patch_file, images=False).attrs["content_id"]
    again = write_patch_file(tmp_path / "again.h5", synthetic_images(table), table)
    second = read_patch_file(again, images=False).attrs["content_id"]
    assert len(first) == 32 and int(first, 16) >= 0 and first != second


# -- item 6: malformed stores -----------------------------------------------------------------

def _damage_store(path, how: str) -> None:
    with h5py.File(path, "a") as f:
        t = f["table"]
        n = int(f.attrs["n_rows"])
        if how == "short_column":
            _rewrite(t, "malignancy", t["malignancy"][: n - 5])
        elif how == "all_columns_short":
            for col in list(t):
                _rewrite(t, col, t[col][:60])
        elif how == "provenance_list":
            f.attrs["provenance"] = "[1, 2]"
        elif how == "provenance_string":
            f.attrs["provenance"] = '"text"'
        elif how == "feature_sets_list":
            f.attrs["feature_sets"] = '["cls", "last4"]'
        elif how == "feature_sets_str_dim":
            f.attrs["feature_sets"] = '{"cls": "8", "last4": 12}'
        elif how == "feature_sets_zero_dim":
            f.attrs["feature_sets"] = '{"cls": 0}'
        elif how == "unknown_split":
            split = t["split"].asstr()[...]
            split[[3, 90]] = ["val", "validation"]
            _rewrite(t, "split", split.astype(object), h5py.string_dtype())
        elif how == "n_rows_text":
            f.attrs["n_rows"] = "many"
        elif how == "features_short":
            _rewrite(f["features"], "cls", f["features"]["cls"][: n - 1])


STORE_DAMAGE = {
    "short_column": "'malignancy' has 115 rows.*n_rows says 120",
    "all_columns_short": "'annotation_id' has 60 rows.*n_rows says 120",
    "provenance_list": "'provenance' is list.*not a JSON object",
    "provenance_string": "'provenance' is str.*not a JSON object",
    "feature_sets_list": "'feature_sets' is list",
    "feature_sets_str_dim": "'feature_sets' is dict",
    "feature_sets_zero_dim": "'feature_sets' is dict",
    "unknown_split": r"split column has values \['val', 'validation'\]",
    "n_rows_text": "'n_rows' is 'many', not an integer",
    "features_short": r"feature set 'cls' has shape \(119, 8\), expected \(120, 8\)",
}


@pytest.mark.parametrize("how", list(STORE_DAMAGE))
def test_damaged_store_is_refused_at_open(store_path, how):
    """Refused at open; the split column (costly to read) on its first use, before any
    split-based read could drop rows."""
    _damage_store(store_path, how)
    with pytest.raises(CredannoError, match=STORE_DAMAGE[how]) as info:
        with stores.open(store_path) as s:
            s.rows("train")
    msg = str(info.value)
    assert "\n" not in msg and str(store_path) in msg and "credanno embed" in msg


def test_store_views_of_the_wrong_shape_are_refused(tmp_path, table):
    x = synthetic_features(table, dim=8)
    n_train = int((table["split"] == "train").sum())
    path = stores.save(tmp_path / "v.h5", {"cls": x}, table, PROV,
                       views={"cls": np.stack([x[:n_train]] * 2)})
    with h5py.File(path, "a") as f:
        f.attrs["n_views"] = 3
    with stores.open(path) as s, pytest.raises(
            CredannoError, match=r"views 'cls' have shape \(2, \d+, 8\), expected"):
        s.views(kind="cls")


@pytest.mark.parametrize("how", ["short_column", "all_columns_short", "provenance_list",
                                 "unknown_split"])
@pytest.mark.parametrize("command", ["knn", "probe", "tsne"])
def test_eval_commands_refuse_damaged_store(store_path, tmp_path, capsys, monkeypatch,
                                            how, command):
    monkeypatch.setenv("CREDANNO_CACHE", str(tmp_path / "cache"))
    _damage_store(store_path, how)
    args = {"knn": ["knn", "--store", str(store_path), "--k", "3", "--n-seeds", "1"],
            "probe": ["probe", "--store", str(store_path), "--epochs", "1", "--n-seeds", "1",
                      "--device", "cpu"],
            "tsne": ["tsne", "--store", str(store_path), "--out", str(tmp_path / "t.png")]}
    line = cli_error(capsys, args[command])
    assert "damaged store" in line and "credanno embed" in line
    assert not (tmp_path / "t.png").exists()


def test_valid_store_still_opens_and_reads(store_path, table):
    with stores.open(store_path) as s:
        assert s.n == len(table) and s.dims == {"cls": 8, "last4": 12}
        assert len(s.rows("train")) + len(s.rows("test")) == len(table)
        assert len(s.content_id) == 32


# -- item 3: one file for the store's whole life ----------------------------------------------

def _replace(path, n_nodules: int = 20) -> None:
    """Write another store to ``path`` (fewer rows, other values), as a re-embed would."""
    other = synthetic_table(n_nodules=n_nodules, per_nodule=2, seed=9)
    stores.save(path, {"cls": synthetic_features(other, dim=8, seed=9) + 100}, other, PROV)


def _sum_cls(store) -> tuple[str, object]:
    try:
        return "ok", float(store.features(split="test", kind="cls").sum())
    except CredannoError as exc:
        return "error", str(exc)
    except Exception as exc:  # noqa: BLE001 - the old code raised raw TypeErrors here
        return "crash", repr(exc)


def _in_fork(store) -> tuple[str, object]:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put(_sum_cls(store)))
    p.start()
    got = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0
    return got


def test_forked_worker_refuses_a_replaced_file(store_path):
    s = stores.open(store_path)
    want = float(s.features(split="test", kind="cls").sum())
    assert _in_fork(s) == ("ok", pytest.approx(want))  # unchanged file: works
    _replace(store_path)
    status, msg = _in_fork(s)
    assert status == "error", msg
    assert "was replaced since it was opened" in msg and "stores.open" in msg
    assert "\n" not in msg
    assert s.features(split="test", kind="cls").sum() == pytest.approx(want)  # parent: old file
    s.close()


def test_spawned_worker_refuses_a_replaced_file(store_path):
    s = stores.open(store_path)
    want = float(s.features(split="test", kind="cls").sum())
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_sum_cls, (s,)) == ("ok", pytest.approx(want))
        _replace(store_path)
        status, msg = pool.apply(_sum_cls, (s,))
        assert status == "error", msg
        assert "was replaced since it was opened" in msg
        # not a raw error while unpickling, which would kill the pool's worker
        assert pool.apply(_sum_cls, (s,))[0] == "error"
    s.close()


def test_fork_after_removal_or_junk_is_one_line(store_path, tmp_path):
    s = stores.open(store_path)
    store_path.unlink()
    status, msg = _in_fork(s)
    assert status == "error" and "was removed since it was opened" in msg
    store_path.write_bytes(b"\0" * 4096)
    status, msg = _in_fork(s)
    assert status == "error" and "was replaced since it was opened" in msg
    s.close()


def test_store_of_an_older_version_without_content_id(store_path, tmp_path):
    with h5py.File(store_path, "a") as f:
        del f.attrs["content_id"]
    s = stores.open(store_path)
    assert s.content_id is None
    want = float(s.features(split="test", kind="cls").sum())
    assert _in_fork(s) == ("ok", pytest.approx(want))  # falls back to inode + size
    moved = tmp_path / "moved.h5"
    shutil.copy(store_path, moved)
    moved.replace(store_path)  # same bytes, another file
    assert _in_fork(s)[0] == "error"
    s.close()


def test_writer_stamps_a_content_id(tmp_path, table):
    x = {"cls": synthetic_features(table, dim=8)}
    a = stores.save(tmp_path / "a.h5", x, table, PROV)
    b = stores.save(tmp_path / "b.h5", x, table, PROV)
    with stores.open(a) as sa, stores.open(b) as sb:
        assert sa.content_id and sb.content_id and sa.content_id != sb.content_id
    with h5py.File(a, "r") as f:
        assert f.attrs["content_id"] == sa.content_id
