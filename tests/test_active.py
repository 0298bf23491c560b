"""`credanno active`, the cRedAnno+ loop: test labels never steer it (scrambled test labels
give identical rounds, picks and pseudo-labels), the budget is reached exactly and never
exceeded, the recorded pseudo-label accuracy matches an independent count (hard and soft
pseudo-labels), every round is recorded, and bad input is one line."""

import json

import numpy as np
import pandas as pd
import pytest
from helpers import cli_error

from credanno import stores
from credanno.cli import main
from credanno.eval.active import ActiveSpec, run_active, schedule
from credanno.eval.strategies import LABEL_COLUMNS
from credanno.synthetic import synthetic_features, synthetic_table

PROV = {"encoder": {"kind": "synthetic", "arch": "none", "sha256": "a" * 64}}
SPEC = ActiveSpec(start=0.05, budget=0.15, rounds=3, epochs=20, quench_epochs=5,
                  threshold=0.6, pseudo="hard", lr=0.05, device="cpu")


@pytest.fixture(scope="module")
def table():
    return synthetic_table(n_nodules=60, per_nodule=3, seed=0)


def _save(path, table):
    feats = {"cls": synthetic_features(table, dim=16, signal=2.0)}
    return stores.save(path, features=feats, table=table, provenance=PROV)


@pytest.fixture(scope="module")
def store(tmp_path_factory, table):
    return _save(tmp_path_factory.mktemp("act") / "s.h5", table)


@pytest.fixture(scope="module")
def scrambled_test(tmp_path_factory, table):
    """The same store with every label column shuffled within the test split only."""
    rng = np.random.default_rng(5)
    t = table.copy()
    test = (t["split"] == "test").to_numpy()
    for col in LABEL_COLUMNS:
        if col in t.columns:
            t.loc[test, col] = rng.permutation(t.loc[test, col].to_numpy())
    return _save(tmp_path_factory.mktemp("scr") / "s.h5", t)


@pytest.mark.parametrize("query,pseudo", [("least-confidence", "hard"), ("margin", "hard"),
                                          ("coreset", "hard"), ("least-confidence", "soft")])
def test_test_labels_never_steer_the_loop(store, scrambled_test, table, query, pseudo):
    # soft targets make the refitted heads less sure of themselves: a lower threshold
    # keeps pseudo-labels in every round, so their accuracy can be checked below
    spec = ActiveSpec(**{**SPEC.__dict__, "query": query, "pseudo": pseudo,
                         "threshold": 0.55 if pseudo == "soft" else SPEC.threshold})
    a, b = run_active(store, spec), run_active(scrambled_test, spec)
    np.testing.assert_array_equal(a.labelled, b.labelled)
    pd.testing.assert_frame_equal(a.pseudo, b.pseudo)
    cols = ["round", "n_labelled", "n_queried", "n_pseudo", "pseudo_acc"]
    pd.testing.assert_frame_equal(a.rounds[cols], b.rounds[cols])
    assert not a.accuracy["acc"].equals(b.accuracy["acc"])  # the scores did see the change
    assert a.params["pseudo"] == a.params["pseudo_labels"] == pseudo
    if pseudo == "soft":  # the accuracy reported is the argmax's, against the hidden labels
        train = table[table["split"] == "train"].reset_index(drop=True)
        truth = train["malignancy"].to_numpy()[a.pseudo["row"].to_numpy()]
        assert a.rounds["n_pseudo"].iloc[1:].gt(0).all()
        assert a.rounds["pseudo_acc"].iloc[-1] == pytest.approx(
            np.mean(truth == a.pseudo["malignancy"].to_numpy()))


def test_budget_reached_exactly_and_rounds_recorded(store, table):
    res = run_active(store, SPEC)
    n_train = int((table["split"] == "train").sum())
    n_start, n_budget = round(0.05 * n_train), round(0.15 * n_train)
    r = res.rounds
    assert r["round"].tolist() == [0, 1, 2, 3]
    assert r["n_labelled"].iloc[0] == n_start and r["n_labelled"].iloc[-1] == n_budget
    assert (r["n_labelled"] <= n_budget).all() and r["n_labelled"].is_monotonic_increasing
    assert r["n_queried"].sum() == n_budget - n_start
    assert len(res.labelled) == len(np.unique(res.labelled)) == n_budget
    assert set(res.accuracy["round"]) == {0, 1, 2, 3}
    assert len(res.accuracy) == 4 * 9 and res.accuracy["baseline"].notna().all()
    assert "| constant |" in res.markdown()


def test_pseudo_label_accuracy_is_independent_count(store, table):
    res = run_active(store, SPEC)
    train = table[table["split"] == "train"].reset_index(drop=True)
    p = res.pseudo
    assert len(p) == res.rounds["n_pseudo"].iloc[-1] > 0
    assert not np.isin(p["row"], res.labelled).any()  # pseudo-labels only on unlabelled
    truth = train["malignancy"].to_numpy()[p["row"].to_numpy()]
    expected = float(np.mean(truth == p["malignancy"].to_numpy()))
    assert res.rounds["pseudo_acc"].iloc[-1] == pytest.approx(expected)


def test_schedule_steps_up_to_the_budget():
    assert schedule(19, 38, 5) == [23, 27, 30, 34, 38]
    assert schedule(5, 7, 5) == [5 + 1, 7] or schedule(5, 7, 5)[-1] == 7
    assert schedule(10, 10, 5) == [] and schedule(10, 20, 0) == []


