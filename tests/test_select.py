"""`credanno select` and the label-free selection strategies (kmeans, typiclust, probcover,
coreset): deterministic, train-only, label-free, exact budgets, nodule units, complementing
a labelled set, the CLI's CSV + JSON sidecar, the round trip into `probe --subset-file`,
and one-line errors."""

import json

import numpy as np
import pandas as pd
import pytest
from helpers import cli_error

from credanno import stores
from credanno.cli import main
from credanno.eval import KnnSpec, SubsetSpec, draw_subsets, knn_sweep
from credanno.eval.selection import COLUMNS, select
from credanno.eval.strategies import LABEL_COLUMNS
from credanno.synthetic import synthetic_features, synthetic_table

PROV = {"encoder": {"kind": "synthetic", "arch": "none", "sha256": "a" * 64}}
NEW = ("kmeans", "typiclust", "probcover", "coreset")
ALL = ("random", *NEW)


@pytest.fixture(scope="module")
def table():
    return synthetic_table(n_nodules=60, per_nodule=3, seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory, table):
    path = tmp_path_factory.mktemp("sel") / "s.h5"
    feats = {"cls": synthetic_features(table, dim=16, signal=2.0)}
    return stores.save(path, features=feats, table=table, provenance=PROV)


@pytest.fixture(scope="module")
def scrambled(tmp_path_factory, table):
    """The same store with every label column shuffled (features and ids unchanged)."""
    rng = np.random.default_rng(7)
    t = table.copy()
    for col in LABEL_COLUMNS:
        if col in t.columns:
            t[col] = rng.permutation(t[col].to_numpy())
    path = tmp_path_factory.mktemp("scr") / "s.h5"
    feats = {"cls": synthetic_features(table, dim=16, signal=2.0)}
    return stores.save(path, features=feats, table=t, provenance=PROV)


def _train(store):
    with stores.open(store) as s:
        return s.table("train").reset_index(drop=True), s.features("train", "cls")


@pytest.mark.parametrize("name", ALL)
def test_deterministic_train_only_label_free_exact_budget(name, store, scrambled, table):
    a = select(store, name, 9, seed=3, device="cpu")
    b = select(store, name, 9, seed=3, device="cpu")
    pd.testing.assert_frame_equal(a.table, b.table)
    assert len(a.table) == 9 and list(a.table.columns) == list(COLUMNS)
    assert a.table["rank"].tolist() == list(range(1, 10))
    train_ids = set(table.loc[table["split"] == "train", "annotation_id"])
    assert set(a.table["annotation_id"]) <= train_ids
    c = select(scrambled, name, 9, seed=3, device="cpu")
    pd.testing.assert_frame_equal(a.table, c.table)  # labels scrambled: same picks, scores


@pytest.mark.parametrize("name", NEW)
def test_seeds_vary_and_draw_subsets_agree(name, store):
    train, x = _train(store)
    spec = SubsetSpec(fracs=(0.1,), seeds=(0, 1), strategy=name)
    drawn = draw_subsets(spec, train, x)
    assert all(len(s.rows) == round(0.1 * len(train)) for s in drawn)
    picks = select(store, name, frac=0.1, seed=1, device="cpu")
    assert sorted(picks.rows.tolist()) == drawn[1].rows.tolist()


@pytest.mark.parametrize("name", ("random", *NEW))
def test_per_nodule_one_image_each(name, store):
    picks = select(store, name, 12, per="nodule", seed=0, device="cpu")
    assert len(picks.table) == 12 and picks.table["nodule_id"].is_unique


@pytest.mark.parametrize("name", ("random", *NEW))
def test_per_whole_nodule(name, store):
    train, _ = _train(store)
    picks = select(store, name, 10, per="whole-nodule", seed=0, device="cpu")
    rows = set(picks.rows.tolist())
    nodules = set(train.loc[picks.rows, "nodule_id"])
    assert rows == set(np.flatnonzero(train["nodule_id"].isin(nodules)))  # whole nodules
    # counted against the budget: the last nodule may overshoot it, no more
    last = train.loc[picks.rows[-1], "nodule_id"]
    assert len(rows) >= 10 > len(rows) - (train["nodule_id"] == last).sum()


@pytest.mark.parametrize("name", ALL)
def test_complements_a_labelled_file(name, store, tmp_path):
    train, _ = _train(store)
    first = select(store, name, 6, seed=0, device="cpu")
    path = tmp_path / "labelled.csv"
    first.table.to_csv(path, index=False)
    more = select(store, name, 7, seed=0, labelled=path, device="cpu")
    assert len(more.table) == 7  # the budget counts new picks
    assert not set(more.table["annotation_id"]) & set(first.table["annotation_id"])
    assert more.params["labelled"]["n_images"] == 6
    once = select(store, name, 5, seed=0, labelled=path, per="nodule", device="cpu")
    assert not set(once.table["nodule_id"]) & set(first.table["nodule_id"])


