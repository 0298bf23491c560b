"""The paper's trained predictors G_exp and G_cls (section 2, Eq. 3) as fast linear probes.

One linear layer G_exp^(i) per nodule attribute on the frozen features f, and G_cls for
malignancy on ``f (+) z_exp^(1) (+) ... (+) z_exp^(M)`` (the features concatenated with the
attribute logits), trained jointly by minimising the sum of the heads' cross-entropies
with SGD (momentum 0.9, batch 128, cosine schedule over 100 epochs, lr 5e-4 with all
labels and 2.5e-4 with partial labels), as in the paper's section 3.

Speed: the attribute heads and the feature part of G_cls are one weight matrix
``W_x`` (D, A + 2), so a step is one batched matmul forward and one backward (gradients
written out by hand: the model is linear, so autograd would only add overhead). Many
(label fraction, seed) configurations train together as one batched model
(``torch.baddbmm`` over configurations), each with its own labelled rows, minibatch
order, initialisation and schedule, exactly as if trained alone.

Model selection: the last epoch (default), or the best epoch of every head on a
validation part carved from the labelled subset (``select="val"``). Never the test
split: the paper's public code picked each head's best epoch on the test split.

Feature scale: the paper's lr (5e-4, plain SGD) was tuned for un-normalised ViT
features. Features are standardised by default with the mean and sd of the *training
split* (no labels used), which puts any encoder's features on that scale; pass
``standardize=False`` for the paper's exact recipe.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from credanno import checks
from credanno.errors import CredannoError, CredannoWarning
from credanno.labels import LABEL_NAMES, label_spec
from credanno.runtime import cpu_threads, resolve_device

#: The paper's probe recipe (section 3, "Training settings").
PAPER_LR_FULL = 5e-4
PAPER_LR_PARTIAL = 2.5e-4
SELECTIONS: tuple[str, ...] = ("last", "val")
#: the largest learning rate accepted: far above any that trains (the paper's is 5e-4);
#: beyond it the heads diverge and the accuracies are noise
MAX_LR = 10.0
PAPER_BATCH = 128


def check_lr(lr: float) -> float:
    """A learning rate: finite and in (0, :data:`MAX_LR`]."""
    return checks.finite(lr, "--lr", low=0, high=MAX_LR, example="5e-4")


def _clamp_batch(batch_size: int, n_rows: int) -> int:
    """A batch larger than the data only allocates padding (10**8 rows: 400 GB): use
    the data's size instead, with a warning unless it is the paper's 128 on a small set."""
    batch_size = checks.count(batch_size, "--batch-size")
    if batch_size > n_rows > 0:
        if batch_size > PAPER_BATCH:
            warnings.warn(f"--batch-size {batch_size} is larger than the {n_rows} training "
                          f"rows; using {n_rows}", CredannoWarning, stacklevel=3)
        return n_rows
    return batch_size


def paper_lr(frac: float) -> float:
    """The paper's initial learning rate: 5e-4 with all labels, 2.5e-4 with partial labels."""
    return PAPER_LR_FULL if frac >= 1 else PAPER_LR_PARTIAL


@dataclass
class HeadLayout:
    """Where each label's logits live in the joint output.

    Columns ``[0, A)`` are the attribute heads (G_exp) in label order, columns
    ``[A, A + C_cls)`` the G_cls head (only when ``cls`` is set and there are attributes).
    """

    names: list[str]
    n_classes: list[int]
    cls: int | None  # index into names of the head fed with the attribute logits

    def __post_init__(self) -> None:
        if self.cls is not None and len(self.names) < 2:
            self.cls = None  # G_cls with no attributes is just another linear head
        order = [i for i in range(len(self.names)) if i != self.cls]
        if self.cls is not None:
            order.append(self.cls)
        self.order = order  # label index of each head, attribute heads first
        widths = [self.n_classes[i] for i in order]
        self.starts = np.concatenate([[0], np.cumsum(widths)]).astype(int)
        self.width = int(self.starts[-1])
        self.n_exp = int(self.starts[-2]) if self.cls is not None else self.width
        self.cmax = max(widths)
        # head position of every column and its slot in a (heads, cmax) padded grid
        self.col_head = np.repeat(np.arange(len(order)), widths)
        self.col_slot = np.concatenate([h * self.cmax + np.arange(w)
                                        for h, w in enumerate(widths)])

    def columns(self, label_index: int) -> slice:
        h = self.order.index(label_index)
        return slice(int(self.starts[h]), int(self.starts[h + 1]))


