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

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from credanno import checks
from credanno.errors import CredannoError, CredannoWarning
from credanno.eval.data import EvalData, StoreLike, open_eval_data
from credanno.labels import LABEL_NAMES, label_spec
from credanno.runtime import cpu_threads

if TYPE_CHECKING:
    from credanno.eval.results import EvalResult
    from credanno.eval.specs import ProbeSpec
    from credanno.eval.subsets import Subset, SubsetsLike

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


def soft_columns(layout: HeadLayout, soft_list: Sequence[Any] | None, n: int) -> np.ndarray | None:
    """Soft targets per label (a list in ``layout.names`` order of (n, C_l) probability
    arrays or None) as one (n, W) array in the layout's columns; NaN (a None entry, or a
    row left NaN) means "train on that row's hard label". None when no label has any."""
    if soft_list is None or all(q is None for q in soft_list):
        return None
    if len(soft_list) != len(layout.names):
        raise CredannoError(f"soft targets: {len(soft_list)} arrays for "
                            f"{len(layout.names)} labels")
    out = np.full((n, layout.width), np.nan)
    for i, q in enumerate(soft_list):
        if q is None:
            continue
        q = np.asarray(q, dtype=np.float64)
        if q.shape != (n, layout.n_classes[i]):
            raise CredannoError(f"soft targets of {layout.names[i]}: shape {q.shape}, "
                                f"expected ({n}, {layout.n_classes[i]})")
        out[:, layout.columns(i)] = q
    return out


class HeadParams(NamedTuple):
    """Parameters of C configurations' joint heads (torch tensors): ``W_x`` (C, D, W) maps
    the features to all logits, ``b`` (C, W) the biases, ``W_z`` (C, A, C_cls) feeds the
    attribute logits to G_cls (None without G_cls)."""

    W_x: Any
    b: Any
    W_z: Any


class ProbeRun(NamedTuple):
    """One configuration trained by :func:`train_joint_heads`: its training rows, initial
    learning rate and seed (initialisation and minibatch order), and optionally the rows
    on which each head's best epoch is selected."""

    rows: np.ndarray
    lr: float = PAPER_LR_FULL
    seed: int = 0
    val_rows: np.ndarray | None = None
    groups: np.ndarray | None = None  # the rows' nodules: the tuned recipe's CV folds


@dataclass
class JointHeads:
    """Trained G_exp/G_cls heads of C configurations.

    The attribute heads (G_exp) are read from ``exp`` and G_cls from ``cls`` (they differ
    only when heads were selected at different epochs on validation data); ``mean`` and
    ``scale`` standardise the features first (None: raw features); ``mask`` (C, W) is added
    to the logits before the softmax: -inf for classes that are never predicted (absent
    from a labelled subset, tuned recipe), None: all classes.
    """

    layout: HeadLayout
    exp: HeadParams
    cls: HeadParams
    mean: Any = None
    scale: Any = None
    mask: Any = None


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
        if heads.mask is not None:
            Z = Z + heads.mask[:, None, :]
        for i in range(len(lay.names)):
            if (i == lay.cls) != (which == "cls"):
                continue
            out[i] = torch.softmax(Z[..., lay.columns(i)], dim=-1)
    return out