def test_kmeans_is_the_image_nearest_each_spherical_centre(store):
    import faiss

    _, x = _train(store)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    km = faiss.Kmeans(xn.shape[1], 8, niter=20, seed=5, spherical=True,
                      min_points_per_centroid=1)
    km.train(np.ascontiguousarray(xn, dtype=np.float32))
    nearest = np.argmax(km.centroids @ xn.T, axis=1)
    assert len(set(nearest)) == 8  # distinct here, so no tie rule is involved
    picks = select(store, "kmeans", 8, seed=5, device="cpu")
    assert set(picks.rows.tolist()) == set(nearest.tolist())
    sims = (km.centroids @ xn.T).max(axis=1)
    assert np.allclose(np.sort(picks.table["score"]), np.sort(sims), atol=1e-5)


def test_coreset_starts_from_the_labelled_set(store, tmp_path):
    train, x = _train(store)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    labelled = np.array([0, 5, 17])
    picks = select(store, "coreset", 2, labelled=labelled, device="cpu")
    dist = 1 - (xn @ xn[labelled].T).max(axis=1)
    assert picks.rows[0] == np.argmax(dist)  # the farthest image from the labelled ones
    assert picks.table["score"][0] == pytest.approx(dist.max(), abs=1e-5)


def test_cli_select_then_probe_subset_file(store, tmp_path, capsys):
    out = tmp_path / "picks.csv"
    main(["select", "--strategy", "kmeans", "--frac", "0.1", "--store", str(store),
          "--device", "cpu", "--out", str(out)])
    df = pd.read_csv(out)
    assert list(df.columns) == list(COLUMNS) and df["rank"].tolist() == list(
        range(1, len(df) + 1))
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["strategy"] == "kmeans" and meta["budget"] == len(df) and meta["seed"] == 0
    assert meta["store"]["content_identity"].startswith("id:")
    assert meta["store"]["provenance"]["encoder"]["kind"] == "synthetic"
    capsys.readouterr()
    main(["probe", "--store", str(store), "--subset-file", str(out), "--seeds", "0",
          "--epochs", "2", "--kind", "cls", "--device", "cpu", "--labels", "malignancy",
          "--json"])
    result = json.loads(capsys.readouterr().out)
    assert {r["n_labelled"] for r in result["results"]} == {len(df)}


def test_knn_and_probe_accept_the_new_strategies(store, capsys):
    spec = SubsetSpec(fracs=(0.1,), seeds=(0, 1), strategy="typiclust")
    res = knn_sweep(store, spec, KnnSpec(ks=(5,)), labels=["malignancy"], n_boot=0)
    assert res.config["strategy"] == "typiclust" and len(res.results) == 2
    capsys.readouterr()
    main(["knn", "--store", str(store), "--strategy", "kmeans", "--frac", "0.1", "--k", "5",
          "--seeds", "0", "--labels", "malignancy", "--device", "cpu", "--json"])
    assert json.loads(capsys.readouterr().out)["config"]["strategy"] == "kmeans"


def test_bad_input_is_one_line(store, tmp_path, capsys, table):
    base = ["select", "--store", str(store), "--device", "cpu", "--out",
            str(tmp_path / "p.csv")]
    assert "--budget must be a positive" in cli_error(capsys, [*base, "--budget", "0"])
    n_train = int((table["split"] == "train").sum())
    err = cli_error(capsys, [*base, "--budget", str(n_train + 1)])
    assert f"exceeds the {n_train} unlabelled training images" in err
    err = cli_error(capsys, [*base, "--strategy", "nope", "--budget", "3"])
    assert "'nope'" in err and "kmeans" in err and "typiclust" in err
    test_ids = table.loc[table["split"] == "test", "annotation_id"].head(2)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"annotation_id": test_ids}).to_csv(bad, index=False)
    err = cli_error(capsys, [*base, "--budget", "3", "--labelled", str(bad)])
    assert "2 test images" in err
    err = cli_error(capsys, [*base, "--budget", "3", "--kind", "last4"])
    assert "no feature set 'last4'" in err and "--kind cls" in err
    assert "reads labels" in cli_error(capsys, [*base, "--strategy", "stratified",
                                                "--budget", "3"])
    assert "exactly one of" in cli_error(capsys, [*base])
    assert "one --frac" in cli_error(capsys, [*base, "--frac", "0.1,0.2"])
    assert not (tmp_path / "p.csv").exists()
