"""G_exp and G_cls, the paper's trained predictors (section 2, Eq. 3), as a torch module,
and the paper's recipe that trains it (section 3, "Training settings").

:class:`JointHeadsModule` holds one ``nn.Linear`` G_exp^(i) per nodule attribute on the
frozen features f, and G_cls (an ``nn.Linear``) for malignancy on
``f (+) z_exp^(1) (+) ... (+) z_exp^(M)``, the features concatenated with the attribute
logits (Eq. 3). Its loss is the sum over heads of each head's cross-entropy averaged
over the head's labelled rows (``F.cross_entropy(ignore_index=-1)``), or against
class-probability targets (soft pseudo-labels, cRedAnno+).

:func:`train_paper` trains one module per configuration, as the paper does: SGD with
momentum 0.9 (``torch.optim.SGD``), batch 128, ``CosineAnnealingLR`` over the epochs
stepped once per epoch, 100 epochs, lr 5e-4 with all labels and 2.5e-4 with partial
labels (the caller's :class:`~credanno.eval.probe.ProbeRun`), the last epoch or each
head's best epoch on validation rows. Each configuration trains exactly as if alone,
from its own ``torch.Generator`` (initialisation, then per epoch its minibatch order and
view draws). Configurations with the same steps per epoch and lr (e.g. the seeds of one
label fraction) step together through ``torch.func`` (stacked parameters,
``vmap(functional_call)``), which saves the per-step overhead that dominates small
subsets: 1.05-1.35x less CPU time than one after another per label fraction, 1.00-1.23x
on ``benchmarks/probe_speed.py``'s 15 configurations (whose full-label ones are
compute-bound); the others train one after another. The trained weights
are exported as the batched (C, D, W) tensors of :class:`~credanno.eval.probe.HeadParams`
that prediction reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from credanno.errors import CredannoError
from credanno.eval.probe import (
    HeadLayout,
    HeadParams,
    JointHeads,
    ProbeRun,
    _clamp_batch,
    _Features,
    _features,
    _forward,
    check_lr,
)
from credanno.labels import LABEL_NAMES, label_spec

if TYPE_CHECKING:
    from credanno.eval.specs import ProbeSpec

#: how far a soft target's probabilities may sum from 1 (float32 softmax outputs)
SOFT_SUM_TOL = 1e-3


class JointHeadsModule(nn.Module):
    """The joint heads of Eq. 3: ``exp`` (one ``nn.Linear(D, C_i)`` per attribute, in
    ``layout.order``) and ``cls`` (``nn.Linear(D + A, C_cls)`` on ``f (+) z_exp``, A the
    attribute logits' total width; None when the layout has no G_cls).

    ``cls_grad``: G_cls's loss reaches the attribute heads through z_exp (the joint loss
    of Eq. 3); False detaches z_exp before G_cls, so each attribute head trains on its own
    loss. Weights start N(0, ``init_std``) from ``generator``, drawn in the order credanno
    always drew them (so that its numbers stay put): one (D, W) block for every head's
    feature weights in the layout's columns, then G_cls's (A, C_cls) block on z_exp;
    biases start at zero.
    """

    def __init__(self, layout: HeadLayout, dim: int, generator: torch.Generator | None = None,
                 *, init_std: float = 0.01, cls_grad: bool = True) -> None:
        super().__init__()
        self.layout, self.dim, self.cls_grad = layout, int(dim), bool(cls_grad)
        self.widths = [layout.n_classes[i] for i in layout.order]
        exp = layout.order if layout.cls is None else layout.order[:-1]
        # skip_init: nn.Linear's own initialisation would draw from torch's global generator
        self.exp = nn.ModuleList(nn.utils.skip_init(nn.Linear, self.dim, layout.n_classes[i])
                                 for i in exp)
        self.cls = None
        if layout.cls is not None:
            self.cls = nn.utils.skip_init(nn.Linear, self.dim + layout.n_exp,
                                          layout.n_classes[layout.cls])
        g = torch.Generator().manual_seed(0) if generator is None else generator
        Wx = torch.randn(self.dim, layout.width, generator=g) * init_std
        Wz = None
        if self.cls is not None:
            Wz = torch.randn(layout.n_exp, layout.width - layout.n_exp, generator=g) * init_std
        self.load_params(HeadParams(Wx, torch.zeros(layout.width), Wz))

    @torch.no_grad()
    def load_params(self, params: HeadParams) -> None:
        """Set the weights from one configuration's ``W_x`` (D, W), ``b`` (W) and ``W_z``
        (A, C_cls), the layout's columns (the inverse of :meth:`export`)."""
        Wx, b, Wz = params
        starts = self.layout.starts
        for h, lin in enumerate(self.exp):
            lin.weight.copy_(Wx[:, starts[h]:starts[h + 1]].T)
            lin.bias.copy_(b[starts[h]:starts[h + 1]])
        if self.cls is not None:
            A = self.layout.n_exp
            self.cls.weight.copy_(torch.cat([Wx[:, A:].T, Wz.T], dim=1))
            self.cls.bias.copy_(b[A:])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head, in ``layout.order`` (G_cls last), for features x (..., D).

        One matmul for all heads' feature weights (the heads' weights concatenated, which
        autograd splits back), plus G_cls's small z_exp term.
        """
        cls = self.cls
        W, b, Wz = _joint_weights([lin.weight for lin in self.exp], [lin.bias for lin in self.exp],
                                  None if cls is None else cls.weight,
                                  None if cls is None else cls.bias, self.dim)
        Z = F.linear(x, W, b)
        logits = list(Z.split(self.widths, dim=-1))
        if Wz is not None:
            z_exp = Z[..., :self.layout.n_exp]
            if not self.cls_grad:  # G_cls's loss stops at z_exp
                z_exp = z_exp.detach()
            logits[-1] = logits[-1] + F.linear(z_exp, Wz)
        return logits

    def loss(self, logits: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Sum over heads of the head's cross-entropy summed over its labelled rows and
        divided by their number (a head with none in the batch adds 0).

        ``target``: (B, heads) int labels in ``layout.order`` (-1: missing), or (B, W)
        float class-probability targets in the layout's columns (an all-zero row: missing).
        """
        if target.is_floating_point():
            parts = target.split(self.widths, dim=-1)
            terms = [F.cross_entropy(z, t, reduction="sum")
                     for z, t in zip(logits, parts, strict=True)]
            counts = torch.stack([(t.sum(-1) > 0).sum() for t in parts])
        else:
            terms = [F.cross_entropy(z, target[..., h], ignore_index=-1, reduction="sum")
                     for h, z in enumerate(logits)]
            counts = (target >= 0).sum(-2)
        return (torch.stack(terms) / counts.clamp_min(1)).sum()

    def export(self) -> HeadParams:
        """This configuration's weights as :class:`HeadParams` of one configuration:
        ``W_x`` (1, D, W), ``b`` (1, W), ``W_z`` (1, A, C_cls) (fresh tensors)."""
        with torch.no_grad():
            state = {k: v.detach()[None] for k, v in self.named_parameters()}
            return export_state(state, self.dim, len(self.exp), self.cls is not None)


