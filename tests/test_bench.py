import itertools
import textwrap

import numpy as np
import pandas as pd
import pytest

from credanno.errors import CredannoError
from credanno.synthetic import synthetic_features, synthetic_images, synthetic_table

# tiny synthetic sets leave classes without labels and clamp k: expected here
pytestmark = [pytest.mark.filterwarnings("ignore::credanno.errors.CredannoWarning"),
              pytest.mark.usefixtures("one_torch_thread")]




@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A synthetic patch file and the store embedded from it (provenance names both)."""
    from credanno import stores
    from credanno.data.patchfile import write_patch_file

    root = tmp_path_factory.mktemp("bench")
    table = synthetic_table(n_nodules=60, per_nodule=3, seed=2)
    patch = write_patch_file(root / "patches.h5", synthetic_images(table), table,
                             {"source": "synthetic", "seed": 0})
    x = synthetic_features(table, dim=24)
    store = root / "store.h5"
    stores.save(store, features={"cls": x, "last4": np.concatenate([x] * 4, axis=1)},
                table=table, provenance={"data": {"path": str(patch), "source": "synthetic"}})
    return {"store": store, "patch": patch, "table": table, "root": root}


@pytest.fixture(scope="module")
def t1(syn):
    from credanno.bench.table1 import run_table1

    return run_table1(syn["store"], seeds=(0, 1), probe_epochs=5)


def test_paper_tables_are_package_data():
    from credanno.bench.paper import paper_table1, paper_table2

    p1 = paper_table1()
    assert {"HSCNN", "X-Caps", "MSN-JCN", "MTMR", "WeakSup", "cRedAnno"} <= set(p1["method"])
    row = p1[(p1["method"] == "cRedAnno") & (p1["setting"] == "1% trained")].iloc[0]
    assert row["malignancy"] == pytest.approx(86.09) and row["n_nodules"] == 730
    assert np.isnan(p1[p1["method"] == "HSCNN"].iloc[0]["lobulation"])  # not reported
    p2 = paper_table2()
    assert len(p2) == 6 and p2["malignancy"].max() == pytest.approx(88.30)


def test_n_correct_distribution_matches_enumeration():
    from credanno.bench.paper import n_correct_distribution

    p = [0.9, 0.5, 0.7]
    brute = np.zeros(4)
    for outcome in itertools.product([0, 1], repeat=3):
        probs = [pi if o else 1 - pi for pi, o in zip(p, outcome, strict=True)]
        brute[sum(outcome)] += np.prod(probs)
    np.testing.assert_allclose(n_correct_distribution(p), brute)
    # not reported (NaN) counts as 100% correct, as the paper's Fig. 2 caption says
    np.testing.assert_allclose(n_correct_distribution([0.5, np.nan]), [0, 0.5, 0.5])


def test_paper_style_fig2_from_csv():
    from credanno.bench.paper import FIG2_ATTRIBUTES, n_correct_distribution, paper_fig2

    curves = paper_fig2()
    assert set(curves) == {"HSCNN", "X-Caps", "MSN-JCN", "WeakSup (1:5)", "WeakSup (1:3)"}
    for p in curves.values():
        assert len(p) == len(FIG2_ATTRIBUTES) + 1 == 9
        assert p.sum() == pytest.approx(1.0)
    # HSCNN: lobulation, spiculation (and internal structure) unreported -> certain
    hs = n_correct_distribution([.719, 1, .908, .552, .725, 1, 1, .834])
    np.testing.assert_allclose(curves["HSCNN"], hs)
    assert curves["HSCNN"][:3].sum() == pytest.approx(0.0)


def test_table1_markdown_has_ours_baseline_and_paper_rows(t1):
    md = t1.markdown()
    lines = md.splitlines()
    assert lines[0].startswith("| | Method | Setting | Sub | Cal | Sph | Mar | Lob | Spi | Tex |"
                               " Mal | #nodules |")
    ours = [ln for ln in lines if "credanno (this run)" in ln]
    assert [ln.split("|")[3].strip() for ln in ours] == [
        "50-NN", "250-NN", "trained", "10% 50-NN", "10% 150-NN", "1% trained"]
    # two seeds: mean +/- sd where the seeds' label subsets differ; all labels with k-NN is
    # one deterministic result, shown without a zero sd
    partial = [ln for ln in ours if "%" in ln.split("|")[3]]
    full_knn = [ln for ln in ours if "-NN" in ln and "%" not in ln.split("|")[3]]
    assert len(partial) == 3 and all("±" in ln for ln in partial)
    assert len(full_knn) == 2 and not any("±" in ln for ln in full_knn)
    assert sum("majority baseline" in ln for ln in lines) == 1
    for method in ("HSCNN", "X-Caps", "MSN-JCN", "MTMR", "WeakSup", "cRedAnno"):
        assert any(f"| {method} |" in ln for ln in lines), method
    assert "| 86.09 |" in md and "| 4252 | 3D volumes |" in md
    assert "| 60 | none |" in ours[0]  # our number of nodules
    assert t1.data.kind == "synthetic" and "SYNTHETIC" in t1.header()
    # the baseline is the constant prediction's score
    base = t1.rows[(t1.rows["source"] == "baseline") & (t1.rows["label"] == "malignancy")]
    test = synthetic_table(n_nodules=60, per_nodule=3, seed=2).query("split == 'test'")
    share = test["malignancy"].value_counts(normalize=True).max()
    assert base["acc_mean"].iloc[0] == pytest.approx(share)
    ex = t1.exact_markdown()
    assert "Exact-match accuracy" in ex and "Balanced accuracy" in ex and "HSCNN" not in ex
    assert "| - | majority baseline |" in ex


def test_table1_csv(t1, tmp_path):
    df = pd.read_csv(t1.to_csv(tmp_path / "t1.csv"))
    assert set(df["source"]) == {"ours", "baseline", "paper"}
    ours = df[df["source"] == "ours"]
    # the CSV holds the table's numbers, not a rounded rendering of them
    mem = t1.rows[t1.rows["source"] == "ours"]
    np.testing.assert_allclose(ours["acc_mean"].to_numpy(), mem["acc_mean"].to_numpy(), rtol=1e-12)
    assert (ours["n_seeds"] == 2).all()
    assert {"exact_acc_mean", "balanced_acc_sd"} <= set(df.columns)


def test_fig2_distributions_sum_to_one(t1, tmp_path):
    from credanno.bench.fig2 import fig2_from_table1
    from credanno.viz import save_figure

    f2 = fig2_from_table1(t1)
    assert set(f2.measured) == {"ours: trained, all labels", "ours: 10% 50-NN",
                                "ours: 1% trained"}
    for p in [*f2.measured.values(), *f2.reported.values()]:
        assert len(p) == 9 and p.sum() == pytest.approx(1.0)
    assert "SYNTHETIC" in f2.caption and "independence" in f2.caption
    assert "| ours: 1% trained | measured |" in f2.markdown()
    assert save_figure(f2.figure(), tmp_path / "fig2.png").stat().st_size > 1000


def test_fig4_with_cnn_baseline_on_same_subsets(syn, tmp_path):
    from credanno.bench.fig4 import CnnBaseline, run_fig4
    from credanno.viz import save_figure

    cnn = CnnBaseline({"arch": "test_resnet", "epochs": 1, "min_steps": 2, "batch_size": 32})
    f4 = run_fig4(syn["store"], fracs=[0.1, 1.0], seeds=[0], k=5, probe_epochs=5, cnn=cnn)
    series = list(dict.fromkeys(f4.raw["series"]))
    assert series == ["ours: 5-NN", "ours: trained (G_cls)", "end-to-end test_resnet (baseline)"]
    n_train = int((syn["table"]["split"] == "train").sum())
    cnn = f4.raw[f4.raw["series"].str.startswith("end-to-end")]
    knn = f4.raw[f4.raw["series"] == "ours: 5-NN"]
    # the baseline trained on the same number of labelled images as the k-NN bank
    np.testing.assert_array_equal(cnn["n_labelled"].to_numpy(), knn["n_labelled"].to_numpy())
    assert cnn["n_labelled"].max() == n_train
    # every series is scored on the same labelled test images: accuracies are counts of them
    test = syn["table"].query("split == 'test'")
    n_test = int((test["malignancy"] >= 0).sum())
    hits = f4.raw["acc"].to_numpy() * n_test
    np.testing.assert_allclose(hits, np.round(hits), atol=1e-6)
    assert "SYNTHETIC" in f4.caption()
    assert "| ours: 5-NN |" in f4.markdown()
    assert save_figure(f4.figure(), tmp_path / "fig4.png").stat().st_size > 1000


def test_fig4_needs_patch_file(tmp_path):
    from credanno import stores
    from credanno.bench.fig4 import run_fig4

    table = synthetic_table(n_nodules=20, per_nodule=2)
    store = stores.save(tmp_path / "s.h5", features={"cls": synthetic_features(table)},
                        table=table, provenance={"source": "synthetic"})
    with pytest.raises(CredannoError, match="--data PATH or --no-cnn"):
        run_fig4(store, fracs=[1.0], seeds=[0], k=3, probe_epochs=2)


def _write(path, text):
    path.write_text(textwrap.dedent(text))


def test_perf_runner_collects_rows(tmp_path):
    from credanno.bench.perf import perf_markdown, run_perf

    _write(tmp_path / "_helper.py", "FACTOR = 2.0\n")
    _write(tmp_path / "good.py", """
        from _helper import FACTOR
        def run(quick=False):
            return [{"benchmark": "good", "metric": "speed", "value": 10.0 * FACTOR,
                     "reference": 10.0, "ratio": FACTOR, "target": ">= 1", "ok": True,
                     "quick": quick}]
    """)
    _write(tmp_path / "notabench.py", "X = 1\n")
    _write(tmp_path / "broken.py", "def run(quick=False):\n    raise ValueError('boom')\n")
    df = run_perf(tmp_path, quick=True)
    assert list(df["script"]) == ["broken", "good"]
    good = df[df["script"] == "good"].iloc[0]
    assert good["ratio"] == 2.0 and good["ok"] and good["error"] == ""
    broken = df[df["script"] == "broken"].iloc[0]
    assert "ValueError: boom" in broken["error"] and not broken["ok"]
    md = perf_markdown(df, machine="test machine")
    assert md.startswith("Machine: test machine")
    assert "| good | speed | 20 | 10 | 2 | >= 1 | yes |" in md
    assert "failed: ValueError: boom" in md
    assert list(run_perf(tmp_path, only=["good"])["script"]) == ["good"]
    with pytest.raises(CredannoError, match="unknown benchmarks"):
        run_perf(tmp_path, only=["nope"])
    with pytest.raises(CredannoError, match="not found"):
        run_perf(tmp_path / "missing")


def test_pretrain_benchmark_runs_quick(one_torch_thread):
    """The shipped throughput benchmark drives the real trainer, so it breaks with it."""
    from pathlib import Path

    from credanno.bench.perf import run_perf

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    df = run_perf(bench_dir, quick=True, only=["pretrain_throughput"])
    assert (df["error"] == "").all(), df["error"].tolist()
    assert (df["value"].astype(float) > 0).all()


def test_machine_description():
    from credanno.bench.perf import machine_description

    text = machine_description()
    assert "cores" in text and "Python" in text


def test_bench_cli(syn, tmp_path, capsys):
    from credanno.cli import main
    from credanno.eval.options import first_seeds, parse_seeds

    assert first_seeds(3) == [0, 1, 2] and parse_seeds("3") == [3]
    assert parse_seeds("2-4") == [2, 3, 4] and parse_seeds("0,7") == [0, 7]
    csv = tmp_path / "t1.csv"
    main(["bench", "table1", "--store", str(syn["store"]), "--n-seeds", "1", "--probe-epochs",
          "3", "--csv", str(csv)])
    out = capsys.readouterr().out
    assert "Data: SYNTHETIC" in out and "| X-Caps |" in out and "majority baseline" in out
    assert csv.exists()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "table1", "--store", str(syn["store"]), "--seeds", "x"])
    assert exc.value.code == 2 and "--seeds 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "table1", "--store", str(tmp_path / "none.h5")])
    assert "not found" in capsys.readouterr().err
    _write(tmp_path / "b.py", """
        def run(quick=False):
            return [{"benchmark": "b", "metric": "m", "value": 1.0, "reference": 1.0,
                     "ratio": 1.0, "target": "", "ok": True}]
    """)
    main(["bench", "perf", "--quick", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Machine:" in out and "| b | m |" in out


@pytest.mark.filterwarnings("ignore::credanno.errors.CredannoWarning")
def test_table2_rows_run_or_say_why(syn, tmp_path):
    from credanno.bench.table2 import Table2Pretraining, run_table2

    tiny = {"epochs": 1, "model_kwargs": {"depth": 1}, "out_dim": 64, "head_hidden_dim": 32,
            "head_bottleneck_dim": 16, "batch_size": 32, "local_crops": 2,
            "warmup_epochs": 0}
    lines = []
    setup = Table2Pretraining(preset="cpu-tiny", resnet_arch="test_resnet", overrides=tiny)
    t2 = run_table2(syn["patch"], tmp_path / "t2", seeds=[0], setup=setup,
                    cnn={"epochs": 1, "min_steps": 2}, device="cpu", probe_epochs=3,
                    on_row=lines.append)
    rows = t2.rows.set_index(["encoder", "strategy", "init"])
    assert len(rows) == 6 and len(lines) == 6
    test = syn["table"].query("split == 'test'")
    n_test = int((test["malignancy"] >= 0).sum())
    for key in [("ResNet", "end-to-end", "no"), ("ViT", "end-to-end", "no"),
                ("ViT", "two-stage", "no")]:
        assert rows.loc[key, "status"] == "ok", rows.loc[key, "status"]
        # one seed, scored on the labelled test images of the patch file
        hits = rows.loc[key, "acc_mean"] * n_test
        assert rows.loc[key, "n_seeds"] == 1 and hits == pytest.approx(round(hits))
    for key in [("ResNet", "two-stage", "yes"), ("ViT", "two-stage", "yes")]:
        assert "no local ImageNet weights" in rows.loc[key, "status"]
    assert rows.loc[("ViT", "two-stage", "no"), "arch"] == "vit_tiny_patch16_224"
    md = t2.markdown()
    assert "| ViT | vit_tiny_patch16_224 | two-stage | no |" in md and "| 88.30 |" in md
    assert t2.data.kind == "synthetic"
