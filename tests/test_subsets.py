"""Label subsets, any of them: strategies, subset files, explicit rows and --where."""

import hashlib
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
from credanno.eval.data import EvalData
from credanno.eval.specs import KnnSpec, ProbeSpec, SubsetSpec
from credanno.eval.strategies import (
    LABEL_COLUMNS,
    STRATEGIES,
    Selection,
    get_strategy,
    register_strategy,
    strategy_names,
)
from credanno.eval.subsets import draw_subsets, label_subset, read_subset_file
from credanno.labels import LABEL_NAMES, label_spec
from credanno.synthetic import synthetic_features, synthetic_table

PROV = {"encoder": {"kind": "synthetic", "arch": "none", "sha256": "a" * 64}}
T = 0.1


@pytest.fixture(scope="module")
def table():
    return synthetic_table(n_nodules=40, per_nodule=3, seed=0)


@pytest.fixture(scope="module")
def train(table):
    return table[table["split"] == "train"].reset_index(drop=True)


@pytest.fixture
def store(tmp_path, table):
    feats = {"cls": synthetic_features(table, dim=16, signal=2.0),
             "last4": synthetic_features(table, dim=24, signal=2.0, seed=1)}
    return stores.save(tmp_path / "s.h5", features=feats, table=table, provenance=PROV)


@pytest.fixture
def temp_strategy():
    """Register strategies for one test and remove them afterwards."""
    added = []

    def add(name, fn, **kw):
        register_strategy(name, **kw)(fn)
        added.append(name)

    yield add
    for name in added:
        STRATEGIES.pop(name, None)


def _scrambled(t, seed=0):
    rng = np.random.default_rng(seed)
    t = t.copy()
    for c in LABEL_COLUMNS:
        if c in t.columns:
            t[c] = rng.permutation(t[c].to_numpy())[::-1]
    return t


# -- strategies --------------------------------------------------------------------------

def test_registry_lists_the_builtin_strategies_and_who_reads_labels():
    assert strategy_names()[:3] == ["random", "nodule", "stratified"]
    assert get_strategy("stratified").reads_labels
    assert not get_strategy("random").reads_labels and not get_strategy("nodule").reads_labels
    with pytest.raises(CredannoError, match="unknown subset strategy 'no-such-rule'.*random"):
        get_strategy("no-such-rule")


def _features(t):
    return synthetic_features(t, dim=16, signal=2.0)


@pytest.mark.parametrize("name", strategy_names())
def test_every_strategy_is_deterministic_and_never_draws_test_rows(name, table, train):
    spec = SubsetSpec(fracs=[0.1, 0.5], seeds=[0, 1, 2], strategy=name)
    feats = _features(train)
    a, b = draw_subsets(spec, train, feats), draw_subsets(spec, train, feats)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.rows, y.rows)
        assert x.rows.max() < len(train)
        test_ids = set(table.loc[table["split"] == "test", "annotation_id"])
        assert not set(train["annotation_id"].to_numpy()[x.rows]) & test_ids
    assert not np.array_equal(a[0].rows, a[1].rows)  # seeds differ
    with pytest.raises(CredannoError, match="training rows only"):
        draw_subsets(spec, table, _features(table))  # the test split never enters


@pytest.mark.parametrize("name", [n for n in strategy_names()
                                  if not get_strategy(n).reads_labels])
def test_label_free_strategies_ignore_scrambled_labels(name, train):
    spec = SubsetSpec(fracs=[0.05, 0.3], seeds=[0, 3], strategy=name)
    feats = _features(train)  # features stay: only labels are scrambled
    for x, y in zip(draw_subsets(spec, train, feats),
                    draw_subsets(spec, _scrambled(train), feats), strict=True):
        np.testing.assert_array_equal(x.rows, y.rows)
    # stratified reads labels: scrambling them changes its draw
    strat = SubsetSpec(fracs=[0.1], seeds=[0], strategy="stratified")
    assert not np.array_equal(draw_subsets(strat, train)[0].rows,
                              draw_subsets(strat, _scrambled(train, 1))[0].rows)