def _standardizer(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(axis=0, dtype=np.float64).astype(np.float32)
    sd = X.std(axis=0, dtype=np.float64).astype(np.float32)
    return mean, np.where(sd > 1e-6, sd, 1.0).astype(np.float32)


@contextlib.contextmanager
def _torch_threads(device: str, num_threads: int | None):
    """Torch CPU threads while training (restored afterwards; None = leave torch's setting).

    Uses :func:`credanno.runtime.cpu_threads` (torch's and the BLAS pools).
    One by default: a step's matrices are small, so intra-op threads gain little and their
    spin-waiting collapses on a shared or oversubscribed machine (measured 15x slower with
    2 threads on a busy 2-core host).
    """
    if num_threads is None or str(device).startswith("cuda"):
        yield
        return
    with cpu_threads(int(num_threads)):
        yield


def train_joint_heads(X: np.ndarray, Y: np.ndarray, layout: HeadLayout,
                      runs: Sequence[ProbeRun], spec: ProbeSpec | None = None, *,
                      views: np.ndarray | None = None, progress: bool = False,
                      num_threads: int | None = 1, soft: np.ndarray | None = None) -> JointHeads:
    """Train the joint heads of every configuration in ``runs`` at once.

    ``X`` (n, D) features, ``Y`` (n, L) int labels (-1 missing, ignored by that head);
    ``spec`` the recipe (epochs, batch size, momentum, standardisation, device; default
    :class:`ProbeSpec`); ``views`` (V, n, D): stored augmented views, each sample then
    draws one view per visit. Runs with ``val_rows`` get each head's best epoch on those
    rows (the paper's +/-1 accuracy for attributes). ``num_threads``: see
    :func:`_torch_threads`. ``soft`` (n, W): optional soft targets in the layout's columns
    (:func:`soft_columns`; NaN rows: the hard label). Every configuration trains exactly
    as if it trained alone.
    """
    from credanno.eval.specs import ProbeSpec

    spec = ProbeSpec() if spec is None else spec
    with _torch_threads(spec.device, num_threads):
        return PROBE_RECIPES[spec.recipe](X, Y, layout, list(runs), spec, views, progress,
                                          soft=soft)


def _train_paper(X: np.ndarray, Y: np.ndarray, layout: HeadLayout, runs: list[ProbeRun],
                 spec: ProbeSpec, views: np.ndarray | None, progress: bool,
                 soft: np.ndarray | None = None) -> JointHeads:
    """The paper's recipe: minibatch SGD with momentum, cosine schedule, last (or best
    validation) epoch; all configurations as one batched model."""
    if soft is not None:
        raise CredannoError("soft targets need the tuned recipe (--recipe tuned)")
    return _BatchedTrainer(X, Y, layout, runs, spec, views).run(progress)


def _train_tuned(X: np.ndarray, Y: np.ndarray, layout: HeadLayout, runs: list[ProbeRun],
                 spec: ProbeSpec, views: np.ndarray | None, progress: bool,
                 soft: np.ndarray | None = None) -> JointHeads:
    """The tuned recipe (:mod:`credanno.eval.tuned`): every configuration fitted to
    convergence with its penalty cross-validated inside its labelled rows. Trains on the
    plain features (``views`` unused: the penalty, not augmentation, regularises);
    ``soft`` (n, W): soft targets in the layout's columns (NaN rows: the hard label).
    Identical subsets (e.g. all labels, every seed) are fitted once; subsets with the same
    number of rows (every seed of a label fraction) are fitted together
    (:func:`~credanno.eval.tuned.fit_tuned_configs`)."""
    import torch

    from credanno.eval.tuned import fit_tuned_configs

    dev = torch.device(spec.device)
    n = len(X)
    Y = np.asarray(Y, dtype=np.int64).reshape(n, -1)
    f = _features(X, None, spec.standardize, dev)
    if soft is not None and np.shape(soft) != (n, layout.width):
        raise CredannoError(f"soft targets of shape {np.shape(soft)}, expected "
                            f"({n}, {layout.width}) (see soft_columns)")
    soft = None if soft is None else np.asarray(soft, dtype=np.float64)
    keys, todo = [], {}  # todo: distinct subset -> (rows, groups, soft rows)
    for r in runs:
        rows = np.asarray(r.rows, dtype=np.int64)
        if len(rows) == 0:
            raise CredannoError("a configuration has no labelled training rows; use a larger "
                                "--frac")
        groups = None if r.groups is None else np.asarray(r.groups)
        q = None if soft is None else soft[rows]
        key = (rows.tobytes(), None if groups is None else groups.tobytes(),
               None if q is None else q.tobytes())
        keys.append(key)
        todo.setdefault(key, (rows, groups, q))
    by_size: dict[int, list] = {}
    for key, (rows, _, _) in todo.items():
        by_size.setdefault(len(rows), []).append(key)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="probes (tuned)", unit="configuration")
    done = {}
    for group in by_size.values():
        rows, groups, qs = zip(*(todo[k] for k in group), strict=True)
        Xs = [f.X[torch.as_tensor(r, device=dev)] for r in rows]
        # float64 where it is cheap (small subsets): L-BFGS then converges tightly
        if Xs[0].numel() <= 1_000_000 and dev.type == "cpu":
            Xs = [x.double() for x in Xs]
        fits = fit_tuned_configs(Xs, [Y[r] for r in rows], layout, list(groups), spec.Cs,
                                 spec.cv_folds, soft_list=list(qs))
        done.update(zip(group, fits, strict=True))
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    return _stack_tuned([done[k] for k in keys], layout, f, dev)


