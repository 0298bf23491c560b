"""The paper's trained predictors G_exp and G_cls (section 2, Eq. 3) as linear probes.

One linear layer G_exp^(i) per nodule attribute on the frozen features f, and G_cls for
malignancy on ``f (+) z_exp^(1) (+) ... (+) z_exp^(M)`` (the features concatenated with the
attribute logits), trained by one of :data:`PROBE_RECIPES`: ``"tuned"``
(:mod:`credanno.eval.tuned`, the default) or ``"paper"``: the module
:class:`credanno.eval.heads.JointHeadsModule` (one ``nn.Linear`` per head) trained by
minimising the sum of the heads' cross-entropies with ``torch.optim.SGD`` (momentum 0.9,
batch 128, ``CosineAnnealingLR`` over 100 epochs, lr 5e-4 with all labels and 2.5e-4 with
partial labels), as in the paper's section 3 (:func:`credanno.eval.heads.train_paper`).

Trained heads of C (label fraction, seed) configurations are kept as batched tensors
(:class:`HeadParams`: ``W_x`` (C, D, W) for every head's feature weights in the columns of
:class:`HeadLayout`, ``W_z`` (C, A, C_cls) for G_cls on the attribute logits), so that
prediction is one batched matmul for all configurations.

Model selection (paper recipe): the last epoch (default), or the best epoch of every
head on a validation part carved from the labelled subset (``select="val"``). Never the
test split: the paper's public code picked each head's best epoch on the test split.

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
from credanno.labels import label_spec
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

    def to_columns(self, per_label: Sequence[np.ndarray | None], n: int) -> np.ndarray:
        """Per-label (n, C_l) arrays (None: no such array) as one float32 (n, W) array in
        these columns, NaN where a label has none (the layout of ``soft`` targets)."""
        if len(per_label) != len(self.names):
            raise CredannoError(f"{len(per_label)} soft-target arrays for {len(self.names)} "
                                "labels; pass one (or None) per label")
        out = np.full((n, self.width), np.nan, dtype=np.float32)
        for i, block in enumerate(per_label):
            if block is None:
                continue
            block = np.asarray(block, dtype=np.float32)
            if block.shape != (n, self.n_classes[i]):
                raise CredannoError(f"soft targets of {self.names[i]} have shape {block.shape}; "
                                    f"expected ({n}, {self.n_classes[i]})")
            out[:, self.columns(i)] = block
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
    #: tuned recipe: heads (:class:`~credanno.eval.tuned.TunedHeads`) to quench from
    #: (:func:`~credanno.eval.tuned.quench_tuned`) instead of a cross-validated fit
    init: Any = None


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
    tuned: list | None = None  # tuned recipe: each configuration's TunedHeads


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
    """Train the joint heads of every configuration in ``runs``.

    ``X`` (n, D) features, ``Y`` (n, L) int labels (-1 missing, ignored by that head);
    ``spec`` the recipe (epochs, batch size, momentum, standardisation, device; default
    :class:`ProbeSpec`); ``views`` (V, n, D): stored augmented views, each sample then
    draws one view per visit. Runs with ``val_rows`` get each head's best epoch on those
    rows (the paper's +/-1 accuracy for attributes). ``num_threads``: see
    :func:`_torch_threads`. Every configuration trains exactly as if it trained alone
    (with ``views``, each draws as many views per epoch as the longest configuration in
    ``runs`` visits rows, so alone equals together among configurations of equal steps per
    epoch). ``soft``: None, or float32 (n, W) class-probability targets in the layout's columns
    (:meth:`HeadLayout.to_columns`); where a row's block of a head holds numbers, that head
    trains on them instead of the row's label (e.g. cRedAnno+'s soft pseudo-labels); a
    block of NaN means: use the label in ``Y``.
    """
    from credanno.eval.specs import ProbeSpec

    spec = ProbeSpec() if spec is None else spec
    with _torch_threads(spec.device, num_threads):
        return PROBE_RECIPES[spec.recipe](X, Y, layout, list(runs), spec, views, progress,
                                          soft=soft)


def _train_paper(X: np.ndarray, Y: np.ndarray, layout: HeadLayout, runs: list[ProbeRun],
                 spec: ProbeSpec, views: np.ndarray | None, progress: bool, *,
                 soft: np.ndarray | None = None) -> JointHeads:
    """The paper's recipe (:func:`credanno.eval.heads.train_paper`): minibatch SGD with
    momentum, cosine schedule, last (or best validation) epoch."""
    from credanno.eval.heads import train_paper

    return train_paper(X, Y, layout, runs, spec, views, progress, soft=soft)


def _train_tuned(X: np.ndarray, Y: np.ndarray, layout: HeadLayout, runs: list[ProbeRun],
                 spec: ProbeSpec, views: np.ndarray | None, progress: bool, *,
                 soft: np.ndarray | None = None) -> JointHeads:
    """The tuned recipe (:mod:`credanno.eval.tuned`): every configuration fitted to
    convergence with its penalty cross-validated inside its labelled rows. Trains on the
    plain features (``views`` unused: the penalty, not augmentation, regularises);
    ``soft`` (n, W): soft targets in the layout's columns (NaN rows: the hard label).
    Identical subsets (e.g. all labels, every seed) are fitted once; subsets with the same
    number of rows (every seed of a label fraction) are fitted together
    (:func:`~credanno.eval.tuned.fit_tuned_configs`)."""
    import torch

    from credanno.eval.tuned import fit_tuned_configs, quench_tuned

    dev = torch.device(spec.device)
    n = len(X)
    Y = np.asarray(Y, dtype=np.int64).reshape(n, -1)
    f = _features(X, None, spec.standardize, dev)
    if soft is not None and np.shape(soft) != (n, layout.width):
        raise CredannoError(f"soft targets of shape {np.shape(soft)}, expected "
                            f"({n}, {layout.width}) (see HeadLayout.to_columns)")
    soft = None if soft is None else np.asarray(soft, dtype=np.float64)
    keys, todo, done = [], {}, {}  # todo: distinct subset -> (rows, groups, soft rows)
    for i, r in enumerate(runs):
        rows = np.asarray(r.rows, dtype=np.int64)
        if len(rows) == 0:
            raise CredannoError("a configuration has no labelled training rows; use a larger "
                                "--frac")
        groups = None if r.groups is None else np.asarray(r.groups)
        q = None if soft is None else soft[rows]
        if r.init is not None:  # quenched from given heads: its own short fit
            keys.append(("init", i))
            done[keys[-1]] = quench_tuned(f.X[torch.as_tensor(rows, device=dev)], Y[rows],
                                          layout, r.init, q)
            continue
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
    for group in by_size.values():
        rows, groups, qs = zip(*(todo[k] for k in group), strict=True)
        # float32: on the phantom's teacher and raw-pixel stores float64 gave the same
        # accuracies at every label fraction, at twice the time (benchmarks/budget_speed.py)
        Xs = [f.X[torch.as_tensor(r, device=dev)] for r in rows]
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
    return JointHeads(layout, params, params, mean, scale, mask, tuned=list(fits))


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
    return {name: decide(p, _tolerance(name),
                         mask[heads.layout.columns(heads.layout.names.index(name))] == 0)
            for name, p in proba.items()}


def _tolerance(name: str) -> int:
    """The paper metric's tolerance of a label column (0 for a column of no LIDC name,
    e.g. an estimator's numbered columns)."""
    from credanno.labels import LABEL_NAMES

    return label_spec(name).tolerance if name in LABEL_NAMES else 0


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
