"""Array-level tests of the evaluation engine: k-NN, voting, metrics, subsets, probes."""

import warnings

import numpy as np
import pandas as pd
import pytest

from credanno.errors import CredannoError, CredannoWarning
from credanno.eval import metrics
from credanno.eval.data import EvalData
from credanno.eval.knn import (
    knn_classify,
    knn_search,
    knn_search_blocks,
    knn_sweep,
    knn_vote,
)
from credanno.eval.specs import KnnSpec, PaperRecipe, ProbeSpec, SubsetSpec
from credanno.eval.subsets import label_subset
from credanno.labels import LABEL_NAMES
from credanno.synthetic import synthetic_features, synthetic_table


def _split(table, x):
    tr = (table["split"] == "train").to_numpy()
    return (x[tr], table[tr].reset_index(drop=True), x[~tr],
            table[~tr].reset_index(drop=True))


# -- k-NN search and voting ---------------------------------------------------------------

def test_faiss_search_matches_bruteforce_numpy():
    rng = np.random.default_rng(0)
    bank, q = rng.normal(size=(300, 24)), rng.normal(size=(40, 24))
    sims, idx = knn_search(bank, q, 17)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    full = qn @ bn.T
    ref = np.argsort(-full, axis=1)[:, :17]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(full, ref, 1), atol=1e-5)


def test_blocked_search_equals_in_memory():
    rng = np.random.default_rng(1)
    bank, q = rng.normal(size=(500, 16)).astype(np.float32), rng.normal(size=(30, 16))
    sims, idx = knn_search(bank, q, 40)
    blocks = ((o, bank[o:o + 33]) for o in range(0, 500, 33))  # last block < k too
    s2, i2 = knn_search_blocks(blocks, q, 40)
    np.testing.assert_array_equal(idx, i2)
    np.testing.assert_allclose(sims, s2, atol=1e-6)


def test_weighted_and_majority_votes_by_hand():
    sims = np.array([[0.9, 0.8, 0.7, 0.1]])
    labels = np.array([[1, 0, 0, 0]])
    votes = knn_vote(sims, labels, [1, 2, 3, 4], 2, T=0.1)
    # exp(9) against exp(8) + exp(7) = 0.3679 e^9 + 0.1353 e^9: class 1 up to k=3
    assert [int(votes[k][0][0]) for k in (1, 2, 3)] == [1, 1, 1]
    w = np.exp(np.array([9.0, 8.0, 7.0, 1.0]))
    np.testing.assert_allclose(votes[4][1][0], [w[1:].sum() / w.sum(), w[0] / w.sum()])
    maj = knn_vote(sims, labels, [1, 3], 2, weighting="majority")
    assert int(maj[1][0][0]) == 1 and int(maj[3][0][0]) == 0
    np.testing.assert_allclose(maj[3][1][0], [2 / 3, 1 / 3])
    # a higher temperature flattens the weights: k=3 flips to class 0
    assert int(knn_vote(sims, labels, [3], 2, T=10.0)[3][0][0]) == 0


def test_multi_label_votes_equal_single_label_votes():
    rng = np.random.default_rng(2)
    sims = -np.sort(-rng.random((20, 30)), axis=1)
    labs = np.stack([rng.integers(0, 2, (20, 30)), rng.integers(0, 5, (20, 30))], axis=2)
    multi = knn_vote(sims, labs, [5, 30], [2, 5])
    for j, c in enumerate([2, 5]):
        single = knn_vote(sims, labs[:, :, j], [5, 30], c)
        for k in (5, 30):
            np.testing.assert_array_equal(multi[k][0][:, j], single[k][0])
            np.testing.assert_allclose(multi[k][1][j], single[k][1])


def test_knn_classify_clamps_k_and_rejects_bad_input():
    rng = np.random.default_rng(3)
    bank, q = rng.normal(size=(8, 4)), rng.normal(size=(5, 4))
    y = np.array([0, 1, 0, 1, 0, 1, -1, -1])  # two rows without a label drop out
    with pytest.warns(CredannoWarning, match="clamped to 6"):
        out = knn_classify(bank, y, q, [3, 50], 2)
    assert set(out) == {3, 50} and out[50].shape == (5,)
    with pytest.raises(CredannoError, match="positive"):
        knn_classify(bank, y, q, [0], 2)
    bad = bank.copy()
    bad[0, 0] = np.nan
    with pytest.raises(CredannoError, match="NaN"):
        knn_classify(bad, y, q, [3], 2)


# -- metrics ----------------------------------------------------------------------------