def _stack_tuned(fits: list, layout: HeadLayout, f: _Features, dev) -> JointHeads:
    """Per-configuration tuned fits as one :class:`JointHeads` (float32)."""
    import torch

    def stack(i):
        return torch.stack([fit[i].float() for fit in fits])

    Wz = None if layout.cls is None else stack(2)
    allowed = torch.stack([fit[3] for fit in fits])
    mask = torch.zeros(allowed.shape, device=dev).masked_fill(~allowed, -math.inf)
    params = HeadParams(stack(0), stack(1), Wz)
    mean = None if f.mean is None else torch.from_numpy(f.mean).to(dev)
    scale = None if f.scale is None else torch.from_numpy(f.scale).to(dev)
    return JointHeads(layout, params, params, mean, scale, mask)


#: the probe recipes (``ProbeSpec.recipe``, ``credanno probe --recipe``): name -> trainer
PROBE_RECIPES = {"tuned": _train_tuned, "paper": _train_paper}


class _Features(NamedTuple):
    X: Any  # (n, D) standardised training features (the validation rows come from here)
    bank: Any  # (n, D) or (V * n, D): what minibatches are drawn from
    n_views: int
    mean: np.ndarray | None
    scale: np.ndarray | None


def _features(X: np.ndarray, views: np.ndarray | None, standardize: bool, dev) -> _Features:
    """Features (and views) on ``dev``, standardised with the training split's statistics."""
    import torch

    mean = scale = None
    Xs = np.ascontiguousarray(X, dtype=np.float32)
    Vs = None if views is None else np.ascontiguousarray(views, dtype=np.float32)
    if standardize:
        mean, scale = _standardizer(Xs)
        Xs = (Xs - mean) / scale
        if Vs is not None:
            Vs = (Vs - mean) / scale
    Xt = torch.from_numpy(Xs).to(dev)
    bank = Xt if Vs is None else torch.from_numpy(Vs.reshape(-1, Xs.shape[1])).to(dev)
    return _Features(Xt, bank, 1 if Vs is None else Vs.shape[0], mean, scale)


def _targets(Y: np.ndarray, lay: HeadLayout, dev) -> tuple[Any, Any]:
    """One-hot targets per column (n + 1, W) and per-(row, head) validity (n + 1, heads);
    row n is the all-zero padding row."""
    import torch

    n = len(Y)
    onehot = np.zeros((n + 1, lay.width), dtype=np.float32)
    valid = np.zeros((n + 1, len(lay.order)), dtype=np.float32)
    for h, i in enumerate(lay.order):
        y = Y[:, i]
        ok = y >= 0
        if (y >= lay.n_classes[i]).any():
            raise CredannoError(f"{lay.names[i]} labels exceed its {lay.n_classes[i]} classes")
        onehot[np.flatnonzero(ok), lay.starts[h] + y[ok]] = 1.0
        valid[:n, h] = ok
    return torch.from_numpy(onehot).to(dev), torch.from_numpy(valid).to(dev)