def test_label_free_strategy_sees_no_labels_but_features(train, temp_strategy):
    seen = {}

    def by_feature(ctx):
        seen["columns"] = set(ctx.table.columns)
        return np.argsort(-ctx.features[:, 0], kind="stable")[:ctx.budget]

    def peeks(ctx):
        seen["labelled"] = set(ctx.table.columns)
        return Selection(np.arange(ctx.budget))

    temp_strategy("first-feature", by_feature)
    temp_strategy("peeks", peeks, reads_labels=True)
    x = synthetic_features(train, dim=8)
    s = draw_subsets(SubsetSpec(fracs=[0.1], strategy="first-feature"), train, lambda: x)[0]
    assert not seen["columns"] & set(LABEL_COLUMNS) and "diameter" in seen["columns"]
    np.testing.assert_array_equal(s.rows, np.sort(np.argsort(-x[:, 0], kind="stable")[:9]))
    draw_subsets(SubsetSpec(n_labels=[3], strategy="peeks"), train)
    assert set(LABEL_NAMES) <= seen["labelled"]
    with pytest.raises(CredannoError, match="needs the training features"):
        draw_subsets(SubsetSpec(fracs=[0.1], strategy="first-feature"), train)
    with pytest.raises(CredannoError, match="does not read labels.*--stratify"):
        SubsetSpec(strategy="first-feature", stratify=True)


def test_today_draws_are_unchanged(train):
    # expectations computed with the label_subset of before the strategy registry
    spec = SubsetSpec(fracs=[0.1], seeds=[0])
    assert draw_subsets(spec, train)[0].rows.tolist() == [5, 11, 13, 19, 20, 27, 44, 64, 72]
    nod = draw_subsets(SubsetSpec(fracs=[0.1], seeds=[1], mode="nodule"), train)[0]
    assert nod.rows.tolist() == [21, 22, 23, 48, 49, 50, 63, 64, 65]
    np.testing.assert_array_equal(nod.groups, train["nodule_id"].to_numpy()[nod.rows])
    strat = draw_subsets(SubsetSpec(n_labels=[6], seeds=[2], stratify=True), train)[0]
    assert strat.rows.tolist() == [28, 40, 50, 59, 79, 83]
    for s in draw_subsets(SubsetSpec(fracs=[0.2, 1], seeds=[0, 4], strategy="stratified",
                                     mode="nodule"), train):
        np.testing.assert_array_equal(s.rows, label_subset(train, frac=s.frac, mode="nodule",
                                                           stratify=True, seed=s.seed))


@pytest.mark.parametrize("name", ["random", "nodule"])
def test_subsets_of_one_seed_stay_nested(name, train):
    small, large = draw_subsets(SubsetSpec(fracs=[0.05, 0.3], seeds=[3], strategy=name), train)
    assert set(small.rows) <= set(large.rows)


def test_older_spellings_fold_into_strategies():
    assert SubsetSpec(mode="nodule").strategy == "nodule"
    s = SubsetSpec(stratify=True)
    assert (s.strategy, s.mode, s.stratify) == ("stratified", "annotation", "malignancy")
    s = SubsetSpec(strategy="nodule", stratify="texture")
    assert (s.strategy, s.mode, s.stratify) == ("stratified", "nodule", "texture")
    assert SubsetSpec(strategy="stratified").stratify == "malignancy"
    with pytest.raises(CredannoError, match="unknown subset strategy"):
        SubsetSpec(strategy="nope")


# -- an independent k-NN -----------------------------------------------------------------

def _numpy_knn(bank, bank_labels, queries, k, n_classes):
    """Cosine similarity, top-k, exp(sim / T) votes; ties to the lower class."""
    keep = bank_labels >= 0
    bank, bank_labels = bank[keep], bank_labels[keep]
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ b.T.astype(np.float64)
    k = min(k, len(b))
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(q), n_classes))
    for i in range(len(q)):
        np.add.at(votes[i], bank_labels[top[i]], np.exp(sims[i, top[i]] / T))
    return votes.argmax(axis=1)


def _check_against_numpy(result, train_x, train_t, test_x, rows, k):
    pred = result.predictions
    for label in result.config["labels"]:
        ours = pred[f"{label}_pred"].to_numpy()[:len(test_x)]
        ref = _numpy_knn(train_x[rows], train_t[label].to_numpy()[rows], test_x, k,
                         label_spec(label).n_classes)
        np.testing.assert_array_equal(ours, ref, err_msg=label)


def _arrays(table, where=None):
    x = synthetic_features(table, dim=16, signal=2.0)
    keep = np.ones(len(table), bool) if where is None else table.eval(where).to_numpy()
    tr = (table["split"] == "train").to_numpy() & keep
    te = (table["split"] == "test").to_numpy() & keep
    return (x[tr], table[tr].reset_index(drop=True), x[te],
            table[te].reset_index(drop=True))


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CredannoWarning)
        return fn(*a, **kw)