def _joint_weights(exp_w: list, exp_b: list, cls_w, cls_b, dim: int):
    """All heads' feature weights (..., W, D) and biases (..., W) concatenated in the
    layout's columns, and G_cls's weights on z_exp (..., C_cls, A) (None without G_cls)."""
    if cls_w is None:
        return torch.cat(exp_w, dim=-2), torch.cat(exp_b, dim=-1), None
    return (torch.cat([*exp_w, cls_w[..., :dim]], dim=-2), torch.cat([*exp_b, cls_b], dim=-1),
            cls_w[..., dim:])


def export_state(state: dict, dim: int, n_exp: int, has_cls: bool) -> HeadParams:
    """Parameters named as :class:`JointHeadsModule`'s, with a leading configuration axis,
    as :class:`HeadParams` (contiguous (C, D, W), (C, W), (C, A, C_cls))."""
    W, b, Wz = _joint_weights([state[f"exp.{h}.weight"] for h in range(n_exp)],
                              [state[f"exp.{h}.bias"] for h in range(n_exp)],
                              state.get("cls.weight") if has_cls else None,
                              state.get("cls.bias") if has_cls else None, dim)
    return HeadParams(W.transpose(-1, -2).contiguous(), b.contiguous(),
                      None if Wz is None else Wz.transpose(-1, -2).contiguous())