def test_metrics_worked_example():
    true = np.array([0, 1, 2, 3, 4, 4])
    pred = np.array([1, 1, 4, 3, 3, 0])
    assert metrics.accuracy(pred, true, 1) == pytest.approx(4 / 6)
    assert metrics.accuracy(pred, true, 0) == pytest.approx(2 / 6)
    # recalls: class0 0, class1 1, class2 0, class3 1, class4 0 -> 2/5
    assert metrics.balanced_accuracy(pred, true) == pytest.approx(2 / 5)
    # constant 3 is within 1 of 2, 3, 4, 4 -> 4/6 (the best constant)
    assert metrics.baseline_accuracy(true, 5, 1) == pytest.approx(4 / 6)
    assert metrics.baseline_accuracy(np.array([1, 1, 0]), 2, 0) == pytest.approx(2 / 3)
    dist = metrics.n_correct_distribution(np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]]))
    assert dist.tolist() == [1, 0, 1, 1]


def test_cluster_bootstrap_resamples_nodules():
    # nodule 1: 3 images all right; nodule 2: 1 image wrong -> acc 3/4
    ok = np.array([1, 1, 1, 0])
    groups = np.array([1, 1, 1, 2])
    lo, hi = metrics.bootstrap_ci(ok, groups, n_boot=2000, seed=0)
    # resampling nodules gives only 0, 3/4 or 1 (not image-level values like 1/2)
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0)
    counts = metrics.bootstrap_counts(groups, n_boot=500, seed=1)
    assert counts[0].sum(axis=1).tolist() == [2] * 500  # two nodules per resample
    all_right = metrics.bootstrap_ci(np.ones(6), np.arange(6), n_boot=100)
    assert all_right.tolist() == [1.0, 1.0]
    r2 = metrics.bootstrap_ci(np.stack([ok, 1 - ok], 1), groups, n_boot=2000, seed=0)
    np.testing.assert_allclose(r2[0], [lo, hi])
    assert np.isnan(metrics.bootstrap_ci(ok, groups, n_boot=0)).all()  # no interval asked for


# -- subsets ----------------------------------------------------------------------------

def _lidc_size_train(n=1904):
    t = synthetic_table(n_nodules=700, per_nodule=4, test_frac=0.0, seed=5)
    t = t[t["split"] == "train"].head(n).reset_index(drop=True)
    assert len(t) == n
    return t


def test_subset_sizes_determinism_and_nesting():
    t = _lidc_size_train()
    a = label_subset(t, frac=0.01, seed=3)
    assert len(a) == 19 and np.array_equal(a, label_subset(t, frac=0.01, seed=3))
    assert np.all(np.diff(a) > 0)
    assert not np.array_equal(a, label_subset(t, frac=0.01, seed=4))
    assert len(label_subset(t, frac=0.1, seed=3)) == 190
    assert set(a) <= set(label_subset(t, frac=0.1, seed=3))  # nested per seed
    assert len(label_subset(t, n=7, seed=0)) == 7
    with pytest.raises(CredannoError, match=r"\(0, 1\]"):
        label_subset(t, frac=0.0)


def test_subsets_never_touch_test_rows():
    t = synthetic_table(n_nodules=40, seed=0)
    with pytest.raises(CredannoError, match="training rows only"):
        label_subset(t, frac=0.5)
    train = t[t["split"] == "train"].reset_index(drop=True)
    for seed in range(5):
        rows = label_subset(train, frac=0.3, mode="nodule", seed=seed)
        assert rows.max() < len(train)


def test_nodule_subsets_take_whole_nodules_and_stratify():
    t = synthetic_table(n_nodules=60, per_nodule=3, test_frac=0.0, seed=2)
    t = t[t["split"] == "train"].reset_index(drop=True)
    rows = label_subset(t, frac=0.2, mode="nodule", seed=1)
    chosen = set(t["nodule_id"].iloc[rows])
    assert set(np.flatnonzero(t["nodule_id"].isin(chosen))) == set(rows)
    assert len(rows) >= round(0.2 * len(t))
    strat = label_subset(t, n=4, stratify=True, seed=0)
    assert set(t["malignancy"].iloc[strat]) == {0, 1}


# -- k-NN sweep -------------------------------------------------------------------------