@dataclass
class JointHeads:
    """Trained parameters of C configurations (torch tensors).

    ``exp`` and ``cls`` are ``(W_x (C, D, W), b (C, W), W_z (C, A, C_cls) or None)``: the
    attribute heads are read from ``exp`` and G_cls from ``cls`` (they differ only when
    heads were selected at different epochs on validation data).
    """

    layout: HeadLayout
    exp: tuple[Any, Any, Any]
    cls: tuple[Any, Any, Any]
    mean: Any = None
    scale: Any = None


def _forward(params, X, layout: HeadLayout):
    """Joint logits (C, m, W) for features X (C, m, D) or (m, D) (Eq. 3)."""
    import torch

    Wx, b, Wz = params
    if X.dim() == 2:
        Z = torch.matmul(X, Wx) + b[:, None, :]
    else:
        Z = torch.baddbmm(b[:, None, :], X, Wx)
    if Wz is not None:
        A = layout.n_exp
        Z = torch.cat([Z[..., :A], Z[..., A:] + torch.bmm(Z[..., :A], Wz)], dim=-1)
    return Z


def _grid_softmax(Z, layout: HeadLayout):
    """Per-head softmax of joint logits (C, B, W): scatter into a -inf padded
    (C, B, heads, cmax) grid, softmax over the last axis, gather back."""
    import torch

    C, B, W = Z.shape
    n_heads = len(layout.order)
    grid = Z.new_full((C, B, n_heads * layout.cmax), -math.inf)
    slots = torch.as_tensor(layout.col_slot, device=Z.device)
    grid[..., slots] = Z
    P = torch.softmax(grid.view(C, B, n_heads, layout.cmax), dim=-1)
    return P.view(C, B, -1)[..., slots]


def _predict_heads(heads: JointHeads, X) -> list[Any]:
    """Per-label probabilities (list over labels of (C, m, C_l)) from both parameter sets."""
    import torch

    lay = heads.layout
    if heads.mean is not None:
        X = (X - heads.mean) / heads.scale
    out: list[Any] = [None] * len(lay.names)
    for params, which in ((heads.exp, "exp"), (heads.cls, "cls")):
        if which == "cls" and lay.cls is None:
            continue
        Z = _forward(params, X, lay)
        for i in range(len(lay.names)):
            if (i == lay.cls) != (which == "cls"):
                continue
            out[i] = torch.softmax(Z[..., lay.columns(i)], dim=-1)
    return out