@pytest.mark.parametrize("form", ["annotation_csv", "nodule_csv", "lines"])
def test_subset_file_equals_numpy_knn_on_those_rows(form, store, table, tmp_path):
    train_x, train_t, test_x, _ = _arrays(table)
    ids = train_t["annotation_id"].to_numpy()[[0, 3, 4, 10, 20, 33, 50, 60, 70, 80]]
    nodules = train_t["nodule_id"].unique()[[1, 5, 9, 13]]
    path = tmp_path / "ids.csv"
    if form == "annotation_csv":
        pd.DataFrame({"annotation_id": ids, "note": "x"}).to_csv(path, index=False)
        rows = np.flatnonzero(train_t["annotation_id"].isin(ids))
    elif form == "nodule_csv":
        pd.DataFrame({"nodule_id": nodules}).to_csv(path, index=False)
        rows = np.flatnonzero(train_t["nodule_id"].isin(nodules))
    else:
        path.write_text("# my picks\n" + "\n".join(map(str, ids)) + "\n\n")
        rows = np.flatnonzero(train_t["annotation_id"].isin(ids))
    r = _quiet(knn_sweep, store, SubsetSpec(file=path, seeds=[0, 1]), KnnSpec(ks=[5]))
    _check_against_numpy(r, train_x, train_t, test_x, rows, 5)
    assert set(r.results["n_labelled"]) == {len(rows)} and set(r.results["seed"]) == {0, 1}
    rec = r.config["subset_file"]
    assert rec["path"] == str(path.resolve())
    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    sub = read_subset_file(path, train_t)
    np.testing.assert_array_equal(sub.rows, rows)
    assert (sub.groups is not None) == (form == "nodule_csv")


def test_where_equals_numpy_knn_on_the_subpopulation(store, table):
    where = "diameter >= 10 and patient_id != 'LIDC-IDRI-0003'"
    train_x, train_t, test_x, test_t = _arrays(table, where)
    spec = SubsetSpec(fracs=[0.5], seeds=[2])
    r = _quiet(knn_sweep, store, spec, KnnSpec(ks=[7]), where=where)
    rows = draw_subsets(spec, train_t)[0].rows
    _check_against_numpy(r, train_x, train_t, test_x, rows, 7)
    assert r.config["where"] == {"expr": where, "n_train": len(train_t), "n_test": len(test_t),
                                 "n_train_total": int((table["split"] == "train").sum()),
                                 "n_test_total": int((table["split"] == "test").sum())}
    assert set(r.results["n_test"]) <= {len(test_t)}
    # streamed in blocks, and from in-memory arrays, the same
    b = _quiet(knn_sweep, store, spec, KnnSpec(ks=[7], block_rows=10), where=where)
    pd.testing.assert_frame_equal(r.results, b.results)
    mem = EvalData.from_arrays(*_arrays(table))
    c = _quiet(knn_sweep, mem, spec, KnnSpec(ks=[7]), where=where)
    pd.testing.assert_frame_equal(r.results, c.results)


def test_explicit_rows_equal_numpy_knn_and_probe_draws(store, table):
    train_x, train_t, test_x, _ = _arrays(table)
    a, b = np.array([1, 5, 9, 30, 31, 60]), np.arange(0, 80, 3)
    r = _quiet(knn_sweep, store, [a, b], KnnSpec(ks=[4]), labels=["malignancy"])
    assert r.config["strategy"] == "explicit" and r.config["n_subsets"] == 2
    for seed, rows in enumerate([a, b]):
        one = _quiet(knn_sweep, store, [rows], KnnSpec(ks=[4]), labels=["malignancy"])
        _check_against_numpy(one, train_x, train_t, test_x, rows, 4)
        got = r.results[r.results["seed"] == seed]
        assert got["n_labelled"].tolist() == [len(rows)]
        assert got["acc"].tolist() == one.results["acc"].tolist()
    spec = SubsetSpec(fracs=[0.3], seeds=[0, 1])
    drawn = draw_subsets(spec, train_t)
    p1 = _quiet(probe_sweep, store, spec, ProbeSpec(epochs=2, device="cpu"))
    p2 = _quiet(probe_sweep, store, drawn, ProbeSpec(epochs=2, device="cpu"))
    pd.testing.assert_frame_equal(p1.results, p2.results)
    with pytest.raises(CredannoError, match="outside 0..86"):
        knn_sweep(store, [np.array([1, 500])], KnnSpec(ks=[3]))
    with pytest.raises(CredannoError, match="list of row arrays"):
        knn_sweep(store, a, KnnSpec(ks=[3]))