def _init_params(gens: list, D: int, lay: HeadLayout, init_std: float, dev) -> HeadParams:
    """N(0, init_std) weights from each configuration's generator, zero biases."""
    import torch

    Wx = torch.stack([torch.randn(D, lay.width, generator=g) * init_std for g in gens]).to(dev)
    b = torch.zeros(len(gens), lay.width, device=dev)
    Wz = None
    if lay.cls is not None:
        A = lay.n_exp
        Wz = torch.stack([torch.randn(A, lay.width - A, generator=g) * init_std
                          for g in gens]).to(dev)
    return HeadParams(Wx, b, Wz)


class _ValSelector:
    """Keeps every head's parameters from the epoch with its best validation accuracy."""

    def __init__(self, params: HeadParams, X, Y: np.ndarray, val_rows: list[np.ndarray],
                 lay: HeadLayout) -> None:
        import torch

        dev, (n, D) = X.device, X.shape
        vmax = max(max(len(v) for v in val_rows), 1)
        vidx = torch.full((len(val_rows), vmax), n, dtype=torch.long)
        for c, v in enumerate(val_rows):
            vidx[c, :len(v)] = torch.as_tensor(v)
        vidx = vidx.to(dev)
        self.lay = lay
        self.X = torch.cat([X, X.new_zeros(1, D)])[vidx]
        self.best_score = torch.full((len(val_rows), len(lay.order)), -1.0, device=dev)
        self.best_exp = [None if p is None else p.clone() for p in params]
        self.best_cls = [None if p is None else p.clone() for p in params]
        self.tol = torch.as_tensor([label_spec(lay.names[i]).tolerance
                                    if lay.names[i] in LABEL_NAMES else 0 for i in lay.order],
                                   device=dev)
        pad = np.concatenate([Y, np.full((1, Y.shape[1]), -1)])[:, lay.order]
        self.y = torch.as_tensor(pad, device=dev)[vidx]  # (C, vmax, heads)

    def step(self, params: HeadParams) -> None:
        import torch

        lay = self.lay
        Z = _forward(params, self.X, lay)
        accs = []
        for h, i in enumerate(lay.order):
            pred = Z[..., lay.columns(i)].argmax(-1)
            y = self.y[..., h]
            ok = ((pred - y).abs() <= self.tol[h]) & (y >= 0)
            accs.append(ok.sum(1) / (y >= 0).sum(1).clamp_min(1))
        acc = torch.stack(accs, dim=1)  # (C, heads)
        better = acc > self.best_score
        self.best_score.copy_(torch.where(better, acc, self.best_score))
        col_better = better[:, torch.as_tensor(lay.col_head, device=acc.device)]  # (C, W)
        Wx, b, _ = params
        self.best_exp[0].copy_(torch.where(col_better[:, None, :], Wx, self.best_exp[0]))
        self.best_exp[1].copy_(torch.where(col_better, b, self.best_exp[1]))
        if lay.cls is not None:
            cb = better[:, -1]
            for dst, src in zip(self.best_cls, params, strict=True):
                dst.copy_(torch.where(cb.view(-1, *([1] * (src.dim() - 1))), src, dst))


