"""Speed of the paper's joint linear probes (G_exp + G_cls, Eq. 3) on CPU.

- ``one``: the 9 heads trained jointly for 100 epochs (SGD, batch 128, cosine) on
  1904 x 1536 features (the size of the public train split with last-4-blocks features);
  target <= 2 s (``value``), reference = the same model written the usual way
  (``torch.nn.Linear`` heads, autograd, ``torch.optim.SGD``), same threads;
- ``15 configurations`` (3 label fractions x 5 seeds, as one batched model) against one
  full-label configuration: target <= 3x; and against the 15 trained one after another;
- scikit-learn ``LogisticRegression`` fitted per label (9 fits, lbfgs) on the same data;
- the tuned recipe (the default: L-BFGS to convergence, penalty cross-validated inside
  the labelled rows) on one full-label configuration: target <= 3x the paper recipe, and
  <= 0.5x scikit-learn ``LogisticRegressionCV`` (same grid, 5 folds) fitted per label;
- the tuned recipe on 5 seeds of one label fraction (1%, 10%; 10% skipped when quick),
  batched (configurations with the same number of rows share their L-BFGS steps) against
  the 5 fitted one after another: target >= 2x at 1% (few rows: the time is per-step
  overhead), info at 10% (more rows: arithmetic, which batching does not save).

Run: ``python benchmarks/probe_speed.py [--quick]``.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np

FRACS = (0.01, 0.1, 1.0)


def _row(metric, value, reference, ratio, target, ok):
    return {"benchmark": "probe_speed", "metric": metric, "value": round(value, 4),
            "reference": round(reference, 4), "ratio": round(ratio, 3), "target": target,
            "ok": bool(ok)}


def _data(n=1904, dim=1536, seed=0):
    from credanno.labels import LABEL_NAMES, label_spec

    rng = np.random.default_rng(seed)
    Y = np.stack([rng.integers(0, label_spec(n_).n_classes, n) for n_ in LABEL_NAMES], 1)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    X[:, :9] += 2.0 * Y  # some signal
    return X, Y


def autograd_reference(X, Y, rows, epochs, lr, seed=0):
    """The joint heads as one would write them with nn.Linear, autograd and torch.optim."""
    import torch

    from credanno.labels import LABEL_NAMES, label_spec

    torch.manual_seed(seed)
    counts = [label_spec(n).n_classes for n in LABEL_NAMES]
    exp_heads = torch.nn.ModuleList(torch.nn.Linear(X.shape[1], c) for c in counts[1:])
    cls_head = torch.nn.Linear(X.shape[1] + sum(counts[1:]), 2)
    params = [*exp_heads.parameters(), *cls_head.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    Xt, Yt = torch.from_numpy(X[rows]), torch.from_numpy(Y[rows])
    ce = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        perm = torch.randperm(len(rows))
        for s in range(0, len(rows), 128):
            b = perm[s:s + 128]
            f = Xt[b]
            z = [h(f) for h in exp_heads]
            zc = cls_head(torch.cat([f, *z], 1))
            loss = ce(zc, Yt[b, 0]) + sum(ce(zj, Yt[b, j + 1]) for j, zj in enumerate(z))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()


def _tuned_times(X, Y, layout, quick: bool) -> tuple[float, float, int]:
    """Seconds of the tuned recipe on all rows, and of LogisticRegressionCV per label (one
    label when quick: lbfgs with 5-fold CV on 1536-d is slow)."""
    from sklearn.linear_model import LogisticRegressionCV

    from credanno.eval.probe import ProbeRun, _standardizer, train_joint_heads
    from credanno.eval.specs import ProbeSpec
    from credanno.eval.tuned import TUNED_CS

    rows = np.arange(len(X))
    t0 = time.perf_counter()
    train_joint_heads(X, Y, layout, [ProbeRun(rows)], ProbeSpec(device="cpu"))
    t_tuned = time.perf_counter() - t0
    mean, scale = _standardizer(X)
    Xs = (X - mean) / scale
    n_cv = 1 if quick else Y.shape[1]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in range(n_cv):
            LogisticRegressionCV(Cs=list(TUNED_CS), cv=5, max_iter=100).fit(Xs, Y[:, j])
    return t_tuned, time.perf_counter() - t0, n_cv


def _tuned_seed_rows(X, Y, layout, quick: bool) -> list[dict]:
    """The tuned recipe on 5 seeds of one label fraction: batched vs one after another."""
    from credanno.eval.probe import ProbeRun, train_joint_heads
    from credanno.eval.specs import ProbeSpec

    spec, n, out = ProbeSpec(device="cpu"), len(X), []
    train_joint_heads(X, Y, layout, [ProbeRun(np.arange(10))], spec)  # warm-up (imports)
    for frac in (0.01,) if quick else (0.01, 0.1):
        runs = [ProbeRun(np.sort(np.random.default_rng(s).permutation(n)[:round(frac * n)]))
                for s in range(5)]
        t0 = time.perf_counter()
        train_joint_heads(X, Y, layout, runs, spec)
        t_batch = time.perf_counter() - t0
        t0 = time.perf_counter()
        for r in runs:
            train_joint_heads(X, Y, layout, [r], spec)
        t_seq = time.perf_counter() - t0
        target = ">= 2" if frac < 0.05 else "info"
        out.append(_row(f"tuned recipe, 5 seeds at {frac:.0%} ({len(runs[0].rows)} rows) "
                        "batched s (vs one after another)", t_batch, t_seq, t_seq / t_batch,
                        target, t_seq / t_batch >= 2 or target == "info"))
    return out


def run(quick: bool = False) -> list[dict]:
    import torch
    from sklearn.linear_model import LogisticRegression

    from credanno.eval.probe import HeadLayout, ProbeRun, train_joint_heads
    from credanno.eval.specs import ProbeSpec
    from credanno.labels import LABEL_NAMES, label_spec

    epochs = 20 if quick else 100
    X, Y = _data()
    n = len(X)
    layout = HeadLayout(list(LABEL_NAMES), [label_spec(x).n_classes for x in LABEL_NAMES], 0)
    full = np.arange(n)
    configs = [np.sort(np.random.default_rng(s).permutation(n)[:max(1, round(f * n))])
               for f in FRACS for s in range(5)]
    lrs = [5e-4 if f >= 1 else 2.5e-4 for f in FRACS for _ in range(5)]

    spec = ProbeSpec(recipe="paper", epochs=epochs)

    def ours(runs):
        train_joint_heads(X, Y, layout, runs, spec)

    ours([ProbeRun(full, 5e-4, 0)])  # warm-up
    t0 = time.perf_counter()
    ours([ProbeRun(full, 5e-4, 0)])
    t_one = time.perf_counter() - t0
    t_paper100 = t_one
    if quick:  # the tuned recipe is compared with the paper's full 100 epochs
        t0 = time.perf_counter()
        train_joint_heads(X, Y, layout, [ProbeRun(full, 5e-4, 0)],
                          ProbeSpec(recipe="paper", epochs=100))
        t_paper100 = time.perf_counter() - t0
    runs = [ProbeRun(rows, lr, c) for c, (rows, lr) in enumerate(zip(configs, lrs, strict=True))]
    t0 = time.perf_counter()
    ours(runs)
    t_15 = time.perf_counter() - t0
    t0 = time.perf_counter()
    for run_c in runs:
        ours([run_c])
    t_seq = time.perf_counter() - t0

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the same threads as train_joint_heads' default
    try:
        t0 = time.perf_counter()
        autograd_reference(X, Y, full, epochs, 5e-4)
        t_auto = time.perf_counter() - t0
    finally:
        torch.set_num_threads(saved)

    n_skl = 1 if quick else Y.shape[1]  # lbfgs on 1536-d is slow: one label when quick
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs may stop at max_iter, as in common use
        for j in range(n_skl):
            LogisticRegression(max_iter=100).fit(X, Y[:, j])
    t_skl = time.perf_counter() - t0

    t_tuned, t_skl_cv, n_cv = _tuned_times(X, Y, layout, quick)
    seed_rows = _tuned_seed_rows(X, Y, layout, quick)
    work = sum(np.ceil(len(r) / 128) for r in configs) / np.ceil(n / 128)
    return [
        _row(f"one config, 9 joint heads, {epochs} epochs, {n}x{X.shape[1]} s "
             "(vs nn.Linear + autograd)", t_one, t_auto, t_auto / t_one,
             "value <= 2 s" if not quick else "info", t_one <= 2.0 or quick),
        _row(f"15 configs batched s (vs one config; minibatch work {work:.2f}x)", t_15, t_one,
             t_15 / t_one, "<= 3", t_15 / t_one <= 3),
        _row("15 configs batched s (vs the 15 one after another)", t_15, t_seq,
             t_seq / t_15, "info", True),
        _row(f"one config s (vs sklearn LogisticRegression x {n_skl} label(s))", t_one, t_skl,
             t_skl / t_one, "info", True),
        _row("tuned recipe with CV, one config s (vs the paper recipe, 100 epochs)", t_tuned,
             t_paper100, t_tuned / t_paper100, "<= 3", t_tuned / t_paper100 <= 3),
        _row(f"tuned recipe with CV s (vs sklearn LogisticRegressionCV x {n_cv} label(s))",
             t_tuned, t_skl_cv, t_tuned / t_skl_cv,
             "<= 0.5" if n_cv == Y.shape[1] else "info",
             t_tuned / t_skl_cv <= 0.5 or n_cv < Y.shape[1]),
        *seed_rows,
    ]


if __name__ == "__main__":
    results = run(quick="--quick" in sys.argv)
    from credanno.bench.perf import print_rows

    print_rows(results)
