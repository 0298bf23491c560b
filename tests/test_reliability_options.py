"""Issue 10 (reliability round), items 8, 10 and part of 14: every number and option a
user passes is validated (one ``error:`` line naming the option, exit 2, no traceback, no
file written), batch sizes beyond the data are clamped with a warning, and the minor
output/option items."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from helpers import cli_error

from credanno import stores
from credanno.errors import CredannoError, CredannoWarning
from credanno.synthetic import synthetic_features, synthetic_images, synthetic_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A synthetic patch file and the store 'embedded' from it (provenance names both)."""
    from credanno.data.patchfile import write_patch_file

    root = tmp_path_factory.mktemp("opts")
    table = synthetic_table(n_nodules=40, per_nodule=3, seed=0)
    patch = write_patch_file(root / "patches.h5", synthetic_images(table), table,
                             {"source": "synthetic", "seed": 0})
    x = synthetic_features(table, dim=16, signal=2.0)
    store = stores.save(root / "store.h5",
                        features={"cls": x, "last4": np.concatenate([x, x], axis=1)},
                        table=table,
                        provenance={"data": {"path": str(patch), "source": "synthetic"}})
    return {"root": root, "patch": patch, "store": store, "table": table}


# -- item 8: zero counts are errors, not "use the preset" -------------------------------------

