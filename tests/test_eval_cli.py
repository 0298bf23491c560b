"""Store-level and command-line tests of `credanno knn` and `credanno probe`."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from credanno import stores
from credanno.cli import cli
from credanno.errors import CredannoError, CredannoWarning
from credanno.eval import knn_sweep, probe_sweep
from credanno.eval.results import RESULT_COLUMNS
from credanno.eval.specs import KnnSpec, ProbeSpec, SubsetSpec
from credanno.synthetic import synthetic_features, synthetic_table

PROV = {"encoder": {"kind": "synthetic", "arch": "none", "sha256": "a" * 64}}


def _store(path, table=None, provenance=PROV, views=False):
    table = synthetic_table(n_nodules=40, per_nodule=3, seed=0) if table is None else table
    feats = {"cls": synthetic_features(table, dim=16, signal=2.0),
             "last4": synthetic_features(table, dim=24, signal=2.0, seed=1)}
    v = None
    if views:
        n_train = int((table["split"] == "train").sum())
        v = {k: np.stack([f[:n_train] * 1.01, f[:n_train] * 0.99]) for k, f in feats.items()}
    return stores.save(path, features=feats, table=table, provenance=provenance, views=v)


@pytest.fixture
def store_path(tmp_path):
    return _store(tmp_path / "s.h5")


def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=True)


def test_knn_sweep_store_blocked_equals_in_memory(store_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CredannoWarning)
        subsets = SubsetSpec(fracs=[0.3, 1], seeds=[0, 1])
        a = knn_sweep(store_path, subsets, KnnSpec(ks=[3, 10]))
        b = knn_sweep(store_path, subsets, KnnSpec(ks=[3, 10], block_rows=7))
    pd.testing.assert_frame_equal(a.results, b.results)
    assert list(a.results.columns) == list(RESULT_COLUMNS)


def test_probe_sweep_store_uses_last4_and_views(tmp_path):
    path = _store(tmp_path / "v.h5", views=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CredannoWarning)
        r = probe_sweep(path, SubsetSpec(fracs=[1]), ProbeSpec(recipe="paper", epochs=3),
                        labels=["malignancy", "texture"])
        tuned = probe_sweep(path, SubsetSpec(fracs=[1]), labels=["malignancy"])
    assert r.config["kind"] == "last4" and r.config["views"] == 2
    assert set(r.results["label"]) == {"malignancy", "texture"}
    assert tuned.config["recipe"] == "tuned" and tuned.config["views"] == 0


def test_train_and_test_stores_must_share_provenance(tmp_path, store_path):
    other = _store(tmp_path / "o.h5", provenance={"encoder": {"kind": "synthetic",
                                                              "arch": "vit", "sha256": "b"}})
    with pytest.raises(CredannoError, match="differ"):
        knn_sweep(store_path, knn=KnnSpec(ks=[3]), test_store=other)
    same = _store(tmp_path / "same.h5")
    r = knn_sweep(store_path, knn=KnnSpec(ks=[3]), test_store=same, labels=["malignancy"])
    assert len(r.results) == 1


def test_store_without_labels_for_a_requested_label(tmp_path):
    t = synthetic_table(n_nodules=40, per_nodule=3, seed=0)
    t["texture"] = -1
    path = _store(tmp_path / "nolab.h5", table=t)
    with pytest.raises(CredannoError, match="no training labels for 'texture'"):
        knn_sweep(path, knn=KnnSpec(ks=[3]), labels=["texture"])
    r = knn_sweep(path, knn=KnnSpec(ks=[3]), labels=None)  # default: every label the store has
    assert "texture" not in set(r.results["label"])


def test_cli_knn_json_csv_predictions(store_path, tmp_path):
    csv, pred = tmp_path / "r.csv", tmp_path / "p.csv"
    res = _run(["knn", "--store", str(store_path), "--k", "3,5", "--frac", "0.5,1",
                "--seeds", "0-1", "--json", "--csv", str(csv), "--predictions", str(pred)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) == {"results", "summary", "config"}
    rec = out["results"][0]
    assert set(RESULT_COLUMNS) <= set(rec) and len(rec["ci95"]) == 2
    assert len(out["results"]) == 9 * 2 * 2 * 2 and len(out["summary"]) == 9 * 2 * 2
    df = pd.read_csv(csv)
    assert {"ci95_lo", "ci95_hi", "acc", "baseline_acc"} <= set(df.columns)
    p = pd.read_csv(pred)
    assert {"annotation_id", "malignancy_true", "malignancy_pred", "malignancy_p1"} <= set(p)
    n_test = int((synthetic_table(n_nodules=40, per_nodule=3, seed=0)["split"] == "test").sum())
    assert len(p) == 2 * 2 * 2 * n_test  # configurations x test images
    assert not list(tmp_path.glob(".*.part"))


def test_cli_probe_table_and_default_store(store_path, tmp_path, monkeypatch):
    (tmp_path / "stores").mkdir()
    store_path.rename(tmp_path / "stores" / "s.h5")
    monkeypatch.chdir(tmp_path)
    res = _run(["probe", "--frac", "0.5", "--epochs", "3", "--n-seeds", "2"])
    assert res.exit_code == 0, res.output
    assert "probe" in res.stdout and "baseline" in res.stdout and "+/-" in res.stdout
    res = _run(["probe", "--frac", "1", "--epochs", "2", "--json", "--labels", "malignancy"])
    rec = json.loads(res.stdout)["results"][0]
    assert rec["k"] is None and rec["method"] == "probe"
    res = _run(["knn", "--k", "5", "--frac", "0.5", "--n-seeds", "1"])
    assert res.exit_code == 0 and "knn" in res.stdout


@pytest.mark.parametrize("args,msg", [
    (["knn", "--k", "0"], "positive"),
    (["knn", "--frac", "0"], "(0, 1]"),
    (["knn", "--labels", "colour"], "valid labels: malignancy"),
    (["probe", "--frac", "1.5"], "(0, 1]"),
    (["probe", "--kind", "nope", "--epochs", "1"], "no feature set 'nope'"),
    (["knn", "--block-rows", "0"], "--block-rows must be positive"),
])
def test_cli_errors_name_the_problem(store_path, args, msg, capsys):
    from credanno.cli import main

    with pytest.raises(SystemExit):
        main([*args, "--store", str(store_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and msg in err[0]


def test_class_without_examples_warns_and_goes_on(store_path):
    with pytest.warns(CredannoWarning, match="without labelled examples"):
        r = knn_sweep(store_path, SubsetSpec(fracs=[0.05]), KnnSpec(ks=[1]))
    assert len(r.results) == 9