def _standardizer(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(axis=0, dtype=np.float64).astype(np.float32)
    sd = X.std(axis=0, dtype=np.float64).astype(np.float32)
    return mean, np.where(sd > 1e-6, sd, 1.0).astype(np.float32)


def train_joint_heads(X: np.ndarray, Y: np.ndarray, layout: HeadLayout, train_rows: list,
                      *, epochs: int = 100, lr: Sequence[float] | float = PAPER_LR_FULL,
                      batch_size: int = 128, momentum: float = 0.9,
                      seeds: Sequence[int] | int = 0, device: str = "cpu",
                      views: np.ndarray | None = None, val_rows: list | None = None,
                      standardize: bool = True, init_std: float = 0.01,
                      progress: bool = False, num_threads: int | None = 1) -> JointHeads:
    """Train the joint heads of C configurations at once.

    ``X`` (n, D) features, ``Y`` (n, L) int labels (-1 missing, ignored by that head),
    ``train_rows[c]`` the rows configuration c trains on, ``lr``/``seeds`` one per
    configuration (or one for all). ``views`` (V, n, D): stored augmented views; each
    sample then draws one view per visit. ``val_rows[c]`` enables per-head selection of
    the best epoch on those rows (the paper's +/-1 accuracy for attributes).

    ``num_threads``: CPU threads during training (torch's and the BLAS pools, see
    :func:`credanno.runtime.cpu_threads`; restored afterwards; None = leave the settings).
    One by default: a step's matrices are small, so intra-op threads gain little and
    their spin-waiting collapses on a shared or oversubscribed machine (measured 15x
    slower with 2 threads on a busy 2-core host).
    """
    import torch

    if num_threads is not None and not str(device).startswith("cuda"):
        with cpu_threads(num_threads):
            return train_joint_heads(X, Y, layout, train_rows, epochs=epochs, lr=lr,
                                     batch_size=batch_size, momentum=momentum, seeds=seeds,
                                     device=device, views=views, val_rows=val_rows,
                                     standardize=standardize, init_std=init_std,
                                     progress=progress, num_threads=None)

    epochs = checks.count(epochs, "--epochs")
    n, D = X.shape
    batch_size = _clamp_batch(batch_size, n)
    checks.finite(momentum, "momentum", low=0, high=1, low_open=False, high_open=True)
    C = len(train_rows)
    lrs = np.broadcast_to(np.asarray(lr, dtype=np.float64), (C,))
    for value in set(lrs.tolist()):
        check_lr(value)
    seeds = np.broadcast_to(np.asarray(seeds, dtype=np.int64), (C,))
    rows = [np.asarray(r, dtype=np.int64) for r in train_rows]
    if any(len(r) == 0 for r in rows):
        raise CredannoError("a configuration has no labelled training rows; use a larger --frac")
    dev = torch.device(device)
    lay = layout

    mean = scale = None
    Xs = np.ascontiguousarray(X, dtype=np.float32)
    Vs = None if views is None else np.ascontiguousarray(views, dtype=np.float32)
    if standardize:
        mean, scale = _standardizer(Xs)
        Xs = (Xs - mean) / scale
        if Vs is not None:
            Vs = (Vs - mean) / scale
    Xt = torch.from_numpy(Xs).to(dev)
    bank = Xt if Vs is None else torch.from_numpy(Vs.reshape(-1, D)).to(dev)
    n_views = 1 if Vs is None else Vs.shape[0]

    # targets: one-hot per column and per-(row, head) validity
    Y = np.asarray(Y, dtype=np.int64).reshape(n, -1)
    onehot = np.zeros((n + 1, lay.width), dtype=np.float32)  # row n = padding
    valid = np.zeros((n + 1, len(lay.order)), dtype=np.float32)
    for h, i in enumerate(lay.order):
        y = Y[:, i]
        ok = y >= 0
        if (y >= lay.n_classes[i]).any():
            raise CredannoError(f"{lay.names[i]} labels exceed its {lay.n_classes[i]} classes")
        onehot[np.flatnonzero(ok), lay.starts[h] + y[ok]] = 1.0
        valid[:n, h] = ok
    onehot_t = torch.from_numpy(onehot).to(dev)
    valid_t = torch.from_numpy(valid).to(dev)
    col_head = torch.as_tensor(lay.col_head, device=dev)

    # parameters, one generator per configuration (init and minibatch order)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    Wx = torch.stack([torch.randn(D, lay.width, generator=g) * init_std for g in gens]).to(dev)
    b = torch.zeros(C, lay.width, device=dev)
    A = lay.n_exp
    Wz = None
    if lay.cls is not None:
        Wz = torch.stack([torch.randn(A, lay.width - A, generator=g) * init_std
                          for g in gens]).to(dev)
    bufs = [torch.zeros_like(p) for p in (Wx, b, Wz) if p is not None]

    # configurations sorted by steps per epoch, so the active ones are a prefix
    steps = np.array([math.ceil(len(r) / batch_size) for r in rows])
    order = np.argsort(-steps, kind="stable")
    inv = np.argsort(order)
    steps_sorted = steps[order]
    n_active = [int((steps_sorted > j).sum()) for j in range(int(steps_sorted[0]))]
    lr_sorted = torch.as_tensor(lrs[order], dtype=torch.float32, device=dev)
    Wx, b = Wx[order].contiguous(), b[order].contiguous()
    Wz = Wz[order].contiguous() if Wz is not None else None
    bufs = [bf[order].contiguous() for bf in bufs]
    gens = [gens[c] for c in order]
    rows_sorted = [torch.as_tensor(rows[c]) for c in order]
    width = int(steps_sorted[0]) * batch_size

    select = val_rows is not None
    if select:
        vr = [np.asarray(val_rows[c], dtype=np.int64) for c in order]
        vmax = max(max(len(v) for v in vr), 1)
        vidx = torch.full((C, vmax), n, dtype=torch.long)
        for c, v in enumerate(vr):
            vidx[c, :len(v)] = torch.as_tensor(v)
        vidx = vidx.to(dev)
        Xval = torch.cat([Xt, Xt.new_zeros(1, D)])[vidx]
        best_score = torch.full((C, len(lay.order)), -1.0, device=dev)
        best_exp = [Wx.clone(), b.clone(), None if Wz is None else Wz.clone()]
        best_cls = [Wx.clone(), b.clone(), None if Wz is None else Wz.clone()]
        tol = torch.as_tensor([label_spec(lay.names[i]).tolerance
                               if lay.names[i] in LABEL_NAMES else 0 for i in lay.order],
                              device=dev)
        yval = torch.as_tensor(np.concatenate([Y, np.full((1, Y.shape[1]), -1)])[:, lay.order],
                               device=dev)[vidx]  # (C, vmax, heads)

    epoch_iter = range(epochs)
    if progress:
        from tqdm import tqdm
        epoch_iter = tqdm(epoch_iter, desc=f"probes ({C} configurations)", unit="epoch")
    with torch.no_grad():
        for epoch in epoch_iter:
            factor = 0.5 * (1 + math.cos(math.pi * epoch / epochs))  # CosineAnnealingLR
            lr_now = (lr_sorted * factor)
            # per-configuration shuffles, padded with the dummy row n
            idx = torch.full((C, width), n, dtype=torch.long)
            for c in range(C):
                r = rows_sorted[c]
                idx[c, :len(r)] = r[torch.randperm(len(r), generator=gens[c])]
            if n_views > 1:
                vsel = torch.stack([torch.randint(n_views, (width,), generator=gens[c])
                                    for c in range(C)])
            idx = idx.to(dev)
            for j, na in enumerate(n_active):
                bi = idx[:na, j * batch_size:(j + 1) * batch_size]
                safe = torch.where(bi < n, bi, 0)
                if n_views > 1:
                    vs = vsel[:na, j * batch_size:(j + 1) * batch_size].to(dev)
                    Xb = bank[vs * n + safe]
                else:
                    Xb = bank[safe]
                Wx_a, b_a = Wx[:na], b[:na]
                Wz_a = Wz[:na] if Wz is not None else None
                Z = _forward((Wx_a, b_a, Wz_a), Xb, lay)
                P = _grid_softmax(Z, lay)
                mask = valid_t[bi]  # (na, B, heads); padding row n is all zero
                cnt = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
                G = (P - onehot_t[bi]) * (mask / cnt)[..., col_head]
                if Wz_a is not None:
                    Gc = G[..., A:]
                    dWz = torch.bmm(Z[..., :A].transpose(1, 2), Gc)
                    G = torch.cat([G[..., :A] + torch.bmm(Gc, Wz_a.transpose(1, 2)), Gc], -1)
                dWx = torch.bmm(Xb.transpose(1, 2), G)
                grads = [dWx, G.sum(dim=1)] + ([dWz] if Wz_a is not None else [])
                params = [Wx_a, b_a] + ([Wz_a] if Wz_a is not None else [])
                for p, buf, g in zip(params, bufs, grads, strict=True):
                    bf = buf[:na]
                    bf.mul_(momentum).add_(g)  # torch.optim.SGD's momentum buffer
                    p.sub_(bf * lr_now[:na].view(-1, *([1] * (p.dim() - 1))))
            if select:
                _select_step(lay, (Wx, b, Wz), Xval, yval, tol, best_score, best_exp,
                             best_cls)
    if select:
        exp_p, cls_p = tuple(best_exp), tuple(best_cls)
    else:
        exp_p = cls_p = (Wx, b, Wz)

    def unsort(p):
        return tuple(None if t is None else t[torch.as_tensor(inv, device=dev)] for t in p)

    mean_t = None if mean is None else torch.from_numpy(mean).to(dev)
    scale_t = None if scale is None else torch.from_numpy(scale).to(dev)
    return JointHeads(lay, unsort(exp_p), unsort(cls_p), mean_t, scale_t)


def _select_step(lay, params, Xval, yval, tol, best_score, best_exp, best_cls) -> None:
    """Keep every head's parameters from the epoch with its best validation accuracy."""
    import torch

    Z = _forward(params, Xval, lay)
    accs = []
    for h, i in enumerate(lay.order):
        pred = Z[..., lay.columns(i)].argmax(-1)
        y = yval[..., h]
        ok = ((pred - y).abs() <= tol[h]) & (y >= 0)
        accs.append(ok.sum(1) / (y >= 0).sum(1).clamp_min(1))
    acc = torch.stack(accs, dim=1)  # (C, heads)
    better = acc > best_score
    best_score.copy_(torch.where(better, acc, best_score))
    col_better = better[:, torch.as_tensor(lay.col_head, device=acc.device)]  # (C, W)
    Wx, b, Wz = params
    best_exp[0].copy_(torch.where(col_better[:, None, :], Wx, best_exp[0]))
    best_exp[1].copy_(torch.where(col_better, b, best_exp[1]))
    if lay.cls is not None:
        cb = better[:, -1]
        for dst, src in zip(best_cls, params, strict=True):
            dst.copy_(torch.where(cb.view(-1, *([1] * (src.dim() - 1))), src, dst))


class JointLinearProbe:
    """The paper's joint G_exp/G_cls heads as a scikit-learn style estimator.

    ``fit(X, Y)`` with ``Y`` a DataFrame of label columns (names from
    :data:`credanno.labels.LABEL_NAMES`; ``malignancy`` becomes G_cls fed with the other
    heads' logits), a 2-D int array (one column per head, ``n_classes`` inferred, no G_cls
    unless ``cls_label`` gives a column index) or a 1-D array (one softmax regression).
    Labels of -1 are missing and ignored by that head.
    """

    def __init__(self, epochs: int = 100, lr: float = PAPER_LR_FULL, batch_size: int = 128,
                 momentum: float = 0.9, standardize: bool = True, seed: int = 0,
                 device: str = "cpu", cls_label: str | int | None = "malignancy",
                 select: str = "last", val_frac: float = 0.2) -> None:
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.momentum, self.standardize, self.seed = momentum, standardize, seed
        self.device, self.cls_label, self.select, self.val_frac = (device, cls_label, select,
                                                                    val_frac)

    def _layout(self, Y) -> tuple[np.ndarray, HeadLayout]:
        if isinstance(Y, pd.DataFrame):
            names = [str(c) for c in Y.columns]
            counts = [label_spec(c).n_classes if c in LABEL_NAMES
                      else int(Y[c].max()) + 1 for c in names]
            cls = names.index(self.cls_label) if self.cls_label in names else None
            return Y.to_numpy().astype(np.int64), HeadLayout(names, counts, cls)
        arr = np.asarray(Y).astype(np.int64)
        self._single = arr.ndim == 1
        arr = arr.reshape(len(arr), -1)
        names = [str(i) for i in range(arr.shape[1])]
        counts = [int(arr[:, i].max()) + 1 for i in range(arr.shape[1])]
        cls = self.cls_label if isinstance(self.cls_label, int) else None
        return arr, HeadLayout(names, counts, cls)

    def fit(self, X: np.ndarray, Y, views: np.ndarray | None = None) -> JointLinearProbe:
        """Train on all rows of ``X`` (n, D) (``select="val"``: hold out ``val_frac``)."""
        self._single = False
        Yarr, layout = self._layout(Y)
        X = np.asarray(X, dtype=np.float32)
        if not np.isfinite(X).all():
            raise CredannoError("features contain NaN or Inf; clean them before fitting")
        if self.select not in SELECTIONS:
            raise CredannoError(f"unknown selection {self.select!r}; use one of "
                                f"{', '.join(SELECTIONS)}")
        rows = np.arange(len(X))
        val = None
        if self.select == "val":
            rows, v = split_validation(rows, self.val_frac, self.seed)
            val = [v]
        self.heads_ = train_joint_heads(X, Yarr, layout, [rows], epochs=self.epochs,
                                        lr=self.lr, batch_size=self.batch_size,
                                        momentum=self.momentum, seeds=self.seed,
                                        device=self.device, views=views, val_rows=val,
                                        standardize=self.standardize)
        self.layout_ = layout
        self.classes_ = [np.arange(c) for c in layout.n_classes]
        return self

    def predict_proba(self, X: np.ndarray):
        """Class probabilities: (n, C) for a 1-D target, else a list of (n, C_l) arrays."""
        import torch

        Xt = torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.heads_.exp[0].device)
        with torch.no_grad():
            probs = [p[0].cpu().numpy() for p in _predict_heads(self.heads_, Xt)]
        return probs[0] if self._single else probs

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted classes: (n,) for a 1-D target, else (n, L) in the columns' order."""
        probs = self.predict_proba(X)
        if self._single:
            return probs.argmax(axis=1)
        return np.stack([p.argmax(axis=1) for p in probs], axis=1)

    def score(self, X: np.ndarray, Y) -> float:
        """Mean exact accuracy over heads (ignoring missing labels)."""
        Yarr = np.asarray(Y).reshape(len(X), -1)
        pred = self.predict(X).reshape(len(X), -1)
        ok = Yarr >= 0
        return float((pred[ok] == Yarr[ok]).mean())