class _BatchedTrainer:
    """C configurations as one batched model: hand-written gradients of the joint
    cross-entropy and ``torch.optim.SGD``'s momentum update, configurations sorted by steps
    per epoch so that the ones still stepping are a prefix."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, layout: HeadLayout, runs: list[ProbeRun],
                 spec: ProbeSpec, views: np.ndarray | None) -> None:
        import torch

        n, D = X.shape
        self.spec, self.lay, self.n = spec, layout, n
        self.batch_size = _clamp_batch(spec.batch_size, n)
        lrs = np.asarray([r.lr for r in runs], dtype=np.float64)
        for value in set(lrs.tolist()):
            check_lr(value)
        rows = [np.asarray(r.rows, dtype=np.int64) for r in runs]
        if any(len(r) == 0 for r in rows):
            raise CredannoError("a configuration has no labelled training rows; use a larger "
                                "--frac")
        dev = self.dev = torch.device(spec.device)
        self.feats = _features(X, views, spec.standardize, dev)
        Y = np.asarray(Y, dtype=np.int64).reshape(n, -1)
        self.onehot, self.valid = _targets(Y, layout, dev)
        self.col_head = torch.as_tensor(layout.col_head, device=dev)
        gens = [torch.Generator().manual_seed(int(r.seed)) for r in runs]
        params = _init_params(gens, D, layout, spec.init_std, dev)
        # configurations sorted by steps per epoch, so the active ones are a prefix
        steps = np.array([math.ceil(len(r) / self.batch_size) for r in rows])
        order = np.argsort(-steps, kind="stable")
        self.inv = np.argsort(order)
        steps_sorted = steps[order]
        self.n_active = [int((steps_sorted > j).sum()) for j in range(int(steps_sorted[0]))]
        self.width = int(steps_sorted[0]) * self.batch_size
        self.lr = torch.as_tensor(lrs[order], dtype=torch.float32, device=dev)
        self.params = HeadParams(*(None if p is None else p[order].contiguous()
                                   for p in params))
        self.bufs = [torch.zeros_like(p) for p in self.params if p is not None]
        self.gens = [gens[c] for c in order]
        self.rows = [torch.as_tensor(rows[c]) for c in order]
        self.selector = None
        if any(r.val_rows is not None for r in runs):
            val = [np.asarray(() if runs[c].val_rows is None else runs[c].val_rows,
                              dtype=np.int64) for c in order]
            self.selector = _ValSelector(self.params, self.feats.X, Y, val, layout)

    def run(self, progress: bool) -> JointHeads:
        import torch

        epochs = range(self.spec.epochs)
        if progress:
            from tqdm import tqdm
            epochs = tqdm(epochs, desc=f"probes ({len(self.rows)} configurations)",
                          unit="epoch")
        with torch.no_grad():
            for epoch in epochs:
                self._epoch(epoch)
                if self.selector is not None:
                    self.selector.step(self.params)
        if self.selector is not None:
            exp_p, cls_p = HeadParams(*self.selector.best_exp), HeadParams(*self.selector.best_cls)
        else:
            exp_p = cls_p = self.params
        inv = torch.as_tensor(self.inv, device=self.dev)

        def unsort(p: HeadParams) -> HeadParams:
            return HeadParams(*(None if t is None else t[inv] for t in p))

        f = self.feats
        mean = None if f.mean is None else torch.from_numpy(f.mean).to(self.dev)
        scale = None if f.scale is None else torch.from_numpy(f.scale).to(self.dev)
        return JointHeads(self.lay, unsort(exp_p), unsort(cls_p), mean, scale)

    def _epoch(self, epoch: int) -> None:
        """One epoch: per-configuration shuffles (padded with the dummy row n), then the
        steps, with the cosine schedule's rate (``CosineAnnealingLR``)."""
        import torch

        C, n, bs = len(self.rows), self.n, self.batch_size
        lr_now = self.lr * (0.5 * (1 + math.cos(math.pi * epoch / self.spec.epochs)))
        idx = torch.full((C, self.width), n, dtype=torch.long)
        for c in range(C):
            r = self.rows[c]
            idx[c, :len(r)] = r[torch.randperm(len(r), generator=self.gens[c])]
        vsel = None
        if self.feats.n_views > 1:
            vsel = torch.stack([torch.randint(self.feats.n_views, (self.width,),
                                              generator=self.gens[c]) for c in range(C)])
        idx = idx.to(self.dev)
        for j, na in enumerate(self.n_active):
            bi = idx[:na, j * bs:(j + 1) * bs]
            safe = torch.where(bi < n, bi, 0)
            if vsel is not None:
                vs = vsel[:na, j * bs:(j + 1) * bs].to(self.dev)
                Xb = self.feats.bank[vs * n + safe]
            else:
                Xb = self.feats.bank[safe]
            self._step(Xb, bi, na, lr_now)

    def _step(self, Xb, bi, na: int, lr_now) -> None:
        """One SGD step of the first ``na`` configurations on minibatch rows ``bi``."""
        import torch

        lay, A = self.lay, self.lay.n_exp
        Wx, b, Wz = (None if p is None else p[:na] for p in self.params)
        Z = _forward((Wx, b, Wz), Xb, lay)
        P = _grid_softmax(Z, lay)
        mask = self.valid[bi]  # (na, B, heads); padding row n is all zero
        cnt = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        G = (P - self.onehot[bi]) * (mask / cnt)[..., self.col_head]
        if Wz is not None:
            Gc = G[..., A:]
            dWz = torch.bmm(Z[..., :A].transpose(1, 2), Gc)
            if self.spec.cls_grad:  # G_cls's loss reaches the attribute heads via z_exp
                G = torch.cat([G[..., :A] + torch.bmm(Gc, Wz.transpose(1, 2)), Gc], -1)
        dWx = torch.bmm(Xb.transpose(1, 2), G)
        grads = [dWx, G.sum(dim=1)] + ([dWz] if Wz is not None else [])
        params = [Wx, b] + ([Wz] if Wz is not None else [])
        for p, buf, g in zip(params, self.bufs, grads, strict=True):
            bf = buf[:na]
            bf.mul_(self.spec.momentum).add_(g)  # torch.optim.SGD's momentum buffer
            p.sub_(bf * lr_now[:na].view(-1, *([1] * (p.dim() - 1))))


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