def test_cli_writes_json_and_csv(store, tmp_path, capsys):
    out_j, out_c = tmp_path / "a.json", tmp_path / "a.csv"
    main(["active", "--store", str(store), "--start", "0.05", "--budget", "0.1",
          "--rounds", "2", "--device", "cpu", "--json", str(out_j), "--csv", str(out_c)])
    assert "| round |" in capsys.readouterr().out
    doc = json.loads(out_j.read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    assert len(pd.read_csv(out_c)) == 3 and doc["params"]["recipe"] == "tuned"


def test_cli_paper_recipe_trains_epochs_then_quenches(store, tmp_path, monkeypatch):
    """``--recipe paper``: the seed set trains --epochs, every round --quench-epochs (SGD)."""
    from credanno.eval.estimator import JointLinearProbe

    seen, fit = [], JointLinearProbe.fit

    def spy(self, X, Y, *args, **kw):
        seen.append((self.recipe, self.paper.epochs))
        return fit(self, X, Y, *args, **kw)

    monkeypatch.setattr(JointLinearProbe, "fit", spy)
    out_j = tmp_path / "a.json"
    main(["active", "--store", str(store), "--start", "0.05", "--budget", "0.1",
          "--rounds", "2", "--recipe", "paper", "--epochs", "5", "--quench-epochs", "2",
          "--device", "cpu", "--json", str(out_j)])
    assert seen == [("paper", 5), ("paper", 2), ("paper", 2)]
    doc = json.loads(out_j.read_text())["params"]
    assert (doc["recipe"], doc["epochs"], doc["quench_epochs"]) == ("paper", 5, 2)


def test_cli_soft_pseudo_labels(store, tmp_path, capsys, monkeypatch):
    """``--pseudo soft``: the pseudo-labelled rows train on every head's predicted
    probabilities (the true labels stay hard); recorded in the JSON."""
    from credanno.eval.estimator import JointLinearProbe

    seen, fit = [], JointLinearProbe.fit

    def spy(self, X, Y, *args, soft=None, **kw):
        seen.append((len(Y), soft))
        return fit(self, X, Y, *args, soft=soft, **kw)

    monkeypatch.setattr(JointLinearProbe, "fit", spy)
    out_j = tmp_path / "a.json"
    main(["active", "--store", str(store), "--start", "0.05", "--budget", "0.1",
          "--rounds", "2", "--threshold", "0.6", "--pseudo", "soft", "--device", "cpu",
          "--json", str(out_j)])
    assert "soft pseudo-labels" in capsys.readouterr().out
    doc = json.loads(out_j.read_text())
    assert doc["params"]["pseudo"] == "soft" and doc["params"]["pseudo_labels"] == "soft"
    assert seen[0][1] is None  # the seed set: true labels only
    n_rows, soft = seen[-1]
    n_labelled = doc["rounds"][-1]["n_labelled"]
    assert n_rows > n_labelled and len(soft) == 9  # one array per label
    for q in soft:
        assert np.isnan(q[:n_labelled]).all()
        np.testing.assert_allclose(q[n_labelled:].sum(1), 1, atol=1e-5)
    assert (soft[0][n_labelled:].max(1) > 0.6).all()  # malignancy-confident rows only


@pytest.mark.parametrize("args,match", [
    (["--budget", "0"], "--budget 0: must be in (0, 1]"),
    (["--budget", "1.5"], "--budget"),
    (["--start", "0.2", "--budget", "0.1"], "is below --start"),
    (["--strategy", "nope"], "nope"),
    (["--query", "nope"], "unknown subset strategy 'nope'; choose one of random"),
    (["--query", "stratified"], "least-confidence, margin"),
    (["--kind", "last4"], "has no feature set 'last4'"),
    (["--pseudo", "both"], "'both' is not one of 'hard', 'soft'"),
    (["--quench-epochs", "3"], "--epochs and --quench-epochs belong to --recipe paper"),
])
def test_bad_input_is_one_line(store, capsys, args, match):
    line = cli_error(capsys, ["active", "--store", str(store), "--device", "cpu", *args])
    assert match in line


def test_a_seed_fitted_elsewhere_gives_the_same_run(store):
    """``run_active_arrays(..., seed=ActiveSeed(rows, model))`` (how ``bench budget`` hands
    over seed sets fitted in its batched sweep) runs exactly as the loop that picks and
    fits that seed set itself."""
    from credanno.eval.active import ActiveSeed, check_spec, run_active_arrays
    from credanno.eval.data import open_eval_data
    from credanno.eval.estimator import JointLinearProbe, fit_many
    from credanno.eval.strategies import pick

    spec = ActiveSpec(start=0.05, budget=0.1, rounds=2, threshold=0.6, device="cpu")
    with open_eval_data(store, "cls") as d:
        args = (d.train_x, d.train_table, d.test_x, d.test_table, d.labels, spec)
        own = run_active_arrays(*args)
        rows = pick("kmeans", d.train_table, d.train_x, check_spec(spec, len(d.train_x))[0],
                    spec.seed, device="cpu").rows
        model = fit_many(JointLinearProbe(device="cpu"), d.train_x,
                         d.train_table[d.labels], [rows], d.train_table["nodule_id"])[0]
        handed = run_active_arrays(*args, seed=ActiveSeed(rows, model))
    np.testing.assert_array_equal(own.labelled, handed.labelled)
    cols = ["round", "n_labelled", "n_queried", "n_pseudo", "pseudo_acc"]
    pd.testing.assert_frame_equal(own.rounds[cols], handed.rounds[cols])
    pd.testing.assert_frame_equal(own.accuracy, handed.accuracy)