def split_validation(rows: np.ndarray, val_frac: float, seed: int,
                     groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation part out of labelled rows (whole groups, e.g. nodules, when given).

    At least one row stays on each side; too few rows to split is an error.
    """
    if not 0 < val_frac < 1:
        raise CredannoError(f"validation fraction must be in (0, 1), got {val_frac}")
    rows = np.asarray(rows)
    if len(rows) < 2:
        raise CredannoError(f"only {len(rows)} labelled row(s): too few to carve a validation "
                            "part; use --select last or a larger --frac")
    rng = np.random.default_rng([int(seed), 7919])
    if groups is None:
        n_val = min(max(1, int(round(val_frac * len(rows)))), len(rows) - 1)
        pick = np.zeros(len(rows), bool)
        pick[rng.permutation(len(rows))[:n_val]] = True
    else:
        uniq = np.unique(groups)
        if len(uniq) < 2:
            raise CredannoError("the labelled rows hold a single nodule: too few to carve a "
                                "validation part; use --select last or a larger --frac")
        n_val = min(max(1, int(round(val_frac * len(uniq)))), len(uniq) - 1)
        pick = np.isin(groups, rng.permutation(uniq)[:n_val])
    return np.sort(rows[~pick]), np.sort(rows[pick])


def probe_sweep_arrays(train_x: np.ndarray, train_table: pd.DataFrame, test_x: np.ndarray,
                       test_table: pd.DataFrame, fracs: Sequence[float] | float = (1.0,),
                       seeds: Sequence[int] | int = (0,), labels: Sequence[str] | None = None,
                       *, n_labels: Sequence[int] | int | None = None,
                       mode: str = "annotation", stratify: str | bool | None = None,
                       epochs: int = 100, lr: float | None = None, batch_size: int = 128,
                       momentum: float = 0.9, select: str = "last", val_frac: float = 0.2,
                       standardize: bool = True, train_views: np.ndarray | None = None,
                       device: str = "cpu", n_boot: int = 1000, progress: bool = False,
                       config: dict | None = None):
    """Joint probes for every (label fraction, seed), trained as one batched model."""
    import torch

    from credanno.eval.knn import _label_sizes
    from credanno.eval.results import ConfigPredictions, build_result
    from credanno.eval.subsets import label_subset, missing_classes, warn_missing_classes

    if select not in SELECTIONS:
        raise CredannoError(f"unknown selection {select!r}; use one of {', '.join(SELECTIONS)}")
    # every setting is checked before the subsets are drawn
    if lr is not None:
        lr = check_lr(lr)
    checks.count(epochs, "--epochs")
    batch_size = _clamp_batch(batch_size, len(train_x))
    device = resolve_device(device)
    seeds = checks.seeds([seeds] if np.isscalar(seeds) else seeds)
    if labels is None:
        labels = [n for n in LABEL_NAMES if n in train_table.columns]
    labels = list(labels)
    layout = HeadLayout(labels, [label_spec(n).n_classes for n in labels],
                        labels.index("malignancy") if "malignancy" in labels else None)
    Y = train_table[labels].to_numpy().astype(np.int64)
    nodules = train_table["nodule_id"].to_numpy()

    settings, train_rows, val_rows, lrs = [], [], [], []
    absent: dict[tuple[float, str], list[int]] = {}
    for frac, f_arg, n_arg in _label_sizes(train_table, fracs, n_labels):
        for seed in seeds:
            subset = label_subset(train_table, frac=f_arg, n=n_arg, mode=mode,
                                  stratify=stratify, seed=seed)
            for j, name in enumerate(labels):
                if missing_classes(Y[:, j], Y[subset, j]):
                    absent.setdefault((frac, name), []).append(seed)
            if select == "val":
                fit, val = split_validation(subset, val_frac, seed,
                                            nodules[subset] if mode == "nodule" else None)
                val_rows.append(val)
            else:
                fit = subset
            train_rows.append(fit)
            lrs.append(lr if lr is not None else paper_lr(frac))
            settings.append((frac, seed, len(subset)))
    if absent:
        warn_missing_classes(absent)
    heads = train_joint_heads(train_x, Y, layout, train_rows, epochs=epochs, lr=lrs,
                              batch_size=batch_size, momentum=momentum,
                              seeds=[s for _, s, _ in settings], device=device,
                              views=train_views, val_rows=val_rows or None,
                              standardize=standardize, progress=progress)
    with torch.no_grad():
        Xq = torch.as_tensor(np.ascontiguousarray(test_x, dtype=np.float32), device=device)
        probs = [p.cpu().numpy() for p in _predict_heads(heads, Xq)]
    configs = []
    for c, (frac, seed, n_lab) in enumerate(settings):
        proba = {name: probs[j][c] for j, name in enumerate(labels)}
        pred = {name: p.argmax(axis=1) for name, p in proba.items()}
        configs.append(ConfigPredictions("probe", None, frac, seed, n_lab, pred, proba))
    cfg = {"method": "probe", "seeds": seeds, "mode": mode, "stratify": stratify,
           "epochs": epochs, "lr": lr, "lrs": lrs, "batch_size": batch_size,
           "momentum": momentum, "select": select, "val_frac": val_frac,
           "standardize": standardize, "views": 0 if train_views is None
           else int(train_views.shape[0]), "labels": labels, **(config or {})}
    return build_result(configs, test_table, labels, n_boot=n_boot, config=cfg)


def probe_sweep(store_or_path=None, fracs: Sequence[float] | float = (1.0,),
                seeds: Sequence[int] | int = (0,), labels: Sequence[str] | str | None = None,
                kind: str | None = "last4", epochs: int = 100, lr: float | None = None,
                device: str = "cpu", progress: bool = False, *,
                n_labels: Sequence[int] | int | None = None, mode: str = "annotation",
                stratify: str | bool | None = None, select: str = "last",
                val_frac: float = 0.2, batch_size: int = 128, momentum: float = 0.9,
                standardize: bool = True, use_views: bool = True, test_store=None,
                n_boot: int = 1000):
    """Linear-probe evaluation of a feature store (default: the newest under ``stores/``).

    ``kind=None`` uses ``last4`` when the store has it, else its default feature set.
    ``lr=None`` takes the paper's rate per configuration (5e-4 full, 2.5e-4 partial).
    Stored augmented views of the training rows are used when present (``use_views``).
    Returns an :class:`~credanno.eval.results.EvalResult`.
    """
    from credanno.eval.data import load_eval_data

    # checked before the store is read, so that a typo costs nothing
    if lr is not None:
        check_lr(lr)
    checks.count(epochs, "--epochs")
    checks.count(batch_size, "--batch-size")
    device = resolve_device(device)
    checks.seeds([seeds] if np.isscalar(seeds) else seeds)
    data = load_eval_data(store_or_path, kind, labels, test_store=test_store,
                          views=use_views)
    return probe_sweep_arrays(
        data.train_x, data.train_table, data.test_x, data.test_table, fracs, seeds,
        data.labels, n_labels=n_labels, mode=mode, stratify=stratify, epochs=epochs, lr=lr,
        batch_size=batch_size, momentum=momentum, select=select, val_frac=val_frac,
        standardize=standardize, train_views=data.train_views, device=device,
        n_boot=n_boot, progress=progress, config={"kind": data.kind, "stores": data.paths,
                               "provenance": data.provenance})