def _probe_run(subset: Subset, probe: ProbeSpec, nodules: np.ndarray | None) -> ProbeRun:
    """The training run of one labelled subset (its validation part carved out for
    ``select="val"``, whole nodules when the subset was drawn nodule-wise; the tuned
    recipe's CV folds keep whole nodules when ``nodules`` (per training row) is given)."""
    if probe.recipe != "paper":
        return ProbeRun(subset.rows, seed=subset.seed,
                        groups=None if nodules is None else nodules[subset.rows])
    lr = probe.lr if probe.lr is not None else paper_lr(subset.frac)
    if probe.select == "val":
        fit, val = split_validation(subset.rows, probe.val_frac, subset.seed, subset.groups)
        return ProbeRun(fit, lr, subset.seed, val)
    return ProbeRun(subset.rows, lr, subset.seed)


def _probe_sweep_data(data: EvalData, subsets: SubsetsLike, probe: ProbeSpec, n_boot: int,
                      progress: bool) -> EvalResult:
    """Joint probes for every labelled subset, trained as one batched model."""
    import torch

    from credanno.eval.results import ConfigPredictions, build_result
    from credanno.eval.subsets import resolve_subsets, warn_subsets_missing_classes

    if probe.recipe == "paper":  # the tuned recipe is full-batch
        probe = replace(probe, batch_size=_clamp_batch(probe.batch_size, len(data.train_x)))
    labels = list(data.labels)
    layout = HeadLayout(labels, [label_spec(n).n_classes for n in labels],
                        labels.index("malignancy") if "malignancy" in labels else None)
    Y = data.train_table[labels].to_numpy().astype(np.int64)
    drawn, subset_record = resolve_subsets(subsets, data.train_table, data.train_features)
    nodules = (data.train_table["nodule_id"].to_numpy()
               if "nodule_id" in data.train_table else None)
    runs = [_probe_run(s, probe, nodules) for s in drawn]
    warn_subsets_missing_classes(drawn, Y, labels)
    heads = train_joint_heads(data.train_x, Y, layout, runs, probe, views=data.train_views,
                              progress=progress)
    with torch.no_grad():
        Xq = torch.as_tensor(np.ascontiguousarray(data.test_x, dtype=np.float32),
                             device=probe.device)
        probs = [p.cpu().numpy() for p in _predict_heads(heads, Xq)]
    configs = []
    for c, s in enumerate(drawn):
        proba = {name: probs[j][c] for j, name in enumerate(labels)}
        pred = _decisions(proba, heads, c, probe.recipe)
        configs.append(ConfigPredictions("probe", None, s.frac, s.seed, len(s.rows), pred,
                                         proba))
    views = 0 if data.train_views is None else int(data.train_views.shape[0])
    cfg = {"method": "probe", "recipe": probe.recipe, **subset_record,
           **_recipe_record(probe, runs),
           "standardize": probe.standardize, "views": views if probe.recipe == "paper" else 0,
           "labels": labels, **data.record()}
    return build_result(configs, data.test_table, labels, n_boot=n_boot, config=cfg)