def test_probe_where_records_the_subpopulation(store):
    r = _quiet(probe_sweep, store, SubsetSpec(fracs=[1]), ProbeSpec(epochs=2, device="cpu"),
               where="diameter >= 10", labels=["malignancy"])
    assert r.config["where"]["expr"] == "diameter >= 10"
    assert r.config["where"]["n_train"] < r.config["where"]["n_train_total"]
    assert r.results["n_labelled"].tolist() == [r.config["where"]["n_train"]]


# -- errors ------------------------------------------------------------------------------

def test_subset_file_errors_name_the_problem(tmp_path, table, train):
    path = tmp_path / "ids.txt"
    test_ids = table.loc[table["split"] == "test", "annotation_id"].head(3).tolist()
    path.write_text("\n".join(map(str, [int(train["annotation_id"][0]), *test_ids, 99999])))
    with pytest.raises(CredannoError, match=r"^4 annotation_ids in .* are not training "
                                            r"images, e\.g\. "):
        read_subset_file(path, train)
    path.write_text("a,b\n1,2\n")
    with pytest.raises(CredannoError, match="no annotation_id or nodule_id column"):
        read_subset_file(path, train)
    path.write_text("1\nseven\n")
    with pytest.raises(CredannoError, match="'seven' is not an annotation_id"):
        read_subset_file(path, train)
    with pytest.raises(CredannoError, match="not found"):
        SubsetSpec(file=tmp_path / "missing.csv")
    path.write_text("1\n")
    with pytest.raises(CredannoError, match="drop --strategy"):
        SubsetSpec(file=path, strategy="nodule")


@pytest.mark.parametrize("where,msg", [
    ("nope > 1", "is not a query over the image table (name 'nope' is not defined); columns"),
    ("diameter >=", "is not a query over the image table"),
    ("diameter", "does not give true or false per image"),
    ("diameter > 1000", "selects none of the 87 training images"),
])
def test_bad_where_is_one_line(store, where, msg):
    with pytest.raises(CredannoError) as e:
        knn_sweep(store, knn=KnnSpec(ks=[3]), where=where)
    assert msg in str(e.value) and "\n" not in str(e.value) and repr(where) in str(e.value)


def _main(args, capsys):
    from credanno.cli import main

    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    return err[0]


def test_cli_subset_file_and_where_errors_are_one_line(store, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n99999\n88888\n")
    err = _main(["knn", "--store", str(store), "--subset-file", str(bad)], capsys)
    assert "2 annotation_ids" in err and "99999" in err
    err = _main(["probe", "--store", str(store), "--where", "diameter >="], capsys)
    assert "--where 'diameter >='" in err
    ok = tmp_path / "ok.txt"
    ok.write_text("1\n")
    err = _main(["knn", "--store", str(store), "--subset-file", str(ok), "--frac", "0.1"],
                capsys)
    assert "drop --frac" in err


def test_cli_subset_file_where_and_strategy_aliases(store, train, tmp_path, monkeypatch):
    ids = tmp_path / "ids.csv"
    pd.DataFrame({"annotation_id": train["annotation_id"].head(6)}).to_csv(ids, index=False)
    run = CliRunner().invoke
    (tmp_path / "stores").mkdir()
    store = store.rename(tmp_path / "stores" / store.name)
    monkeypatch.chdir(tmp_path)  # the default store: the newest under stores/
    res = run(cli, ["knn", "--k", "50", "--subset-file", "ids.csv", "--json"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)["config"]
    assert cfg["subset_file"]["sha256"] == hashlib.sha256(ids.read_bytes()).hexdigest()
    res = run(cli, ["knn", "--store", str(store), "--k", "5", "--subset-file", str(ids)])
    assert res.exit_code == 0 and "subset file: " in res.stdout
    res = run(cli, ["probe", "--where", "diameter >= 10", "--epochs", "2", "--n-seeds", "1",
                    "--labels", "malignancy", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "where diameter >= 10: " in res.stdout
    outs = {}
    for key, args in {"alias": ["--subset", "nodule", "--stratify"],
                      "strategy": ["--strategy", "stratified", "--subset", "nodule"]}.items():
        res = run(cli, ["knn", "--store", str(store), "--k", "3", "--frac", "0.2",
                        "--n-seeds", "2", "--json", *args])
        assert res.exit_code == 0, res.output
        outs[key] = json.loads(res.stdout)
    assert outs["alias"] == outs["strategy"]
    assert outs["alias"]["config"]["strategy"] == "stratified"
    assert outs["alias"]["config"]["mode"] == "nodule"
