"""`credanno bench budget`: a row for every (budget, strategy, method, seed), the figure
written, the published real-CT rows present and labelled, bad input one line each."""

import pandas as pd
import pytest
from helpers import cli_error

from credanno import stores
from credanno.bench.budget import METHODS, BudgetSpec, run_budget
from credanno.cli import main
from credanno.labels import LABEL_NAMES
from credanno.synthetic import synthetic_features, synthetic_table

PROV = {"encoder": {"kind": "synthetic", "arch": "none", "sha256": "a" * 64}}
FRACS = (0.05, 0.1, 1.0)
STRATS = ("random", "kmeans")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    table = synthetic_table(n_nodules=50, per_nodule=3, seed=1)
    feats = {"cls": synthetic_features(table, dim=16, signal=2.0)}
    return stores.save(tmp_path_factory.mktemp("bud") / "s.h5", features=feats, table=table,
                       provenance=PROV)


@pytest.fixture(scope="module")
def result(store):
    return run_budget(store, BudgetSpec(fracs=FRACS, strategies=STRATS, seeds=(0, 1),
                                        device="cpu"))


def test_every_cell_is_present(result):
    raw = result.raw
    cells = raw.groupby(["frac", "strategy", "method", "seed"]).size()
    assert len(cells) == len(FRACS) * len(STRATS) * len(METHODS) * 2
    assert (cells == len(LABEL_NAMES)).all()  # malignancy and every attribute
    assert raw["baseline"].notna().all() and raw["acc"].between(0, 1).all()
    s = result.summary()
    assert set(s["n_seeds"]) == {2}


def test_grid_probe_is_credanno_probe_of_the_same_picks(store, result):
    """The grid fits every cell's probe in one batched sweep; each cell scores exactly as
    ``probe_sweep`` of its picked rows alone (features scaled by the whole training split,
    the tuned recipe's decision for the paper's metric)."""
    from credanno.eval.data import open_eval_data
    from credanno.eval.probe import probe_sweep
    from credanno.eval.specs import ProbeSpec
    from credanno.eval.strategies import pick

    with open_eval_data(store, "cls") as data:
        n = round(0.05 * len(data.train_x))
        rows = pick("kmeans", data.train_table, data.train_x, n, 1, device="cpu").rows
        alone = probe_sweep(data, [rows], ProbeSpec(kind="cls", device="cpu"), n_boot=1)
    want = alone.results.set_index("label")["acc"]
    got = result.raw[(result.raw["frac"] == 0.05) & (result.raw["strategy"] == "kmeans")
                     & (result.raw["method"] == "probe") & (result.raw["seed"] == 1)]
    assert len(got) == len(LABEL_NAMES)
    for _, r in got.iterrows():
        assert r["acc"] == pytest.approx(want[r["label"]], abs=1e-12), r["label"]


def test_full_budget_is_one_evaluation_shared_by_strategies(result):
    """Every image labelled: the strategy cannot matter, so each strategy carries the same
    per-seed numbers, and the semi loop (nothing unlabelled) equals the probe."""
    full = result.raw[result.raw["frac"] == 1.0]
    wide = full.pivot_table(index=["method", "seed", "label"], columns="strategy",
                            values="acc")
    assert (wide["random"] == wide["kmeans"]).all()
    semi = full[full["method"] == "semi"].set_index(["strategy", "seed", "label"])["acc"]
    probe = full[full["method"] == "probe"].set_index(["strategy", "seed", "label"])["acc"]
    pd.testing.assert_series_equal(semi, probe)


def test_published_rows_are_labelled_real_ct(result, tmp_path):
    md = result.markdown()
    assert "| constant |" in md
    assert md.count("real CT") == 5 and "87.86 ± 1.99" in md
    csv = pd.read_csv(result.to_csv(tmp_path / "b.csv"))
    pub = csv[csv["method"] == "published"]
    assert len(pub) == 5 and pub["source"].str.contains("real CT").all()


def test_cli_writes_figure_and_csv(store, tmp_path, capsys):
    out, csv = tmp_path / "b.png", tmp_path / "b.csv"
    main(["bench", "budget", "--store", str(store), "--frac", "0.1,1", "--strategy", "random",
          "--strategy", "kmeans,coreset", "--n-seeds", "1",
          "--device", "cpu", "--out", str(out), "--csv", str(csv)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = pd.read_csv(csv)
    assert set(raw.loc[raw["method"] != "published", "strategy"]) == {"random", "kmeans",
                                                                      "coreset"}
    assert "| k-NN | kmeans |" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["--frac", "0"], "--frac 0: a label fraction must be in (0, 1]"),
    (["--frac", "2"], "--frac 2"),
    (["--strategy", "nope"], "unknown subset strategy 'nope'; choose one of random"),
    (["--strategy", "stratified"], "cannot pick images one by one without labels"),
    (["--method", "cnn"], "unknown method 'cnn'"),
    (["--kind", "last4"], "has no feature set 'last4'"),
])
def test_bad_input_is_one_line(store, capsys, args, match):
    line = cli_error(capsys, ["bench", "budget", "--store", str(store), "--device", "cpu",
                              "--n-seeds", "1", *args])
    assert match in line


def test_figure_names_its_data_and_draws_the_constant(result):
    """The figure says what data it shows (the store's provenance; the phantom in the
    demo) and draws the constant baseline the strategies have to beat."""
    fig = result.figure("knn")
    ax = fig.axes[0]
    base = result.raw.query("label == 'malignancy'")["baseline"].iloc[0]
    const = [ln for ln in ax.get_lines() if ln.get_label() == "constant"]
    assert len(const) == 1 and const[0].get_ydata()[0] == pytest.approx(100 * base)
    caption = " ".join(t.get_text() for t in fig.texts)
    assert caption.startswith(f"Data: {result.params['data']}.")
    assert "unknown source" in result.params["data"]  # this store's provenance has none
    assert "seeds [0, 1]" in caption and "s.h5" in caption