def _decisions(proba: dict[str, np.ndarray], heads: JointHeads, c: int,
               recipe: str) -> dict[str, np.ndarray]:
    """Predicted classes of configuration ``c``: the most probable class (paper recipe),
    or the tuned recipe's decision for the paper's metric among the classes its labelled
    subset holds (:func:`credanno.eval.tuned.decide`)."""
    if recipe == "paper":
        return {name: p.argmax(axis=1) for name, p in proba.items()}
    from credanno.eval.tuned import decide

    mask = heads.mask[c].cpu().numpy()
    return {name: decide(p, label_spec(name).tolerance,
                         mask[heads.layout.columns(heads.layout.names.index(name))] == 0)
            for name, p in proba.items()}


def _recipe_record(probe: ProbeSpec, runs: list[ProbeRun]) -> dict:
    """The recipe's settings as recorded in ``EvalResult.config``."""
    if probe.recipe != "paper":
        return {"Cs": list(probe.Cs), "cv_folds": probe.cv_folds}
    return {"epochs": probe.epochs, "lr": probe.lr, "lrs": [r.lr for r in runs],
            "batch_size": probe.batch_size, "momentum": probe.momentum,
            "select": probe.select, "val_frac": probe.val_frac, "cls_grad": probe.cls_grad}


def probe_sweep(store: StoreLike | EvalData = None, subsets: SubsetsLike = None,
                probe: ProbeSpec | None = None, *, labels: Sequence[str] | str | None = None,
                test_store: StoreLike = None, where: str | None = None, n_boot: int = 1000,
                progress: bool = False) -> EvalResult:
    """Linear-probe evaluation of a feature store (default: the newest under ``stores/``).

    ``store`` may also be an :class:`EvalData` (e.g. :meth:`EvalData.from_arrays`), whose
    labels and views are then used. ``subsets`` says which training rows keep their labels:
    a :class:`SubsetSpec` (default: all labels, seed 0) or a list of training-row arrays
    (or :class:`Subset`); ``where`` (a pandas query over the per-image table) restricts
    training and test rows; ``probe`` (default: the paper's recipe on ``last4`` features)
    how the heads are trained. Returns an
    :class:`~credanno.eval.results.EvalResult`.
    """
    from credanno.eval.specs import ProbeSpec

    probe = ProbeSpec() if probe is None else probe
    if isinstance(store, EvalData):
        return _probe_sweep_data(store.subpopulation(where), subsets, probe, n_boot, progress)
    with open_eval_data(store, probe.kind, labels, test_store=test_store,
                        views=probe.views and probe.recipe == "paper", where=where) as data:
        return _probe_sweep_data(data, subsets, probe, n_boot, progress)


def __getattr__(name: str):
    # the estimator lives apart so that importing this module (the CLI does) stays free
    # of scikit-learn
    if name == "JointLinearProbe":
        from credanno.eval.estimator import JointLinearProbe

        return JointLinearProbe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