def test_knn_sweep_records_and_blocks():
    t = synthetic_table(n_nodules=60, per_nodule=3, seed=1)
    x = synthetic_features(t, dim=16, signal=3.0)
    trx, trt, tex, tet = _split(t, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CredannoWarning)
        data = EvalData.from_arrays(trx, trt, tex, tet)
        subsets = SubsetSpec(fracs=[0.2, 1], seeds=[0, 1])
        r = knn_sweep(data, subsets, KnnSpec(ks=[1, 5, 500]))
        rb = knn_sweep(data, subsets, KnnSpec(ks=[1, 5, 500], block_rows=11))
    assert len(r.results) == len(LABEL_NAMES) * 3 * 2 * 2
    pd.testing.assert_frame_equal(r.results, rb.results)
    assert (r.results["n_test"] == len(tet)).all()
    # features that encode malignancy only: k-NN must beat the constant baseline
    rng = np.random.default_rng(0)
    xm = rng.normal(size=(len(t), 8)).astype(np.float32)
    xm[:, 0] += 4 * (2 * t["malignancy"].to_numpy() - 1)
    trm, _, tem, _ = _split(t, xm)
    rm = knn_sweep(EvalData.from_arrays(trm, trt, tem, tet, ["malignancy"]), knn=KnnSpec(ks=[5]))
    assert rm.results["acc"].iat[0] > 0.9 > rm.results["baseline_acc"].iat[0]
    # every k from one search equals a separate knn_classify per k
    sub = label_subset(trt, frac=0.2, seed=1)
    y = trt["texture"].to_numpy()[sub]
    ref = knn_classify(trx[sub], y, tex, [5], 5)[5]
    conf = [c for c in r._configs if c.k == 5 and c.frac == 0.2 and c.seed == 1][0]
    np.testing.assert_array_equal(conf.preds["texture"], ref)
    fig2 = r.n_correct_attributes
    assert set(fig2["attributes"]) == {"all", "summary"}
    per = fig2.groupby(["k", "frac", "seed", "attributes"])["count"].sum()
    assert (per == len(tet)).all()


def test_knn_sweep_missing_labels_are_left_out():
    t = synthetic_table(n_nodules=40, per_nodule=3, seed=3)
    t.loc[t.index[::4], "texture"] = -1
    x = synthetic_features(t, dim=16)
    trx, trt, tex, tet = _split(t, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CredannoWarning)
        r = knn_sweep(EvalData.from_arrays(trx, trt, tex, tet, ["malignancy", "texture"]),
                      knn=KnnSpec(ks=[3]))
    n_tex = int((tet["texture"] >= 0).sum())
    assert r.results.set_index("label").loc["texture", "n_test"] == n_tex
    # texture neighbours come only from rows labelled for texture
    keep = trt["texture"].to_numpy() >= 0
    ref = knn_classify(trx[keep], trt["texture"].to_numpy()[keep], tex, [3], 5)[3]
    np.testing.assert_array_equal(r._configs[0].preds["texture"], ref)


def test_knn_sweep_warns_when_k_is_clamped_and_names_k():
    t = synthetic_table(n_nodules=30, per_nodule=3, seed=1)
    data = EvalData.from_arrays(*_split(t, synthetic_features(t, dim=8)), ["malignancy"])
    rows = label_subset(data.train_table, frac=0.1, seed=0)
    bank = int((data.train_table["malignancy"].to_numpy()[rows] >= 0).sum())
    subsets = SubsetSpec(fracs=[0.1])
    with pytest.warns(CredannoWarning, match=rf"k=500 is larger than the labelled bank "
                                             rf"\({bank} rows\); k clamped"):
        r = knn_sweep(data, subsets, KnnSpec(ks=[5, 500]))
    # the clamped k votes with the whole bank: the same predictions as k = bank size
    ref = knn_sweep(data, subsets, KnnSpec(ks=[bank]))
    clamped = [c for c in r._configs if c.k == 500][0]
    np.testing.assert_array_equal(clamped.preds["malignancy"], ref._configs[0].preds["malignancy"])


def test_specs_validate_once_and_keep_canonical_values():
    s = SubsetSpec(fracs=0.5, seeds=3, stratify=True)
    assert s.fracs == (0.5,) and s.seeds == (3,) and s.stratify == "malignancy"
    assert s.sizes(10) == [(0.5, 0.5, None)]
    assert SubsetSpec(n_labels=[4]).sizes(8) == [(0.5, None, 4)]
    assert KnnSpec(ks=[50, 10, 10]).ks == (10, 50)
    with pytest.raises(CredannoError, match="unknown subset mode"):
        SubsetSpec(mode="patient")
    with pytest.raises(CredannoError, match=r"label fraction must be in \(0, 1\]"):
        SubsetSpec(fracs=[0.1, 1.5])
    with pytest.raises(CredannoError, match="--block-rows must be positive"):
        KnnSpec(block_rows=0)
    with pytest.raises(CredannoError, match="unknown weighting"):
        KnnSpec(weighting="linear")
    with pytest.raises(CredannoError, match="unknown selection"):
        ProbeSpec(select="test")


