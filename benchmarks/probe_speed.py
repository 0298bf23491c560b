"""Speed of the paper's joint linear probes (G_exp + G_cls, Eq. 3) on CPU.

The paper recipe trains :class:`credanno.eval.heads.JointHeadsModule` (one ``nn.Linear``
per attribute, G_cls on ``f (+) z_exp``; the heads' weights concatenated so that a step's
forward is one matmul) with autograd, fused ``torch.optim.SGD`` and ``CosineAnnealingLR``.

- ``one``: the 9 heads trained jointly for 100 epochs (SGD, batch 128, cosine) on
  1904 x 1536 features (the size of the public train split with last-4-blocks features);
  target <= 2 s (``value``), reference = the same model written the usual way
  (``torch.nn.Linear`` heads each applied on its own, G_cls on an explicit
  ``torch.cat``, autograd, ``torch.optim.SGD``), same threads;
- ``15 configurations`` (3 label fractions x 5 seeds) against one full-label
  configuration: target <= 3x; and against the same 15 trained one after another. The
  configurations of equal steps per epoch and lr step together (``torch.func``: stacked
  parameters, ``vmap(functional_call)``), which is kept only while this row shows it
  faster than training them one after another (ratio >= 1);
- scikit-learn ``LogisticRegression`` fitted per label (9 fits, lbfgs) on the same data;
- the tuned recipe (the default: L-BFGS to convergence, penalty cross-validated inside
  the labelled rows) on one full-label configuration: target <= 3x the paper recipe, and
  <= 0.5x scikit-learn ``LogisticRegressionCV`` (same grid, 5 folds) fitted per label.

The first three rows are CPU seconds of this process (``time.process_time``): the paper
recipe and its reference run on one thread, so this is their wall time on an idle
machine, and it stays put when other processes share the cores (their wall times there
varied 3x between runs); the scikit-learn and tuned-recipe rows are wall seconds.
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


def _timed(f) -> tuple[float, float]:
    """Wall and CPU seconds of ``f()`` (CPU: this process's, all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    f()
    return time.perf_counter() - t0, time.process_time() - c0


def _paper_times(X, Y, layout, configs, lrs, epochs: int, quick: bool) -> dict:
    """Seconds of the paper recipe: one full-label configuration (wall and CPU, also at
    100 epochs), the 15 configurations in one call and one after another, and the
    autograd reference (CPU: single-threaded work, robust to other processes' load)."""
    import torch

    from credanno.eval.probe import ProbeRun, train_joint_heads
    from credanno.eval.specs import ProbeSpec

    spec = ProbeSpec(recipe="paper", epochs=epochs)
    full = np.arange(len(X))

    def ours(runs, spec=spec):
        train_joint_heads(X, Y, layout, runs, spec)

    ours([ProbeRun(full, 5e-4, 0)])  # warm-up (the first torch.optim imports torch._dynamo)
    out = {"one": _timed(lambda: ours([ProbeRun(full, 5e-4, 0)]))}
    out["one100"] = out["one"]
    if quick:  # the tuned recipe is compared with the paper's full 100 epochs
        out["one100"] = _timed(lambda: ours([ProbeRun(full, 5e-4, 0)],
                                            ProbeSpec(recipe="paper", epochs=100)))
    runs = [ProbeRun(rows, lr, c) for c, (rows, lr) in enumerate(zip(configs, lrs, strict=True))]
    out["15"] = _timed(lambda: ours(runs))
    out["seq"] = _timed(lambda: [ours([run_c]) for run_c in runs])
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the same threads as train_joint_heads' default
    try:
        out["auto"] = _timed(lambda: autograd_reference(X, Y, full, epochs, 5e-4))
    finally:
        torch.set_num_threads(saved)
    return out


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
    from sklearn.linear_model import LogisticRegression

    from credanno.eval.probe import HeadLayout
    from credanno.labels import LABEL_NAMES, label_spec

    epochs = 20 if quick else 100
    X, Y = _data()
    n = len(X)
    layout = HeadLayout(list(LABEL_NAMES), [label_spec(x).n_classes for x in LABEL_NAMES], 0)
    configs = [np.sort(np.random.default_rng(s).permutation(n)[:max(1, round(f * n))])
               for f in FRACS for s in range(5)]
    lrs = [5e-4 if f >= 1 else 2.5e-4 for f in FRACS for _ in range(5)]
    pt = _paper_times(X, Y, layout, configs, lrs, epochs, quick)
    c_one, c_15, c_seq, c_auto = (pt[k][1] for k in ("one", "15", "seq", "auto"))
    t_one, t_paper100 = pt["one"][0], pt["one100"][0]

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
        _row(f"one config, 9 joint heads, {epochs} epochs, {n}x{X.shape[1]} CPU s "
             "(vs nn.Linear + autograd)", c_one, c_auto, c_auto / c_one,
             "value <= 2 s" if not quick else "info", c_one <= 2.0 or quick),
        _row(f"15 configs CPU s (vs one config; minibatch work {work:.2f}x)", c_15, c_one,
             c_15 / c_one, "<= 3", c_15 / c_one <= 3),
        _row("15 configs, equal-step groups via torch.func CPU s (vs the 15 one after "
             "another)", c_15, c_seq, c_seq / c_15, ">= 1", c_seq / c_15 >= 1),
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