def hard_labels(Y: np.ndarray, layout: HeadLayout) -> np.ndarray:
    """Labels (n, heads) in ``layout.order``, every negative label as -1 (missing)."""
    Y = np.asarray(Y, dtype=np.int64).reshape(len(Y), -1)
    for i in layout.order:
        if (Y[:, i] >= layout.n_classes[i]).any():
            raise CredannoError(f"{layout.names[i]} labels exceed its {layout.n_classes[i]} "
                                "classes")
    return np.where(Y < 0, -1, Y)[:, layout.order]


def class_targets(labels: np.ndarray, soft: np.ndarray, layout: HeadLayout) -> np.ndarray:
    """Class-probability targets (n, W) in the layout's columns: a head's ``soft`` block
    where it holds numbers, else the one-hot of ``labels`` (n, heads) (:func:`hard_labels`),
    all zero where that is missing too. A block must be all NaN or a distribution."""
    n = len(labels)
    soft = np.asarray(soft, dtype=np.float32)
    if soft.shape != (n, layout.width):
        raise CredannoError(f"soft targets have shape {soft.shape}; expected ({n}, "
                            f"{layout.width}): one column per class of every head")
    T = np.zeros((n, layout.width), dtype=np.float32)
    for h, i in enumerate(layout.order):
        lo, hi = int(layout.starts[h]), int(layout.starts[h + 1])
        ok = labels[:, h] >= 0
        T[np.flatnonzero(ok), lo + labels[ok, h]] = 1.0
        block = soft[:, lo:hi]
        nan = np.isnan(block)
        given = ~nan.any(axis=1)
        bad = (nan.any(axis=1) & ~nan.all(axis=1)).any() or not np.isfinite(block[given]).all()
        bad = bad or (block[given] < 0).any()
        if bad or (np.abs(block[given].sum(axis=1) - 1) > SOFT_SUM_TOL).any():
            raise CredannoError(f"soft targets of {layout.names[i]}: each row must be all NaN "
                                "(use the label) or class probabilities summing to 1")
        T[given, lo:hi] = block[given]
    return T


class _ValSelector:
    """Keeps every head's parameters from the epoch with its best validation accuracy."""

    def __init__(self, params: HeadParams, X, Y: np.ndarray, val_rows: list[np.ndarray],
                 lay: HeadLayout) -> None:
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

    @torch.no_grad()
    def step(self, params: HeadParams) -> None:
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

    def best(self) -> tuple[HeadParams, HeadParams]:
        return HeadParams(*self.best_exp), HeadParams(*self.best_cls)


class _Data(NamedTuple):
    """What every configuration trains on, on the training device."""

    feats: _Features
    target: torch.Tensor  # (n + 1, heads) labels or (n + 1, W) targets; row n: padding
    Y: np.ndarray  # (n, L) labels, for validation selection
    batch_size: int
    width: int  # rows of the longest configuration's padded epoch: views drawn per epoch