def test_one_draw_of_subsets_serves_every_method():
    from credanno.eval.subsets import draw_subsets

    t = synthetic_table(n_nodules=30, per_nodule=3, seed=2).query("split == 'train'")
    t = t.reset_index(drop=True)
    spec = SubsetSpec(fracs=[0.1, 0.5], seeds=[0, 1], mode="nodule")
    drawn = draw_subsets(spec, t)
    assert [(s.frac, s.seed) for s in drawn] == [(0.1, 0), (0.1, 1), (0.5, 0), (0.5, 1)]
    for s in drawn:
        np.testing.assert_array_equal(s.rows, label_subset(t, frac=s.frac, mode="nodule",
                                                           seed=s.seed))
        np.testing.assert_array_equal(s.groups, t["nodule_id"].to_numpy()[s.rows])


def test_eval_data_closes_the_store_it_opened(tmp_path):
    from credanno import stores
    from credanno.eval.data import open_eval_data

    t = synthetic_table(n_nodules=20, per_nodule=2, seed=0)
    path = stores.save(tmp_path / "s.h5", features={"cls": synthetic_features(t, dim=8)},
                       table=t, provenance={"source": "synthetic"})
    with open_eval_data(path, "cls", load_train=False) as data:
        store = data._train_store
        first = next(data.train_blocks(5))
        assert first[0] == 0 and first[1].shape == (5, 8)
    assert data._train_store is None and store._closed


# -- probes -----------------------------------------------------------------------------

def test_probe_matches_logistic_regression_on_separable_data():
    from sklearn.linear_model import LogisticRegression

    from credanno.eval.probe import JointLinearProbe

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 20)).astype(np.float32)
    w = rng.normal(size=20)
    y = (X @ w > 0).astype(int)
    Xt = rng.normal(size=(200, 20)).astype(np.float32)
    yt = (Xt @ w > 0).astype(int)
    probe = JointLinearProbe(recipe="paper", paper=PaperRecipe(epochs=60, lr=0.05)).fit(X, y)
    sk = LogisticRegression(C=100, max_iter=1000).fit(X, y)
    assert probe.score(Xt, yt) > 0.95 and sk.score(Xt, yt) > 0.95
    proba = probe.predict_proba(Xt)
    assert proba.shape == (200, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)


