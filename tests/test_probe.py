"""The linear probes G_exp/G_cls (Eq. 3): the tuned recipe against scikit-learn, its
guarantees (absent classes, constant guess, CV inside the labelled rows), the paper recipe
pinned, and the estimator protocol."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from credanno.errors import CredannoError, CredannoWarning
from credanno.eval.data import EvalData
from credanno.eval.specs import ProbeSpec, SubsetSpec
from credanno.synthetic import synthetic_features, synthetic_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(noise: float, seed: int, n: int = 300, d: int = 10, k: int = 3):
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n + 400, d)) * rng.uniform(0.5, 3, d)).astype(np.float32)
    w = rng.normal(size=(d, k))
    y = (X @ w / X.std(0).mean() + noise * rng.normal(size=(n + 400, k))).argmax(1)
    return X[:n], y[:n], X[n:], y[n:]


@pytest.mark.parametrize("noise", [0.0, 1.5])
def test_tuned_probe_matches_logistic_regression(noise):
    """Same penalty, same standardised features: scikit-learn's predictions on >= 99%."""
    from sklearn.linear_model import LogisticRegression

    from credanno.eval.probe import JointLinearProbe

    X, y, Xt, yt = _problem(noise, seed=3, n=200)
    mu, sd = X.mean(0), X.std(0)
    for C in (0.05, 1.0):
        ours = JointLinearProbe(Cs=(C,)).fit(X, y).predict(Xt)
        sk = LogisticRegression(C=C, max_iter=5000, tol=1e-8).fit((X - mu) / sd, y)
        assert (ours == sk.predict((Xt - mu) / sd)).mean() >= 0.99


def test_tuned_probe_is_a_scikit_learn_estimator():
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV

    from credanno.eval.probe import JointLinearProbe

    X, y, Xt, yt = _problem(1.0, seed=4, n=120)
    est = JointLinearProbe(Cs=(0.1,), seed=2)
    twin = clone(est)
    assert twin.get_params() == est.get_params() and not hasattr(twin, "heads_")
    assert est.set_params(cv=3) is est and est.cv == 3
    grid = GridSearchCV(JointLinearProbe(), {"Cs": [(0.001,), (1.0,)]}, cv=3).fit(X, y)
    assert grid.best_params_["Cs"] in [(0.001,), (1.0,)]
    assert grid.best_estimator_.heads_ is not None and grid.score(Xt, yt) > 0.4


def test_absent_classes_are_never_predicted_and_cv_stays_in_the_subset():
    """A class missing from the labelled rows gets probability 0; the heads depend only
    on the labelled rows (other rows' labels and the test split are never read)."""
    from credanno.eval.probe import HeadLayout, ProbeRun, _predict_heads, train_joint_heads

    X, y, Xt, _ = _problem(0.5, seed=5, n=200, k=4)
    rows = np.flatnonzero(y != 2)[:60]
    lay = HeadLayout(["a"], [4], None)
    spec = ProbeSpec(device="cpu")
    heads = train_joint_heads(X, y[:, None], lay, [ProbeRun(rows)], spec)
    import torch

    proba = _predict_heads(heads, torch.from_numpy(Xt))[0][0].numpy()
    assert (proba[:, 2] == 0).all() and (proba.argmax(1) != 2).all()
    scrambled = y.copy()
    others = np.setdiff1d(np.arange(len(y)), rows)
    scrambled[others] = np.random.default_rng(0).permutation(scrambled[others])
    again = train_joint_heads(X, scrambled[:, None], lay, [ProbeRun(rows)], spec)
    torch.testing.assert_close(again.exp.W_x, heads.exp.W_x)


def _data(signal: float, n_nodules: int = 90, dim: int = 24, labels=None):
    t = synthetic_table(n_nodules=n_nodules, per_nodule=3, seed=7)
    x = synthetic_features(t, dim=dim, signal=signal)
    tr, te = (t["split"] == "train").to_numpy(), (t["split"] == "test").to_numpy()
    return EvalData.from_arrays(x[tr], t[tr].reset_index(drop=True), x[te],
                                t[te].reset_index(drop=True), labels)