def _prepare(X: np.ndarray, Y: np.ndarray, layout: HeadLayout, runs: list[ProbeRun],
             spec: ProbeSpec, views: np.ndarray | None, soft: np.ndarray | None) -> _Data:
    """Features and targets on the device, with the runs' learning rates and rows checked."""
    n = len(X)
    for value in {float(r.lr) for r in runs}:
        check_lr(value)
    if any(len(r.rows) == 0 for r in runs):
        raise CredannoError("a configuration has no labelled training rows; use a larger "
                            "--frac")
    batch_size = _clamp_batch(spec.batch_size, n)
    dev = torch.device(spec.device)
    Y = np.asarray(Y, dtype=np.int64).reshape(n, -1)
    labels = hard_labels(Y, layout)
    if soft is None:
        target = torch.as_tensor(np.concatenate([labels, np.full((1, labels.shape[1]), -1)]))
    else:
        T = class_targets(labels, soft, layout)
        target = torch.from_numpy(np.concatenate([T, np.zeros((1, T.shape[1]), np.float32)]))
    # the batched trainer this replaces drew every configuration's views over the longest
    # configuration's epoch; drawing as many keeps each generator's stream, hence the numbers
    width = max(-(-len(r.rows) // batch_size) for r in runs) * batch_size
    return _Data(_features(X, views, spec.standardize, dev), target.to(dev), Y, batch_size,
                 width)


def _epoch_batches(data: _Data, rows: torch.Tensor,
                   gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's minibatches (features, targets) of one configuration: its rows
    shuffled by its generator, each sample on one stored view drawn per visit."""
    f, bs = data.feats, data.batch_size
    order = rows[torch.randperm(len(rows), generator=gen)]
    vsel = None
    if f.n_views > 1:
        vsel = torch.randint(f.n_views, (data.width,), generator=gen)
    dev = f.bank.device
    for s in range(0, len(order), bs):
        bi = order[s:s + bs].to(dev)
        rows_in_bank = bi if vsel is None else vsel[s:s + len(bi)].to(dev) * len(f.X) + bi
        yield f.bank[rows_in_bank], data.target[bi]


class _Trainee(NamedTuple):
    """What :func:`_fit` trains: parameters (leaf tensors), the loss of a minibatch, the
    parameters as :class:`HeadParams`, and one epoch's minibatches."""

    params: list[torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    export: Callable[[], HeadParams]
    epoch: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def _sgd(params: list[torch.Tensor], lr: float, momentum: float) -> torch.optim.SGD:
    """``torch.optim.SGD``, fused (one kernel for all the heads' tensors: the per-tensor
    loop cost as much as a step's matmuls) where this torch has it for the device."""
    try:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, fused=True)
    except (TypeError, RuntimeError):  # torch < 2.4 on CPU
        return torch.optim.SGD(params, lr=lr, momentum=momentum)


def _fit(model: _Trainee, lr: float, val_rows: list[np.ndarray] | None, data: _Data,
         layout: HeadLayout, spec: ProbeSpec) -> tuple[HeadParams, HeadParams]:
    """The paper's optimisation: SGD with momentum, ``CosineAnnealingLR`` stepped per
    epoch; returns the (G_exp, G_cls) parameters of the last epoch, or of every head's
    best epoch on ``val_rows``."""
    opt = _sgd(model.params, float(lr), spec.momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs)
    selector = None
    if val_rows is not None:
        selector = _ValSelector(model.export(), data.feats.X, data.Y, val_rows, layout)
    for _ in range(spec.epochs):
        for xb, tb in model.epoch():
            loss = model.loss(xb, tb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if selector is not None:
            selector.step(model.export())
    if selector is not None:
        return selector.best()
    last = model.export()
    return last, last


def _val_rows(runs: list[ProbeRun]) -> list[np.ndarray] | None:
    if runs[0].val_rows is None:
        return None
    return [np.asarray(r.val_rows, dtype=np.int64) for r in runs]


def _train_one(data: _Data, layout: HeadLayout, run: ProbeRun,
               spec: ProbeSpec) -> tuple[HeadParams, HeadParams]:
    """One configuration: its own module, generator (initialisation, then minibatch
    order and views), optimiser and schedule."""
    gen = torch.Generator().manual_seed(int(run.seed))
    model = JointHeadsModule(layout, data.feats.X.shape[1], gen, init_std=spec.init_std,
                             cls_grad=spec.cls_grad).to(data.feats.X.device)
    rows = torch.as_tensor(np.asarray(run.rows, dtype=np.int64))
    trainee = _Trainee(list(model.parameters()), lambda x, t: model.loss(model(x), t),
                       model.export, lambda: _epoch_batches(data, rows, gen))
    return _fit(trainee, run.lr, _val_rows([run]), data, layout, spec)


def _group_batches(data: _Data, rows: list[torch.Tensor], gens: list[torch.Generator]
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's minibatches (G, B, D) of G configurations with the same steps per
    epoch, drawn as :func:`_epoch_batches` draws each; shorter configurations are padded
    with the missing-target row n (no loss, no gradient)."""
    f, bs, n = data.feats, data.batch_size, len(data.feats.X)
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), n, dtype=torch.long)
    vsel = torch.zeros((len(rows), width), dtype=torch.long)
    for c, (r, g) in enumerate(zip(rows, gens, strict=True)):
        idx[c, :len(r)] = r[torch.randperm(len(r), generator=g)]
        if f.n_views > 1:
            vsel[c] = torch.randint(f.n_views, (data.width,), generator=g)[:width]
    idx, vsel = idx.to(f.bank.device), vsel.to(f.bank.device)
    for s in range(0, width, bs):
        bi = idx[:, s:s + bs]
        yield f.bank[vsel[:, s:s + bs] * n + torch.where(bi < n, bi, 0)], data.target[bi]


def _train_group(data: _Data, layout: HeadLayout, runs: list[ProbeRun],
                 spec: ProbeSpec) -> tuple[HeadParams, HeadParams]:
    """Configurations with the same steps per epoch, lr and selection stepped together
    with ``torch.func`` (their modules' parameters stacked, ``vmap(functional_call)``): one
    optimiser over the stacked tensors updates each configuration exactly as its own would
    (SGD is elementwise, and the summed loss's gradient in one configuration's parameters
    is that configuration's own)."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    D = data.feats.X.shape[1]
    gens = [torch.Generator().manual_seed(int(r.seed)) for r in runs]
    models = [JointHeadsModule(layout, D, g, init_std=spec.init_std,
                               cls_grad=spec.cls_grad).to(data.feats.X.device) for g in gens]
    params, _ = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")  # the structure functional_call fills in
    n_exp, has_cls = len(base.exp), base.cls is not None

    def export() -> HeadParams:
        with torch.no_grad():
            return export_state({k: v.detach() for k, v in params.items()}, D, n_exp, has_cls)

    losses = vmap(lambda p, x, t: base.loss(functional_call(base, p, (x,)), t))
    rows = [torch.as_tensor(np.asarray(r.rows, dtype=np.int64)) for r in runs]
    trainee = _Trainee(list(params.values()), lambda x, t: losses(params, x, t).sum(),
                       export, lambda: _group_batches(data, rows, gens))
    return _fit(trainee, runs[0].lr, _val_rows(runs), data, layout, spec)


def _cat(params: list[HeadParams]) -> HeadParams:
    return HeadParams(*(None if p[0] is None else torch.cat(p) for p in zip(*params,
                                                                              strict=True)))


def _take(params: HeadParams, j: int) -> HeadParams:
    return HeadParams(*(None if t is None else t[j:j + 1] for t in params))


def train_paper(X: np.ndarray, Y: np.ndarray, layout: HeadLayout, runs: list[ProbeRun],
                spec: ProbeSpec, views: np.ndarray | None = None, progress: bool = False,
                soft: np.ndarray | None = None) -> JointHeads:
    """The paper's recipe for every configuration in ``runs``, each exactly as if trained
    alone; ``soft``: see :func:`credanno.eval.probe.train_joint_heads`.

    Configurations with the same steps per epoch, learning rate and selection step
    together (:func:`_train_group`, ``torch.func``); a configuration with no such twin
    trains alone (:func:`_train_one`: ``vmap`` over one costs more than it saves).
    """
    data = _prepare(X, Y, layout, runs, spec, views, soft)
    groups: dict[tuple, list[int]] = {}
    for c, r in enumerate(runs):
        key = (-(-len(r.rows) // data.batch_size), float(r.lr), r.val_rows is None)
        groups.setdefault(key, []).append(c)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(runs), desc="probes (paper recipe)", unit="configuration")
    out: list = [None] * len(runs)
    for members in groups.values():
        if len(members) == 1:
            out[members[0]] = _train_one(data, layout, runs[members[0]], spec)
        else:
            exp, cls = _train_group(data, layout, [runs[c] for c in members], spec)
            for j, c in enumerate(members):
                out[c] = (_take(exp, j), _take(cls, j))
        if bar is not None:
            bar.update(len(members))
    if bar is not None:
        bar.close()
    f, dev = data.feats, data.feats.X.device
    mean = None if f.mean is None else torch.from_numpy(f.mean).to(dev)
    scale = None if f.scale is None else torch.from_numpy(f.scale).to(dev)
    return JointHeads(layout, _cat([t[0] for t in out]), _cat([t[1] for t in out]),
                      mean, scale)