@pytest.mark.parametrize("cmd", [["demo"], ["bench", "table2"]])
def test_epochs_zero_is_an_error_not_the_preset(cmd, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    line = cli_error(capsys, [*cmd, "--epochs", "0", "--out", str(out)])
    assert "--epochs 0: must be >= 1" in line
    assert not out.exists()


@pytest.mark.parametrize("args,fragment", [
    (["probe", "--epochs", "0"], "--epochs 0: must be >= 1"),
    (["probe", "--epochs", "-3"], "--epochs -3: must be >= 1"),
    (["probe", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["probe", "--n-labels", "0"], "--n-labels 0: must be >= 1"),
    (["bench", "table1", "--probe-epochs", "0"], "--probe-epochs 0: must be >= 1"),
    (["bench", "fig4", "--cnn-epochs", "0"], "--cnn-epochs 0: must be >= 1"),
    (["bench", "fig4", "--k", "0"], "--k 0: must be >= 1"),
    (["bench", "fig4", "--cnn-size", "0"], "--cnn-size 0: must be in [8, 512]"),
    (["bench", "table2", "--cnn-epochs", "-1"], "--cnn-epochs -1: must be >= 1"),
    (["demo", "--n-seeds", "0"], "--n-seeds 0: must be in [1, 1000]"),
    (["embed", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["embed", "--views", "-1"], "--views -1: must be >= 0"),
])
def test_zero_and_negative_counts_are_errors(args, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fragment in cli_error(capsys, args)
    assert list(tmp_path.iterdir()) == []


# -- item 10: non-finite floats, seeds, devices -----------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["knn", "--T", "nan"], "--T nan: must be a finite number"),
    (["knn", "--T", "inf"], "--T inf: must be a finite number"),
    (["knn", "--T", "0"], "--T 0: must be in (0, inf)"),
    (["probe", "--lr", "nan"], "--lr nan: must be a finite number"),
    (["probe", "--lr", "1e30"], "--lr 1e+30: must be in (0, 10]"),
    (["probe", "--lr", "-1"], "--lr -1: must be in (0, 10]"),
    (["probe", "--val-frac", "1"], "--val-frac 1: must be in (0, 1)"),
    (["tsne", "--perplexity", "nan"], "--perplexity nan: must be a finite number"),
    (["tsne", "--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
    (["knn", "--n-seeds", "1000000000"], "--n-seeds 1000000000: must be in [1, 1000]"),
    (["knn", "--seeds", "0-1000000000"], "more than 1000"),
    (["probe", "--seeds", "0,4294967296"], "--seeds 4294967296: must be in [0, 4294967295]"),
    (["bench", "table1", "--n-seeds", "1000000000"], "must be in [1, 1000]"),
    (["bench", "table1", "--seeds", "0-1000000000"], "more than 1000"),
    (["knn", "--device", "tpu"], "--device 'tpu' is not a device; use cpu, cuda or cuda:N"),
    (["probe", "--device", "tpu"], "--device 'tpu' is not a device"),
    (["bench", "table1", "--device", "tpu"], "--device 'tpu' is not a device"),
    (["bench", "table2", "--device", "tpu"], "--device 'tpu' is not a device"),
    (["bench", "fig4", "--device", "tpu"], "--device 'tpu' is not a device"),
])
def test_bad_numbers_and_devices_fail_before_work(args, fragment, syn, tmp_path, capsys,
                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = [] if args[0] in ("bench",) and args[1] == "table2" else ["--store", str(syn["store"])]
    csv = [] if args[0] in ("tsne", "bench") else ["--csv", str(tmp_path / "r.csv")]
    assert fragment in cli_error(capsys, [*args, *store, *csv])
    assert list(tmp_path.iterdir()) == []  # no CSV, figure or results folder


@pytest.mark.parametrize("seed", ["-1", str(2**63 + 1)])
def test_prepare_seed_out_of_range(seed, tmp_path, capsys):
    out = tmp_path / "p.h5"
    line = cli_error(capsys, ["prepare", "--seed", seed, "--out", str(out)])
    assert f"--seed {seed}: must be in [0, 4294967295]" in line
    assert not out.exists()


def test_library_rejects_what_the_cli_rejects(syn):
    from credanno.data import prepare
    from credanno.eval.knn import knn_classify
    from credanno.eval.options import parse_seeds
    from credanno.eval.specs import KnnSpec, ProbeSpec, SubsetSpec
    from credanno.viz.tsne import tsne_map

    x = np.eye(4, dtype=np.float32)
    with pytest.raises(CredannoError, match="--T nan: must be a finite"):
        knn_classify(x, np.arange(4), x, [1], 4, T=math.nan)
    with pytest.raises(CredannoError, match="--T nan"):
        KnnSpec(ks=[3], T=math.nan)
    with pytest.raises(CredannoError, match="not a device"):
        KnnSpec(ks=[3], device="tpu")
    with pytest.raises(CredannoError, match=r"--lr 1e\+30: must be in \(0, 10\]"):
        ProbeSpec(epochs=1, lr=1e30)
    with pytest.raises(CredannoError, match="--lr nan"):
        ProbeSpec(epochs=1, lr=math.nan)
    with pytest.raises(CredannoError, match="not a device"):
        ProbeSpec(epochs=1, device="tpu")
    with pytest.raises(CredannoError, match="--seeds -1"):
        SubsetSpec(seeds=[-1])
    with pytest.raises(CredannoError, match="more than 1000"):
        SubsetSpec(seeds=range(1001))
    with pytest.raises(CredannoError, match="--seed -1"):
        tsne_map(syn["store"], seed=-1)
    with pytest.raises(CredannoError, match="--perplexity nan"):
        tsne_map(syn["store"], perplexity=math.nan)
    with pytest.raises(CredannoError, match="--seed 4294967296"):
        prepare(seed=2**32)
    with pytest.raises(CredannoError, match="more than 1000"):
        parse_seeds("0-1000000000")  # at once: the range is never walked


def test_device_resolver():
    import torch

    from credanno.runtime import check_device, resolve_device

    assert check_device(None) is None and check_device("CUDA:1") == "cuda:1"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(CredannoError, match="--device 'mps' is not a device; use cpu, cuda"):
        resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(CredannoError, match="torch sees no GPU"):
            resolve_device("cuda:0")


def test_encoder_option_patch_size_zero(tiny_patch_file, tmp_path, capsys):
    out = tmp_path / "s.h5"
    line = cli_error(capsys, ["embed", "--encoder", "timm:vit_tiny_patch16_224",
                           "--encoder-option", "img_size=32", "--encoder-option",
                           "patch_size=0", "--data", str(tiny_patch_file), "--out", str(out)])
    assert "--encoder-option patch_size=0: must be a positive whole number" in line
    line = cli_error(capsys, ["embed", "--encoder", "timm:vit_tiny_patch16_224",
                           "--encoder-option", "img_size=32", "--encoder-option",
                           "patch_size=64", "--data", str(tiny_patch_file), "--out", str(out)])
    assert "cannot run with --encoder-option settings" in line
    assert not out.exists()


# -- batch sizes beyond the data are clamped ---------------------------------------------------

def test_probe_batch_size_clamped_to_the_data(syn):
    from credanno.eval import probe_sweep
    from credanno.eval.specs import ProbeSpec

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = probe_sweep(syn["store"], probe=ProbeSpec(recipe="paper", epochs=2,
                                                      batch_size=100_000_000),
                        labels=["malignancy"])
    n_train = int((syn["table"]["split"] == "train").sum())
    msgs = [str(w.message) for w in caught if issubclass(w.category, CredannoWarning)]
    assert any(f"--batch-size 100000000 is larger than the {n_train} training rows" in m
               for m in msgs)
    assert r.config["batch_size"] == n_train
    # clamping is exactly training with one batch of all rows
    same = probe_sweep(syn["store"], probe=ProbeSpec(recipe="paper", epochs=2, batch_size=n_train),
                       labels=["malignancy"])
    pd.testing.assert_frame_equal(r.results, same.results)


def test_embed_batch_size_clamped_to_the_data(tiny_patch_file, tmp_path):
    from credanno.embed import embed

    with pytest.warns(CredannoWarning, match="--batch-size 100000000 is larger than the 120"):
        out = embed(tiny_patch_file, encoder="pixels", out=tmp_path / "s.h5",
                    batch_size=100_000_000)
    with stores.open(out) as s:
        assert s.n == 120


# -- item 14 (minor) ----------------------------------------------------------------------------

def test_unwritable_tsne_cache_warns_and_keeps_the_map(syn, tmp_path):
    from credanno.viz.tsne import tsne_map

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.warns(CredannoWarning, match="t-SNE map not cached"):
        m = tsne_map(syn["store"], perplexity=5, cache_root=blocker)
    assert m.coords.shape == (len(m.table), 2) and not m.cached


@pytest.mark.parametrize("option", ["--csv", "--predictions"])
def test_write_errors_name_the_option(option, syn, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = cli_error(capsys, ["knn", "--store", str(syn["store"]), "--k", "3", "--n-seeds", "1",
                           "--labels", "malignancy", option, str(blocker / "sub" / "r.csv")])
    assert line.endswith(f"choose a writable {option}")


def test_cnn_frac_errors_name_cnn_frac(syn, capsys):
    line = cli_error(capsys, ["bench", "fig4", "--store", str(syn["store"]), "--cnn-frac", "2"])
    assert "--cnn-frac 2:" in line


def test_fig4_data_must_be_the_stores_patch_file(syn, tmp_path, capsys):
    from credanno.bench.fig4 import check_patch_file
    from credanno.data.patchfile import file_sha256, write_patch_file

    other_table = synthetic_table(n_nodules=30, per_nodule=3, seed=5)
    other = write_patch_file(tmp_path / "other.h5", synthetic_images(other_table), other_table,
                             {"source": "synthetic", "seed": 0})
    line = cli_error(capsys, ["bench", "fig4", "--store", str(syn["store"]), "--data", str(other),
                           "--n-seeds", "1", "--out", str(tmp_path / "f.png")])
    assert f"--data {other} is not the patch file store store.h5 was embedded from" in line
    assert not (tmp_path / "f.png").exists()
    # with a recorded sha256, that decides; the store's own file passes
    prov = {"patch_file": {"path": str(syn["patch"]), "sha256": file_sha256(syn["patch"])}}
    check_patch_file(syn["patch"], prov, syn["store"], syn["table"])
    with pytest.raises(CredannoError, match="is not the patch file"):
        check_patch_file(other, prov, syn["store"], syn["table"])
    check_patch_file(syn["patch"], {}, syn["store"], syn["table"])  # tables equal


def test_bench_perf_on_an_empty_folder_is_an_error(tmp_path, capsys):
    line = cli_error(capsys, ["bench", "perf", "--dir", str(tmp_path)])
    assert f"no benchmark scripts (*.py) in {tmp_path}" in line
    (tmp_path / "norun.py").write_text("X = 1\n")
    line = cli_error(capsys, ["bench", "perf", "--dir", str(tmp_path)])
    assert "none of norun.py defines run(quick)" in line