def test_tuned_probe_is_never_much_worse_than_a_constant():
    """Pure-noise features: the tuned heads do about as well as the best constant guess
    that the labelled rows suggest, under the paper's +/-1 metric."""
    from credanno.eval.probe import probe_sweep
    from credanno.eval.subsets import draw_subsets
    from credanno.eval.tuned import decide
    from credanno.labels import label_spec

    data = _data(signal=0.0)
    subsets = SubsetSpec(fracs=[0.2], seeds=[0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CredannoWarning)
        r = probe_sweep(data, subsets, ProbeSpec(), n_boot=10)
    assert r.config["recipe"] == "tuned" and r.config["Cs"]
    acc = r.results.set_index(["seed", "label"])["acc"]
    for s in draw_subsets(subsets, data.train_table):
        for name in data.labels:
            spec = label_spec(name)
            y = data.train_table[name].to_numpy()[s.rows]
            prior = np.bincount(y[y >= 0], minlength=spec.n_classes)
            const = decide(prior[None] / prior.sum(), spec.tolerance)[0]
            yt = data.test_table[name].to_numpy()
            const_acc = (np.abs(yt[yt >= 0] - const) <= spec.tolerance).mean()
            assert acc[(s.seed, name)] >= const_acc - 0.05, (name, s.seed)


def test_tuned_probe_learns_g_cls_from_features_and_attribute_logits():
    """With signal, G_cls (on f (+) z_exp, Eq. 3) and the attribute heads beat chance."""
    from credanno.eval.probe import probe_sweep

    labels = ["malignancy", "subtlety", "texture"]
    r = probe_sweep(_data(signal=3.0, labels=labels), SubsetSpec(fracs=[1.0]), ProbeSpec(),
                    n_boot=10)
    acc = r.results.set_index("label")["acc"]
    assert acc["malignancy"] > 0.9 and acc["subtlety"] > 0.9 and acc["texture"] > 0.9


def test_paper_recipe_is_pinned():
    """Today's paper-recipe numbers, to the printed digit (a cheap regression guard)."""
    from credanno.eval.probe import probe_sweep

    labels = ["malignancy", "texture", "subtlety"]
    r = probe_sweep(_data(signal=1.0, n_nodules=40, dim=8, labels=labels),
                    SubsetSpec(fracs=[0.5, 1.0], seeds=[0]),
                    ProbeSpec(recipe="paper", epochs=4, batch_size=16, device="cpu"),
                    n_boot=10)
    got = r.results.set_index(["frac", "label"])["acc"].round(6).to_dict()
    assert got == {(0.5, "malignancy"): 0.404762, (1.0, "malignancy"): 0.52381,
                   (0.5, "texture"): 0.547619, (1.0, "texture"): 0.547619,
                   (0.5, "subtlety"): 0.547619, (1.0, "subtlety"): 0.571429}
    np.testing.assert_allclose(r._configs[0].probas["texture"][:2],
                               [[0.200309, 0.196065, 0.203198, 0.198745, 0.201683],
                                [0.19395, 0.198426, 0.20894, 0.19846, 0.200224]], atol=2e-6)


def test_cls_grad_off_equals_autograd_with_z_exp_detached():
    """``cls_grad=False``: G_cls's loss does not reach the attribute heads (autograd with
    ``z_exp.detach()`` in Eq. 3), i.e. each attribute head trains on its own loss."""
    import torch

    from credanno.eval.probe import HeadLayout, ProbeRun, train_joint_heads

    rng = np.random.default_rng(1)
    n, D, epochs, lr = 40, 5, 3, 0.1
    X = rng.normal(size=(n, D)).astype(np.float32)
    Y = np.stack([rng.integers(0, 2, n), rng.integers(0, 3, n)], 1)
    heads = train_joint_heads(X, Y, HeadLayout(["malignancy", "a"], [2, 3], cls=0),
                              [ProbeRun(np.arange(n), lr, 4)],
                              ProbeSpec(recipe="paper", epochs=epochs, batch_size=n,
                                        standardize=False, cls_grad=False))
    g = torch.Generator().manual_seed(4)
    Wx = (torch.randn(D, 5, generator=g) * 0.01).requires_grad_()
    Wz = (torch.randn(3, 2, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(5, requires_grad=True)
    opt = torch.optim.SGD([Wx, b, Wz], lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    for _ in range(epochs):
        Z = Xt @ Wx + b
        zc = Z[:, 3:] + Z[:, :3].detach() @ Wz
        loss = (torch.nn.functional.cross_entropy(zc, Yt[:, 0])
                + torch.nn.functional.cross_entropy(Z[:, :3], Yt[:, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    np.testing.assert_allclose(heads.exp.W_x[0].numpy(), Wx.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(heads.exp.W_z[0].numpy(), Wz.detach().numpy(), atol=1e-5)


def test_heads_module_is_an_nn_module_and_cls_grad_off_detaches_z_exp():
    """G_exp/G_cls are a real ``nn.Module`` (one ``nn.Linear`` per attribute, G_cls on
    f (+) z_exp); ``cls_grad=False``: G_cls's loss gives the attribute heads no gradient."""
    import torch

    from credanno.eval.heads import JointHeadsModule
    from credanno.eval.probe import HeadLayout

    lay = HeadLayout(["malignancy", "a", "b"], [2, 3, 4], cls=0)
    D = 6
    x = torch.randn(10, D)
    target = torch.stack([torch.randint(0, 3, (10,)), torch.randint(0, 4, (10,)),
                          torch.randint(0, 2, (10,))], 1)  # layout.order: a, b, malignancy
    target[:, :2] = -1  # only G_cls is labelled
    for cls_grad in (True, False):
        m = JointHeadsModule(lay, D, torch.Generator().manual_seed(3), cls_grad=cls_grad)
        assert isinstance(m, torch.nn.Module) and len(m.exp) == 2
        assert all(isinstance(h, torch.nn.Linear) for h in [*m.exp, m.cls])
        assert [h.out_features for h in m.exp] == [3, 4] and m.cls.in_features == D + 7
        logits = m(x)
        assert [z.shape for z in logits] == [(10, 3), (10, 4), (10, 2)]
        m.loss(logits, target).backward()
        exp_grad = sum(float(h.weight.grad.abs().sum()) for h in m.exp)
        assert (exp_grad > 0) == cls_grad and float(m.cls.weight.grad.abs().sum()) > 0
    # the weights start as the batched trainer drew them: one (D, W) block, then W_z
    g = torch.Generator().manual_seed(3)
    Wx, Wz = torch.randn(D, 9, generator=g) * 0.01, torch.randn(7, 2, generator=g) * 0.01
    exported = m.export()
    torch.testing.assert_close(exported.W_x[0], Wx, rtol=0, atol=0)
    torch.testing.assert_close(exported.W_z[0], Wz, rtol=0, atol=0)
    assert float(m.loss(m(x), torch.full((10, 3), -1)).detach()) == 0  # no labels: 0, not NaN


def test_soft_one_hot_targets_equal_hard_labels():
    """Soft targets that are the one-hot labels train exactly the heads of the labels
    (paper recipe), also where the hard label is missing; a malformed block is refused."""
    import torch

    from credanno.eval.estimator import JointLinearProbe
    from credanno.eval.probe import HeadLayout, ProbeRun, train_joint_heads
    from credanno.eval.specs import PaperRecipe

    rng = np.random.default_rng(6)
    n, D = 90, 5
    X = rng.normal(size=(n, D)).astype(np.float32)
    Y = np.stack([rng.integers(0, 2, n), rng.integers(0, 3, n)], 1)
    lay = HeadLayout(["malignancy", "a"], [2, 3], cls=0)
    hidden = Y.copy()
    hidden[::2] = -1  # these rows' labels come as soft targets only
    per_label = [np.where((np.arange(n) % 2 == 0)[:, None], np.eye(c)[Y[:, i]], np.nan)
                 for i, c in enumerate(lay.n_classes)]
    soft = lay.to_columns(per_label, n)
    spec = ProbeSpec(recipe="paper", epochs=3, batch_size=16, device="cpu")
    runs = [ProbeRun(np.arange(n), 0.05, 0), ProbeRun(np.arange(40), 0.05, 1),
            ProbeRun(np.arange(40, 80), 0.05, 2)]  # the last two step together
    hard = train_joint_heads(X, Y, lay, runs, spec)
    softly = train_joint_heads(X, hidden, lay, runs, spec, soft=soft)
    for a, b in zip(hard.exp, softly.exp, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    est = JointLinearProbe(recipe="paper", paper=PaperRecipe(epochs=3, batch_size=16, lr=0.05))
    p_hard = est.fit(X, Y).predict_proba(X)
    p_soft = est.fit(X, hidden, soft=per_label).predict_proba(X)
    for a, b in zip(p_hard, p_soft, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    soft[0, 0] = np.nan  # one NaN in a row's block of numbers
    with pytest.raises(CredannoError, match="soft targets of a"):
        train_joint_heads(X, Y, lay, runs, spec, soft=soft)


def test_configurations_stepping_together_equal_separate_runs():
    """Configurations with equal steps per epoch and lr step together (torch.func); each
    ends exactly as trained alone, with views and best-epoch selection too."""
    from credanno.eval.probe import HeadLayout, ProbeRun, split_validation, train_joint_heads

    rng = np.random.default_rng(8)
    n = 200
    X = rng.normal(size=(n, 7)).astype(np.float32)
    Y = np.stack([rng.integers(0, 2, n), rng.integers(0, 5, n)], 1)
    Y[::9, 1] = -1
    views = np.stack([X + 0.05, X - 0.05, 2 * X])
    lay = HeadLayout(["malignancy", "texture"], [2, 5], cls=0)
    runs = []
    for seed, rows in enumerate([np.arange(0, 70), np.arange(60, 140), np.arange(120, 195)]):
        fit, val = split_validation(rows, 0.2, seed)
        runs.append(ProbeRun(fit, 0.05, seed, val))
    spec = ProbeSpec(recipe="paper", epochs=4, batch_size=16, select="val", device="cpu")
    together = train_joint_heads(X, Y, lay, runs, spec, views=views)
    for c, run in enumerate(runs):
        alone = train_joint_heads(X, Y, lay, [run], spec, views=views)
        for params_t, params_a in ((together.exp, alone.exp), (together.cls, alone.cls)):
            for a, b in zip(params_t, params_a, strict=True):
                np.testing.assert_allclose(a[c].numpy(), b[0].numpy(), rtol=1e-5, atol=1e-6)


def test_paper_recipe_settings_are_one_estimator_parameter():
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV

    from credanno.eval.estimator import JointLinearProbe
    from credanno.eval.specs import PaperRecipe

    X, y, Xt, yt = _problem(1.0, seed=4, n=120)
    est = JointLinearProbe(recipe="paper", paper=PaperRecipe(epochs=5, lr=1e-3))
    twin = clone(est)
    assert twin.get_params() == est.get_params() and twin.paper == PaperRecipe(5, 1e-3)
    grid = GridSearchCV(JointLinearProbe(recipe="paper"),
                        {"paper": [PaperRecipe(epochs=20, lr=1e-4),
                                   PaperRecipe(epochs=20, lr=0.05)]}, cv=3).fit(X, y)
    assert grid.best_params_["paper"].lr == 0.05 and grid.score(Xt, yt) > 0.4
    with pytest.raises(CredannoError, match="unknown selection"):
        PaperRecipe(select="best")
    with pytest.raises(CredannoError, match="--lr"):
        PaperRecipe(lr=-1.0)


def test_probe_spec_recipes():
    from credanno.eval.probe import PROBE_RECIPES

    assert set(PROBE_RECIPES) == {"tuned", "paper"} and ProbeSpec().recipe == "tuned"
    with pytest.raises(CredannoError, match="unknown probe recipe"):
        ProbeSpec(recipe="fast")
    with pytest.raises(CredannoError, match="--recipe paper"):
        ProbeSpec(lr=1e-3)
    with pytest.raises(CredannoError, match="--recipe paper"):
        ProbeSpec(select="val")
    assert ProbeSpec(recipe="paper", lr=1e-3, select="val").lr == 1e-3


def test_decide_maximises_the_metric_among_allowed_classes():
    from credanno.eval.tuned import decide

    flat = np.full((1, 5), 0.2)
    assert decide(flat, 0)[0] == 0 and decide(flat, 1)[0] in (1, 2, 3)
    assert decide(flat, 1, np.array([True, False, False, False, True]))[0] in (0, 4)
    p = pd.DataFrame([[0.45, 0.0, 0.0, 0.3, 0.25]]).to_numpy()
    assert decide(p, 0)[0] == 0 and decide(p, 1)[0] in (3, 4)


def _soft_problem():
    """Features, labels (two attributes + G_cls) and their layout, for soft targets."""
    from credanno.eval.probe import HeadLayout

    X, y, _, _ = _problem(1.0, seed=6, n=90, k=3)
    rng = np.random.default_rng(6)
    Y = np.stack([y, (X[:, 0] > 0).astype(int) + (X[:, 1] > 1), X[:, 2] > 0], 1).astype(int)
    Y[rng.random(len(Y)) < 0.1, 1] = -1  # some missing attribute labels
    return X, Y, HeadLayout(["a", "b", "malignancy"], [3, 3, 2], cls=2)


def test_one_hot_soft_targets_fit_exactly_as_hard_labels():
    """Soft targets that are one-hot give bit-identical tuned heads (weights, biases,
    classes present, CV folds stratified on their argmax) to the hard labels, even where
    the hard label is removed; all-NaN soft rows mean "the hard label"."""
    import torch

    from credanno.eval.probe import ProbeRun, train_joint_heads

    X, Y, lay = _soft_problem()
    rows = np.arange(0, 90, 2)
    spec = ProbeSpec(device="cpu")
    hard = train_joint_heads(X, Y, lay, [ProbeRun(rows)], spec)
    pick = np.random.default_rng(0).random(len(Y)) < 0.5
    soft_list = []
    for i in range(3):
        q = np.full((len(Y), lay.n_classes[i]), np.nan)
        ok = pick & (Y[:, i] >= 0)
        q[ok] = np.eye(lay.n_classes[i])[Y[ok, i]]
        soft_list.append(q)
    Ys = np.where(pick[:, None], -1, Y)  # the soft rows keep no hard label
    soft = train_joint_heads(X, Ys, lay, [ProbeRun(rows)], spec,
                             soft=lay.to_columns(soft_list, len(Y)))
    for a, b in zip((*hard.exp, hard.mask), (*soft.exp, soft.mask), strict=True):
        assert torch.equal(a, b)
    nan = train_joint_heads(X, Y, lay, [ProbeRun(rows)], spec,
                            soft=np.full((len(Y), lay.width), np.nan))
    assert torch.equal(nan.exp.W_x, hard.exp.W_x)


def test_soft_targets_move_the_fit():
    """A row with q = (0.5, 0.5) trains differently from its hard label; soft targets
    need probabilities and the layout's shape (both recipes take them)."""
    from credanno.eval.probe import JointLinearProbe

    X, y, Xt, _ = _problem(1.0, seed=8, n=40, k=2)
    q = np.full((len(y), 2), np.nan)
    q[:5] = 0.5
    hard = JointLinearProbe(Cs=(1.0,)).fit(X, y)
    soft = JointLinearProbe(Cs=(1.0,)).fit(X, y, soft=q)
    assert not np.allclose(hard.predict_proba(Xt), soft.predict_proba(Xt), atol=1e-4)
    same = JointLinearProbe(Cs=(1.0,)).fit(X, y, soft=np.full((len(y), 2), np.nan))
    np.testing.assert_array_equal(same.predict_proba(Xt), hard.predict_proba(Xt))
    q[0] = (0.7, 0.7)
    with pytest.raises(CredannoError, match="must be probabilities"):
        JointLinearProbe(Cs=(1.0,)).fit(X, y, soft=q)
    paper = JointLinearProbe(recipe="paper")
    p_hard = paper.fit(X, y).predict_proba(Xt)
    assert not np.allclose(paper.fit(X, y, soft=q[1:2].repeat(40, 0) * 0 + 0.5)
                           .predict_proba(Xt), p_hard, atol=1e-4)
    with pytest.raises(CredannoError, match="expected \\(40, 2\\)"):
        JointLinearProbe().fit(X, y, soft=np.full((39, 2), 0.5))


def test_batched_lbfgs_is_torch_lbfgs_per_problem():
    """Each row of ``batch_lbfgs`` takes ``torch.optim.LBFGS``'s path on that problem alone
    (strong Wolfe search with extrapolation and zoom, stopping tests, max_iter), however
    long the others run."""
    import torch

    from credanno.eval.lbfgs import batch_lbfgs

    g = torch.Generator().manual_seed(0)
    nb, n, N = 6, 30, 12
    A = (torch.randn(nb, n, N, generator=g, dtype=torch.float64)
         * torch.logspace(-1, 1, nb, dtype=torch.float64)[:, None, None])
    y = (torch.rand(nb, n, generator=g) < 0.5).double()
    lam = torch.logspace(-4, 0, nb, dtype=torch.float64)

    def loss(x, k):  # L2-penalised logistic loss of problem k
        z = A[k] @ x
        return (torch.nn.functional.softplus(z) - y[k] * z).sum() + 0.5 * lam[k] * x @ x

    def make_fg(idx):
        ks = torch.arange(nb) if idx is None else idx

        def fg(X):
            z = torch.bmm(A[ks], X[:, :, None])[..., 0]
            f = ((torch.nn.functional.softplus(z) - y[ks] * z).sum(1)
                 + 0.5 * lam[ks] * (X * X).sum(1))
            grad = torch.bmm(A[ks].transpose(1, 2), (torch.sigmoid(z) - y[ks])[..., None])[..., 0]
            return f, grad + lam[ks][:, None] * X
        return fg

    x0 = torch.full((nb, N), 0.3, dtype=torch.float64)
    for max_iter in (8, 100):
        ours = batch_lbfgs(make_fg, x0, max_iter)
        for k in range(nb):
            x = x0[k].clone().requires_grad_()
            opt = torch.optim.LBFGS([x], lr=1, max_iter=max_iter, history_size=10,
                                    tolerance_grad=1e-5, tolerance_change=1e-8,
                                    line_search_fn="strong_wolfe")

            def closure(x=x, k=k, opt=opt):
                opt.zero_grad()
                f = loss(x, k)
                f.backward()
                return f

            opt.step(closure)
            torch.testing.assert_close(ours[k], x.detach(), atol=1e-8, rtol=1e-7)


def _head_proba(h, Xt, lay):
    """Per-head probabilities of one configuration's tuned heads on features Xt."""
    import torch

    Z = Xt @ h.W_x + h.b
    if h.W_z is not None:
        Z = torch.cat([Z[:, :lay.n_exp], Z[:, lay.n_exp:] + Z[:, :lay.n_exp] @ h.W_z], 1)
    Z = Z.masked_fill(~h.allowed, -np.inf)
    return [torch.softmax(Z[:, lay.starts[j]:lay.starts[j + 1]], 1).numpy()
            for j in range(len(lay.order))]


def test_batched_configurations_fit_as_each_alone():
    """Configurations with the same number of labelled rows are fitted as one batch:
    every one gets what it gets alone (penalty per head, heads, predictions), including
    nodule-grouped folds, rank-deficient rows (each row twice: a zero-padded basis) and
    soft targets; the rank-deficient one also matches scikit-learn at its penalty."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from credanno.eval.probe import HeadLayout
    from credanno.eval.tuned import fit_tuned_config, fit_tuned_configs

    X, y, Xt, _ = _problem(1.0, seed=9, n=200, d=60, k=3)
    Y = np.stack([y, (X[:, 0] > 0).astype(int) + (X[:, 1] > 1), X[:, 2] > 0], 1).astype(int)
    lay = HeadLayout(["a", "b", "malignancy"], [3, 3, 2], cls=2)
    mu, sd = X.mean(0), X.std(0)
    Xs, Xts = (X - mu) / sd, torch.from_numpy((Xt - mu) / sd).double()
    rng = np.random.default_rng(9)
    rows = [rng.choice(200, 40, replace=False), rng.choice(200, 40, replace=False),
            np.repeat(rng.choice(200, 20, replace=False), 2), rng.choice(200, 40, replace=False)]
    groups = [None, rows[1] // 3, None, None]
    soft = np.full((40, lay.width), np.nan)
    soft[:15, lay.columns(1)] = rng.dirichlet(np.ones(3), 15)
    softs = [None, None, None, soft]
    Xc = [torch.from_numpy(Xs[r]).double() for r in rows]
    batch = fit_tuned_configs(Xc, [Y[r] for r in rows], lay, groups, soft_list=softs)
    for i, r in enumerate(rows):
        alone = fit_tuned_config(Xc[i], Y[r], lay, groups[i], soft=softs[i])
        np.testing.assert_array_equal(batch[i].C, alone.C)
        for p, q in zip(_head_proba(batch[i], Xts, lay), _head_proba(alone, Xts, lay),
                        strict=True):
            assert np.abs(p - q).max() <= 1e-6
            assert (p.argmax(1) == q.argmax(1)).mean() >= 0.995
    C = batch[2].C[0]  # head "a" of the rank-deficient configuration
    sk = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(Xs[rows[2]], Y[rows[2], 0])
    ours = _head_proba(batch[2], Xts, lay)[0]
    assert (ours.argmax(1) == sk.predict(Xts.numpy())).mean() >= 0.99
    assert np.abs(ours - sk.predict_proba(Xts.numpy())).max() <= 1e-3


def test_tuned_runs_are_grouped_by_size_and_fitted_as_alone():
    """``train_joint_heads`` with configurations of several sizes (one repeated) returns,
    per configuration and in order, the heads it would get alone."""
    import torch

    from credanno.eval.probe import ProbeRun, train_joint_heads

    X, Y, lay = _soft_problem()
    rng = np.random.default_rng(3)
    sets = [np.sort(rng.choice(90, m, replace=False)) for m in (30, 60, 30, 30)]
    runs = [ProbeRun(s) for s in (*sets, sets[1])]
    spec = ProbeSpec(device="cpu")
    together = train_joint_heads(X, Y, lay, runs, spec)
    for c, run in enumerate(runs):
        alone = train_joint_heads(X, Y, lay, [run], spec)
        # float32 fits: a batch's products round differently from one configuration's,
        # so the L-BFGS paths agree to rounding, not bit for bit
        torch.testing.assert_close(together.exp.W_x[c], alone.exp.W_x[0], atol=1e-3, rtol=0)
        torch.testing.assert_close(together.exp.W_z[c], alone.exp.W_z[0], atol=1e-3, rtol=0)
        assert torch.equal(together.mask[c], alone.mask[0])


def test_estimator_scaled_by_the_unlabelled_rest_is_probe_sweep_of_its_rows():
    """``fit(X[rows], Y, unlabelled=X[rest])`` scales by the whole training split, as
    ``probe_sweep`` of the same rows does (few labelled rows alone give noisy statistics):
    the same probabilities and, with ``decide``, the same scored classes."""
    from credanno.eval.probe import JointLinearProbe, probe_sweep

    table = synthetic_table(n_nodules=60, per_nodule=3, seed=5)
    feats = synthetic_features(table, dim=12, signal=2.0)
    feats = feats * np.linspace(0.2, 5, 12, dtype=np.float32) + 3  # scales worth fixing
    train = (table["split"] == "train").to_numpy()
    data = EvalData.from_arrays(feats[train], table[train].reset_index(drop=True),
                                feats[~train], table[~train].reset_index(drop=True))
    rows = np.random.default_rng(0).choice(len(data.train_x), 40, replace=False)
    rows.sort()
    sweep = probe_sweep(data, [rows], ProbeSpec(kind=None), n_boot=1).configs[0]
    rest = np.setdiff1d(np.arange(len(data.train_x)), rows)
    nodules = data.train_table["nodule_id"].to_numpy()[rows]  # the sweep's CV folds
    est = JointLinearProbe().fit(data.train_x[rows], data.train_table.loc[rows, data.labels],
                                 groups=nodules, unlabelled=data.train_x[rest])
    probs = est.predict_proba(data.test_x)
    decided = est.decide(data.test_x)
    for i, name in enumerate(data.labels):
        np.testing.assert_allclose(probs[i], sweep.probas[name], atol=1e-5)
        np.testing.assert_array_equal(decided[:, i], sweep.preds[name])
    alone = JointLinearProbe().fit(data.train_x[rows], data.train_table.loc[rows, data.labels],
                                   groups=nodules)
    assert not np.allclose(alone.predict_proba(data.test_x)[0], probs[0], atol=1e-3)
    with pytest.raises(CredannoError, match="unlabelled features of shape"):
        JointLinearProbe().fit(data.train_x[rows], data.train_table.loc[rows, data.labels],
                               unlabelled=data.train_x[rest, :5])


def test_quenching_converges_to_the_fit_at_the_same_penalties():
    """``quench_tuned`` refits given heads on new rows at their penalties: run to
    convergence it reaches the fit of those rows at those penalties (the optimum is
    unique), and from heads already optimal for the rows it stays put."""
    import torch

    from credanno.eval.probe import HeadLayout
    from credanno.eval.tuned import MAX_ITER, fit_tuned_config, quench_tuned

    X, y, Xt, _ = _problem(1.0, seed=11, n=200, d=30, k=3)
    Y = np.stack([y, (X[:, 0] > 0).astype(int) + (X[:, 1] > 1), X[:, 2] > 0], 1).astype(int)
    lay = HeadLayout(["a", "b", "malignancy"], [3, 3, 2], cls=2)
    Xs = torch.from_numpy((X - X.mean(0)) / X.std(0)).double()
    Xts = torch.from_numpy((Xt - X.mean(0)) / X.std(0)).double()
    old, new = np.arange(40), np.arange(120)
    prev = fit_tuned_config(Xs[old], Y[old], lay, None, Cs=(0.1,))
    want = fit_tuned_config(Xs[new], Y[new], lay, None, Cs=(0.1,))
    got = quench_tuned(Xs[new], Y[new], lay, prev, max_iter=MAX_ITER)
    np.testing.assert_array_equal(got.C, prev.C)
    for p, q in zip(_head_proba(got, Xts, lay), _head_proba(want, Xts, lay), strict=True):
        assert np.abs(p - q).max() <= 1e-3  # both stop at L-BFGS's gradient tolerance
    short = quench_tuned(Xs[new], Y[new], lay, want, max_iter=5)  # already optimal
    for p, q in zip(_head_proba(short, Xts, lay), _head_proba(want, Xts, lay), strict=True):
        assert np.abs(p - q).max() <= 1e-3
    before = _head_proba(prev, Xts, lay)[2]
    moved = _head_proba(quench_tuned(Xs[new], Y[new], lay, prev, max_iter=5), Xts, lay)[2]
    assert np.abs(moved - before).max() > 1e-3  # a short quench does move the heads


def test_fit_many_is_each_subset_fitted_alone():
    """``fit_many`` (one batched sweep over subsets of a training split) gives each subset
    the probe ``fit(X[rows], ..., unlabelled=X[rest])`` gives it alone."""
    from credanno.eval.estimator import JointLinearProbe, fit_many

    table = synthetic_table(n_nodules=60, per_nodule=3, seed=7)
    train = table[table["split"] == "train"].reset_index(drop=True)
    test = table[table["split"] == "test"].reset_index(drop=True)
    feats = synthetic_features(pd.concat([train, test]), dim=10, signal=2.0)
    X, Xt = feats[:len(train)], feats[len(train):]
    rng = np.random.default_rng(1)
    subsets = [np.sort(rng.choice(len(X), m, replace=False)) for m in (30, 30, 50)]
    nodules = train["nodule_id"].to_numpy()
    many = fit_many(JointLinearProbe(), X, train[["malignancy", "subtlety", "margin"]],
                    subsets, nodules)
    for est, rows in zip(many, subsets, strict=True):
        rest = np.setdiff1d(np.arange(len(X)), rows)
        alone = JointLinearProbe().fit(X[rows], train.loc[rows, ["malignancy", "subtlety",
                                                                  "margin"]],
                                       groups=nodules[rows], unlabelled=X[rest])
        for p, q in zip(est.predict_proba(Xt), alone.predict_proba(Xt), strict=True):
            assert np.abs(p - q).max() <= 2e-3  # float32 batch vs alone: rounding only
        np.testing.assert_array_equal(est.decide(Xt), alone.decide(Xt))