def test_joint_probe_gradients_match_autograd():
    """The trained module (one nn.Linear per head, fused SGD) == Eq. 3 written out on raw
    tensors with autograd, torch.optim.SGD and CosineAnnealingLR."""
    import torch

    from credanno.eval.probe import HeadLayout, ProbeRun, train_joint_heads

    rng = np.random.default_rng(1)
    n, D = 50, 6
    X = rng.normal(size=(n, D)).astype(np.float32)
    Y = np.stack([rng.integers(0, 2, n), rng.integers(0, 3, n), rng.integers(0, 4, n)], 1)
    Y[::7, 1] = -1  # missing labels are ignored by that head
    lay = HeadLayout(["malignancy", "a", "b"], [2, 3, 4], cls=0)
    epochs, lr = 3, 0.1
    heads = train_joint_heads(X, Y, lay, [ProbeRun(np.arange(n), lr, 4)],
                              ProbeSpec(recipe="paper", epochs=epochs, batch_size=n,
                                        standardize=False))
    g = torch.Generator().manual_seed(4)
    Wx = (torch.randn(D, 9, generator=g) * 0.01).requires_grad_()
    Wz = (torch.randn(7, 2, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(9, requires_grad=True)
    opt = torch.optim.SGD([Wx, b, Wz], lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    ce = torch.nn.CrossEntropyLoss(ignore_index=-1)
    for _ in range(epochs):
        Z = Xt @ Wx + b
        ze_a, ze_b = Z[:, :3], Z[:, 3:7]
        zc = Z[:, 7:] + torch.cat([ze_a, ze_b], 1) @ Wz  # G_cls(f + z_exp), Eq. 3
        loss = ce(zc, Yt[:, 0]) + ce(ze_a, Yt[:, 1]) + ce(ze_b, Yt[:, 2])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    np.testing.assert_allclose(heads.exp.W_x[0].numpy(), Wx.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(heads.exp.W_z[0].numpy(), Wz.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(heads.exp.b[0].numpy(), b.detach().numpy(), atol=1e-5)


def test_batched_configurations_equal_separate_runs():
    from credanno.eval.probe import HeadLayout, ProbeRun, train_joint_heads

    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 8)).astype(np.float32)
    Y = np.stack([rng.integers(0, 2, 300), rng.integers(0, 5, 300)], 1)
    lay = HeadLayout(["malignancy", "texture"], [2, 5], cls=0)
    rows = [np.arange(0, 300), np.arange(0, 30), np.arange(100, 250)]
    spec = ProbeSpec(recipe="paper", epochs=4, batch_size=64, standardize=True)
    runs = [ProbeRun(r, lr, seed) for seed, (r, lr) in enumerate(zip(rows, [0.01, 0.02, 0.03],
                                                                     strict=True))]
    together = train_joint_heads(X, Y, lay, runs, spec)
    for c in range(3):
        alone = train_joint_heads(X, Y, lay, [runs[c]], spec)
        for a, b in zip(together.exp, alone.exp, strict=True):
            np.testing.assert_allclose(a[c].numpy(), b[0].numpy(), rtol=1e-4, atol=1e-6)


def test_probe_sweep_select_val_and_views():
    from credanno.eval.probe import probe_sweep, split_validation

    t = synthetic_table(n_nodules=50, per_nodule=3, seed=4)
    x = synthetic_features(t, dim=16, signal=3.0)
    trx, trt, tex, tet = _split(t, x)
    views = np.stack([trx + 0.1, trx - 0.1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CredannoWarning)
        r = probe_sweep(EvalData.from_arrays(trx, trt, tex, tet, train_views=views),
                        SubsetSpec(fracs=[0.5, 1], seeds=[0, 1]),
                        ProbeSpec(recipe="paper", epochs=5, select="val"))
    assert len(r.results) == 2 * 2 * len(LABEL_NAMES)
    assert r.results["k"].isna().all() and set(r.results["method"]) == {"probe"}
    assert r.config["views"] == 2
    fit, val = split_validation(np.arange(10, 30), 0.2, seed=0)
    assert len(val) == 4 and not set(fit) & set(val) and set(fit) | set(val) == set(range(10, 30))
    with pytest.raises(CredannoError, match="too few"):
        split_validation(np.array([3]), 0.2, seed=0)


def test_vectorised_metrics_equal_scalar_ones_and_json_nulls():
    from credanno.eval.results import ConfigPredictions, build_result

    rng = np.random.default_rng(5)
    true = rng.integers(0, 4, 50)
    preds = rng.integers(0, 4, (50, 3))
    cols = metrics.balanced_accuracy_columns(preds, true)
    for j in range(3):
        assert cols[j] == pytest.approx(metrics.balanced_accuracy(preds[:, j], true))
    t = synthetic_table(n_nodules=20, per_nodule=2, seed=1)
    test = t[t["split"] == "test"].reset_index(drop=True)
    p = {"malignancy": test["malignancy"].to_numpy(),
         "texture": np.clip(test["texture"].to_numpy() + 1, 0, 4)}
    pr = {k: np.eye(5 if k == "texture" else 2)[v] for k, v in p.items()}
    r = build_result([ConfigPredictions("knn", 3, 1.0, 0, 10, p, pr)], test,
                     ["malignancy", "texture"])
    rec = r.records()
    assert rec[0]["acc"] == 1.0 and rec[1]["acc"] == 1.0  # texture off by <= 1
    assert rec[1]["exact_acc"] < 1.0
    summary = r.records("summary")[0]
    assert summary["acc_sd"] is None and summary["n_seeds"] == 1  # one seed: no sd
    import json
    assert set(json.loads(r.to_json())) == {"results", "summary", "config"}


def test_probe_sweep_equals_one_probe_per_subset():
    """A sweep's batched configurations are the estimator trained alone on each subset."""
    from credanno.eval.probe import JointLinearProbe, paper_lr, probe_sweep

    t = synthetic_table(n_nodules=40, per_nodule=3, seed=4)
    trx, trt, tex, tet = _split(t, synthetic_features(t, dim=12, signal=3.0))
    labels = ["malignancy", "texture"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CredannoWarning)
        r = probe_sweep(EvalData.from_arrays(trx, trt, tex, tet, labels),
                        SubsetSpec(fracs=[0.3], seeds=[0, 1]),
                        ProbeSpec(recipe="paper", epochs=3, standardize=False))
    for c, seed in enumerate((0, 1)):
        rows = label_subset(trt, frac=0.3, seed=seed)
        est = JointLinearProbe(recipe="paper", paper=PaperRecipe(epochs=3, lr=paper_lr(0.3)),
                               seed=seed, standardize=False)
        proba = est.fit(trx[rows], trt[labels].iloc[rows]).predict_proba(tex)
        for j, name in enumerate(labels):
            np.testing.assert_allclose(r._configs[c].probas[name], proba[j], atol=1e-6)
