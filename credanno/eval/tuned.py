"""The tuned recipe of the linear predictors G_exp and G_cls (Eq. 3): never worse than a
constant guess.

The paper's recipe (plain SGD, lr 2.5e-4, 100 epochs, N(0, 0.01) weights, zero biases)
leaves the heads near their random start when only 1% of the images are labelled: ~100
steps of a tiny rate. Here each configuration's heads are instead fitted to convergence:

- the multinomial logistic loss of every head (``F.cross_entropy`` semantics, -1 labels
  ignored; optional soft targets, e.g. pseudo-labels as probabilities, cost
  ``-sum_c q_c log p_c`` as ``F.cross_entropy`` with probability targets, and their
  probability mass counts towards the class priors and the classes present) plus an L2
  penalty, in scikit-learn's parametrisation: head h minimises
  ``sum_i CE_i + ||W_h||^2 / (2 C)`` over its labelled rows (biases unpenalised);
- biases start at the labelled rows' log class priors;
- ``C`` is chosen per head from a grid by k-fold cross-validation **inside the labelled
  subset** (folds stratified on the G_cls label, whole nodules when the nodules are known;
  one held-out fold above ``HOLDOUT_ROWS`` rows; the test split is never seen), scored by
  the held-out log loss with the one-standard-error rule: the strongest penalty (whose
  limit is the prior) within one standard error of the best (:func:`one_se_choice`);
- G_cls (Eq. 3) is fitted on ``f (+) z_exp`` after the attribute heads, with ``z_exp``
  held fixed: G_cls's gradient does not reach the attribute heads, so each attribute head
  is trained on its own loss (what the authors' code effectively does). Its CV folds use
  the ``z_exp`` of attribute heads fitted on that fold's training part only;
- classes absent from the labelled subset get no weights and are never predicted
  (their logits are masked to -inf);
- the predicted class is the one the paper's metric most likely scores correct
  (:func:`decide`: for +/-1 attributes not the most probable rating, but the one with the
  most probability within +/-1), which is what a constant guess is chosen by.

Speed: the optimum of an L2-penalised linear model lies in the row space of its training
features, so a subset of m < D rows is solved in an m-dimensional basis (from one SVD);
the folds of one configuration are one problem for L-BFGS (the problems are independent,
so the sum's optimum is every problem's optimum), Jacobi-preconditioned, along the
penalty grid from the strongest, each warm-started from the previous. Configurations
with the same number of labelled rows (every seed of a label fraction) are fitted
together (:func:`fit_tuned_configs`): their bases padded to one dimension ``min(m, D)``
(a zero column's weight stays zero), every configuration's problem a row of one batched
``torch.optim.LBFGS`` (:mod:`credanno.eval.lbfgs`: each row takes its own path, as if
fitted alone; the function evaluations are shared), so a batch costs about as many
L-BFGS steps as its slowest configuration instead of the sum. Gradients are written out
(no autograd), over the heads' real columns only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from credanno.errors import CredannoError
from credanno.eval.lbfgs import batch_lbfgs

#: scikit-learn's C per head; the smallest is close to the constant prior guess
TUNED_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
CV_FOLDS = 5
MAX_ITER = 200
#: L-BFGS iterations of a cross-validation fit (each warm-started from the previous
#: penalty's): the held-out loss that picks the penalty needs no tighter fit. On the
#: phantom's teacher and raw-pixel stores, 50 instead of 200 changed 2 of 324 accuracies
#: (by 0.13 and 0.5 points) and made the probes 2-3.5x faster; the final fit keeps MAX_ITER
CV_MAX_ITER = 25
#: L-BFGS iterations of a quenched refit (:func:`quench_tuned`, cRedAnno+'s "training
#: quenching": a short retraining from the previous heads)
QUENCH_ITER = 20
#: above this many labelled rows the penalty is scored on one held-out fold (1/cv_folds
#: of the rows), not on all folds: k times cheaper, and >= 200 held-out rows suffice
HOLDOUT_ROWS = 1000
_NEG = -1e9  # masked logit while fitting (finite: no inf * 0 in the gradient)


def _folds(y: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    """(k + 1, m) training masks: row 0 all rows, then k CV folds (stratified on ``y``
    where every class has k rows, whole groups when given); k < 2: row 0 only."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    m = len(y)
    masks = [np.ones(m, bool)]
    if k < 2:
        return np.stack(masks)
    ys = np.where(y >= 0, y, y.max() + 1)
    _, counts = np.unique(ys, return_counts=True)
    strat = counts.min() >= k
    if groups is not None and len(np.unique(groups)) >= k:  # whole nodules: no leak
        cv = (StratifiedGroupKFold(k, shuffle=True, random_state=seed) if strat
              else GroupKFold(k))
        splits = cv.split(np.zeros(m), ys, groups)
    else:
        cv = (StratifiedKFold(k, shuffle=True, random_state=seed) if strat
              else KFold(k, shuffle=True, random_state=seed))
        splits = cv.split(np.zeros(m), ys)
    for train, _ in splits:
        mask = np.zeros(m, bool)
        mask[train] = True
        masks.append(mask)
    return np.stack(masks)


class _Block(NamedTuple):
    """Heads fitted together, per feature set of a batch: each row's target distribution
    per head ``Q`` (Kf, m, H, cmax) (one-hot for a hard label, the given probabilities for
    a soft one, zero where the row has neither), ``valid`` (Kf, m, H) where it has one, and
    each head's number of classes."""

    Q: np.ndarray
    valid: np.ndarray
    widths: list[int]

    @property
    def cmax(self) -> int:
        return max(self.widths)

    @property
    def cols(self) -> np.ndarray:
        """Grid slot (head * cmax + class) of every real column, heads in order."""
        return np.concatenate([h * self.cmax + np.arange(w) for h, w in enumerate(self.widths)])

    def repeat(self, r: int) -> _Block:
        """Every feature set's targets ``r`` times in a row (one per CV fold)."""
        return _Block(np.repeat(self.Q, r, 0), np.repeat(self.valid, r, 0), self.widths)


def _soft_part(soft: np.ndarray | None, layout, i: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Label ``i``'s soft targets (m, C_i) and the rows that have them (not all-NaN; none
    without ``soft``); a soft row must be finite, non-negative and sum to 1."""
    if soft is None:
        return np.zeros((m, layout.n_classes[i])), np.zeros(m, bool)
    q = np.asarray(soft[:, layout.columns(i)], dtype=np.float64)
    has = ~np.isnan(q).all(axis=1)
    qs = q[has]
    if not (np.isfinite(qs).all() and (qs >= 0).all() and np.allclose(qs.sum(1), 1, atol=1e-3)):
        raise CredannoError(f"soft targets of {layout.names[i]} must be probabilities (finite, "
                            ">= 0, summing to 1 per row) or all-NaN rows (use the hard label)")
    return q, has


def _block_one(Y: np.ndarray, soft: np.ndarray | None, layout,
               heads: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One configuration's targets of labels ``heads`` (Q (m, H, cmax), valid (m, H)):
    the soft row where ``soft`` has one (the layout's columns), else the hard label of
    ``Y`` (-1: none)."""
    widths = [layout.n_classes[i] for i in heads]
    m, cmax = len(Y), max(widths)
    Q = np.zeros((m, len(heads), cmax))
    valid = np.zeros((m, len(heads)), bool)
    for h, i in enumerate(heads):
        y = Y[:, i]
        ok = y >= 0
        Q[np.flatnonzero(ok), h, y[ok]] = 1.0
        q, has = _soft_part(soft, layout, i, m)
        Q[has, h] = 0.0
        Q[has, h, :widths[h]] = q[has]
        valid[:, h] = ok | has
    return Q, valid


def _block(Ys: list[np.ndarray], softs: list, layout, heads: list[int]) -> _Block:
    """The targets of labels ``heads`` of every configuration (same number of rows)."""
    parts = [_block_one(Y, q, layout, heads) for Y, q in zip(Ys, softs, strict=True)]
    return _Block(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]),
                  [layout.n_classes[i] for i in heads])


def _strat_labels(Y: np.ndarray, soft: np.ndarray | None, layout, i: int) -> np.ndarray:
    """What the CV folds stratify on: label ``i``'s hard label, else its soft target's
    most probable class, else -1."""
    y = np.asarray(Y[:, i], dtype=np.int64).copy()
    q, has = _soft_part(soft, layout, i, len(y))
    fill = has & (y < 0)
    y[fill] = q[fill].argmax(axis=1)
    return y


def _class_stats(block: _Block, train, dtype):
    """Per problem (Kf, P) and head: row weights (Kf, P, m, H), labelled counts (Kf, P, H),
    log priors (Kf, P, G) and allowed classes (Kf, P, G) of its training rows ``train``
    (Kf, P, m), G = H * cmax; class counts sum the target probabilities (one-hot for hard
    labels)."""
    import torch

    dev = train.device
    H, cmax = len(block.widths), block.cmax
    valid = torch.as_tensor(block.valid, device=dev).to(dtype)
    wt = train.to(dtype)[..., None] * valid[:, None]
    Q = torch.as_tensor(block.Q, dtype=dtype, device=dev)  # soft mass counts as present
    counts = torch.einsum("kpmh,kmhc->kphc", wt, Q)
    n = wt.sum(-2)
    inside = (torch.arange(cmax, device=dev)[None, :]
              < torch.as_tensor(block.widths, device=dev)[:, None])
    allowed = (counts > 0) & inside
    allowed = torch.where(allowed.any(-1, keepdim=True), allowed, inside.expand_as(allowed))
    logprior = torch.where(counts > 0, torch.log(counts / n.clamp_min(1)[..., None]),
                           torch.zeros_like(counts))
    S = train.shape[:-1]
    return wt, n, logprior.reshape(*S, H * cmax), allowed.reshape(*S, H * cmax)


def _logits(F, beta, b):
    """Z (Kf, P, m, G) = F (Kf, m, d) @ beta (Kf, P, d, G) + b (Kf, P, G), as one matmul
    per feature set (the P problems share it)."""
    Kf, P, d, G = beta.shape
    Z = (F @ beta.permute(0, 2, 1, 3).reshape(Kf, d, P * G)).view(Kf, -1, P, G)
    return Z.permute(0, 2, 1, 3) + b[:, :, None, :]


class _Cv(NamedTuple):
    """The configurations' cross-validation: the fold masks (B, K, m), the penalty grid,
    and the L-BFGS iterations of a fit."""

    folds: Any  # torch bool (B, K, m)
    Cs: tuple[float, ...]
    max_iter: int


def _lbfgs(F, block: _Block, train, C, max_iter: int, init=None, nb: int = 1, skip=None):
    """Fit independent problems of ``block``: features F (Kf, m, d) (``block`` holds the
    targets of each), training masks ``train`` (Kf, P, m), penalties ``C`` (Kf, P, H),
    optionally from ``init`` (weights, biases). The Kf * P problems form ``nb`` groups of
    consecutive ones, whole feature sets each (one group per configuration), and each
    group is one ``torch.optim.LBFGS`` problem (:func:`credanno.eval.lbfgs.batch_lbfgs`:
    all groups at once), as when each configuration was fitted alone; ``skip`` (nb,) bool:
    groups left at their start (``init``), not fitted. Returns weights
    (Kf, P, d, W), biases (Kf, P, W), allowed classes (Kf, P, W), in the real columns of
    the heads (``block.cols`` of the padded grid).

    Jacobi-preconditioned: each weight is optimised in units of ``1 / sqrt(h)``, ``h`` the
    diagonal of its problem's Hessian bound (``mean(f^2) / 4 + lambda``), so penalties from
    1e-4 to 10 converge in a similar number of L-BFGS steps."""
    import torch

    Kf, P, m = train.shape
    d, cols, H = F.shape[-1], torch.as_tensor(block.cols, device=F.device), len(block.widths)
    wt, n, logprior, allowed = _class_stats(block, train, F.dtype)
    n = n.clamp_min(1)
    stats = _fit_stats(F, block, train, 1.0 / (C * n), wt / n[..., None, :], allowed)
    scale = stats[4]  # (Kf, d, P, W)
    theta, b, allowed_r = torch.zeros_like(scale), logprior[..., cols], allowed[..., cols]
    if init is not None:
        theta = theta + init[0].permute(0, 2, 1, 3) / scale
        b = torch.where(allowed_r, init[1].expand_as(b), b)
    per = Kf // nb  # feature sets per group
    slots = torch.as_tensor(np.concatenate([np.arange(w) * H + h for h, w in
                                            enumerate(block.widths)]), device=F.device)

    def make_fg(idx):  # the groups idx only (None: all)
        if idx is None:
            return _objective(F, stats, slots, H, nb)
        k = (idx[:, None] * per + torch.arange(per, device=idx.device)).flatten()
        return _objective(F[k], [s[k] for s in stats], slots, H, len(idx))

    x0 = torch.cat([theta.reshape(Kf, -1), b.reshape(Kf, -1)], 1).view(nb, -1)
    x = batch_lbfgs(make_fg, x0, max_iter, skip=skip).view(Kf, -1)
    W = len(cols)
    beta = x[:, :d * P * W].view(Kf, d, P, W) * scale
    return beta.permute(0, 2, 1, 3).contiguous(), x[:, d * P * W:].reshape(Kf, P, W), allowed_r


def _fit_stats(F, block: _Block, train, lam, w, allowed):
    """What :func:`_objective` needs of problems with penalties ``lam`` (Kf, P, H) and row
    weights ``w`` (Kf, P, m, H), in its layout (rows, problems, columns): the row weights
    times the targets (Kf, m, P, W), the negative of it, the row weights times the
    targets' sum per head (Kf, m, P, W), the penalty per column (Kf, 1, P, W), the
    preconditioner (Kf, d, P, W) and the absent classes of the padded grid (Kf, 1, P, G),
    class-major (slot ``class * H + head``: the softmax then runs over a non-innermost
    axis, several times faster than over an innermost axis of a few classes)."""
    import torch

    cols = torch.as_tensor(block.cols, device=F.device)
    heads = torch.as_tensor(np.repeat(np.arange(len(block.widths)), block.widths),
                            device=F.device)  # each column's head
    lam = lam[:, None, :, heads]
    msq = torch.einsum("kpm,kmd->kdp", train.to(F.dtype), F ** 2) / train.sum(-1)[:, None]
    w = w.permute(0, 2, 1, 3)
    q = torch.as_tensor(block.Q, dtype=F.dtype, device=F.device)[:, :, None]  # (Kf, m, 1, H, c)
    wq = (w[..., None] * q).flatten(-2)[..., cols].contiguous()
    Kf, P, G = allowed.shape
    absent = ~allowed.view(Kf, 1, P, len(block.widths), -1).transpose(-1, -2).reshape(Kf, 1, P, G)
    stats = (wq, -wq, (w * q.sum(-1))[..., heads], lam, torch.rsqrt(0.25 * msq[..., None] + lam),
             absent)
    return tuple(s.contiguous() for s in stats)


def _objective(F, stats, slots, H: int, nb: int):
    """The loss and its gradient of the problems of :func:`_lbfgs` in ``nb`` groups, as a
    function of their parameters x (nb, N) (per group and feature set, its problems'
    preconditioned weights (d, P, W) then biases (P, W)): ``x -> (f (nb,), g (nb, N))``,
    f the sum of ``sum_i CE_i / n + lambda ||W||^2 / 2`` over the heads and the group's
    problems (scikit-learn's objective divided by the labelled rows); F (Kf, m, d) the
    features, ``stats`` from :func:`_fit_stats`, ``slots`` the grid slot of each column."""
    import torch

    wq, nwq, wsum, lam, scale, masked = stats
    (Kf, d, P, W), m, G = scale.shape, F.shape[1], masked.shape[-1]
    Ft = F.transpose(1, 2).contiguous()

    def fg(x):
        x = x.view(Kf, -1)
        beta = x[:, :d * P * W].view(Kf, d, P, W) * scale
        Z = torch.baddbmm(x[:, d * P * W:].reshape(Kf, 1, P * W), F, beta.view(Kf, d, -1))
        Z = Z.new_zeros(Kf, m, P, G).index_copy_(-1, slots, Z.view(Kf, m, P, W))
        Z = torch.log_softmax(Z.masked_fill_(masked, _NEG).view(Kf, m, P, -1, H), -2)
        logp = Z.view(Kf, m, P, G)[..., slots]
        # -sum_c q_c log p_c: F.cross_entropy with probability targets (one-hot: the
        # hard label's, exactly: the other terms are exact zeros); its gradient in Z is
        # w (p sum_c q_c - q)
        lb = lam * beta
        f = 0.5 * (lb * beta).sum((1, 3)) - (logp * wq).sum((1, 3))
        dZ = torch.addcmul(nwq, logp.exp_(), wsum)
        gt = torch.bmm(Ft, dZ.view(Kf, m, -1)).view(Kf, d, P, W).add_(lb).mul_(scale)
        g = torch.cat([gt.view(Kf, -1), dZ.sum(1).view(Kf, -1)], 1)
        return f.view(nb, -1).sum(1), g.view(nb, -1)

    return fg


def _cv_loss(F, fit, block: _Block, train) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out log loss (cross-entropy of the targets, soft or one-hot) summed per
    feature set, problem and head (Kf, P, H), the number of held-out labels, and the sum
    of the squared losses (for the standard error of their mean).
    Probabilities are mixed with 1% of a uniform guess, so a class absent from a fold's
    training part costs a bounded amount."""
    import torch

    beta, b, allowed = fit
    H, cmax = len(block.widths), block.cmax
    with torch.no_grad():
        Zr = _logits(F, beta, b).masked_fill(~allowed[:, :, None, :], -np.inf)
        Z = Zr.new_full((*Zr.shape[:3], H * cmax), -np.inf)
        Z[..., torch.as_tensor(block.cols, device=Z.device)] = Zr
        P = torch.softmax(Z.view(*Z.shape[:3], H, cmax), -1).cpu().numpy()
    P = 0.99 * P + 0.01 / np.asarray(block.widths)[:, None]
    ce = -(block.Q[:, None] * np.log(P)).sum(-1)  # soft targets' cross-entropy (one-hot: -log p_y)
    val = ~train.cpu().numpy()[..., None] & block.valid[:, None]  # (Kf, P, m, H)
    ce = np.where(val, ce, 0)
    return ce.sum(2), val.sum(2), (ce ** 2).sum(2)


def decide(proba: np.ndarray, tol: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """The class the paper's metric most likely scores correct: ``argmax_c P(|y - c| <=
    tol)`` over the last axis (``tol = 0``: the most probable class), among ``allowed``.

    With +/-1 tolerance the most probable rating is not the best guess: for a flat
    posterior a middle rating is right three times as often as an extreme one. This is
    what keeps the tuned probe at or above the best constant prediction.
    """
    score = np.asarray(proba, dtype=np.float64)
    if tol > 0:
        C = score.shape[-1]
        cs = np.concatenate([np.zeros((*score.shape[:-1], 1)), np.cumsum(score, -1)], -1)
        hi = np.minimum(np.arange(C) + tol + 1, C)
        lo = np.maximum(np.arange(C) - tol, 0)
        score = cs[..., hi] - cs[..., lo]
    if allowed is not None:
        score = np.where(allowed, score, -np.inf)
    return score.argmax(-1)


def _pick(fits: list, choice: np.ndarray, B: int, K: int, widths: list[int]):
    """Each fold's weights (B, K, d, W) and biases (B, K, W) at its configuration's
    chosen penalty per head (``choice`` (B, H), an index into ``fits``)."""
    import torch

    W = fits[0][0].shape[-1]
    beta = torch.stack([f[0].reshape(B, K, -1, W) for f in fits], -1)  # (B, K, d, W, J)
    b = torch.stack([f[1].reshape(B, K, W) for f in fits], -1)
    cg = torch.as_tensor(np.repeat(choice, widths, axis=1), device=beta.device)  # (B, W)
    d = beta.shape[2]
    beta = beta.gather(-1, cg[:, None, None, :, None].expand(B, K, d, W, 1))[..., 0]
    b = b.gather(-1, cg[:, None, :, None].expand(B, K, W, 1))[..., 0]
    return beta, b


def _cv_path(Fk, block: _Block, cv: _Cv):
    """Every penalty of the grid on every fold of every configuration, from the strongest
    (each warm-started from the previous); features Fk (Kf, m, d), Kf = B (one set per
    configuration, shared by its folds) or B * K (one set per fold), ``block`` their
    targets. Returns the chosen C per configuration and head (B, H) by the one-standard-
    error rule on the held-out log loss (far less noisy than held-out accuracy on a few
    labelled rows); and each fold's weights (B, K, d, W) and biases (B, K, W) at its
    head's chosen C. A configuration's path stops early once every head is past its
    optimum (:func:`past_optimum`): the weak penalties, the slowest fits, are then never
    the choice."""
    import torch

    H, (B, K, m), Kf = len(block.widths), cv.folds.shape, Fk.shape[0]
    train = cv.folds.reshape(Kf, B * K // Kf, m)
    fits, means, ses, prev = [], [], [], None
    done = np.zeros(B, bool)
    for c in cv.Cs:
        C = torch.full((*train.shape[:2], H), c, dtype=Fk.dtype, device=Fk.device)
        skip = torch.as_tensor(done, device=Fk.device) if done.any() else None
        fit = _lbfgs(Fk, block, train, C, cv.max_iter, prev, B, skip)
        loss, count, sq = (v.reshape(B, -1, H).sum(1) for v in _cv_loss(Fk, fit, block, train))
        count = np.maximum(count, 1)
        fits.append(fit)
        means.append(np.where(done[:, None], np.inf, loss / count))
        ses.append(np.where(done[:, None], 0.0, np.sqrt(
            np.maximum(sq / count - (loss / count) ** 2, 0) / count)))
        prev = fit[:2]
        done |= past_optimum(np.stack(means), np.stack(ses))
    choice = one_se_choice(np.stack(means), np.stack(ses))
    return (np.asarray(cv.Cs)[choice], *_pick(fits, choice, B, K, block.widths))


def past_optimum(means: np.ndarray, ses: np.ndarray) -> np.ndarray:
    """Per configuration (axis 1 of ``means`` (J, B, H), penalties strongest first, J so
    far), whether the weaker penalties still to come would not change its choice, by the
    early path stops of glmnet (Friedman, Hastie and Tibshirani 2010, section 2.5: stop
    when the fit no longer changes): every head's held-out loss either rose at each of
    the last two steps and now lies above the one-standard-error limit (overfitting only
    grows as the penalty weakens), or changed by less than a tenth of its standard error
    over them (a flat path: e.g. a head with nearly one class)."""
    if len(means) < 3:
        return np.zeros(means.shape[1], bool)
    best = np.argmin(means, axis=0)
    at = np.take_along_axis
    se_best = at(ses, best[None], 0)[0]
    limit = at(means, best[None], 0)[0] + se_best
    with np.errstate(invalid="ignore"):  # inf - inf: a configuration already stopped
        rising = (means[-1] > means[-2]) & (means[-2] > means[-3]) & (means[-1] > limit)
        flat = np.abs(means[-1] - means[-3]) < 0.1 * se_best
    return (rising | flat).all(axis=1)


def one_se_choice(means: np.ndarray, ses: np.ndarray) -> np.ndarray:
    """Index along axis 0 (penalties, strongest first) of the strongest penalty whose mean
    held-out loss is within one standard error of the smallest (Hastie, Tibshirani and
    Friedman, *Elements of Statistical Learning*, section 7.10: the "one-standard-error
    rule"). With 19 labelled images the losses of neighbouring penalties differ by less
    than their noise, and the plain minimum then picks a weak penalty by chance: heads fitted
    to a few minority ratings fall below the constant guess (calcification at 1% on the
    phantom, 8 points below). The rule prefers the simpler model the data cannot reject;
    with many labelled rows the standard error is small and it picks the minimum."""
    best = np.argmin(means, axis=0)
    at = np.take_along_axis
    limit = at(means, best[None], 0)[0] + at(ses, best[None], 0)[0]
    return np.argmax(means <= limit[None], axis=0)  # first (strongest) within the limit


def _fit_block(F, Fk, block: _Block, cv: _Cv | None, max_iter: int):
    """Heads of ``block`` on features F (B, m, d) of every configuration's labelled rows:
    the penalty per head by CV (on Fk (B * Kf, m, d), the features shared by the folds
    (Kf = 1) or per fold), then the final fit (from the folds' mean). Returns the final
    (B, d, W) weights, (B, W) biases, (B, W) allowed classes, per fold the chosen
    penalty's weights (B, K, d, W) and biases (B, K, W) (None without CV), and the chosen
    penalties (B, H)."""
    import torch

    (B, m), H = F.shape[:2], len(block.widths)
    init = per_fold = None
    if cv is None:  # too few rows to cross-validate
        Cb = np.full((B, H), cv_default())
    else:
        rep = Fk.shape[0] // B
        Cb, beta_k, b_k = _cv_path(Fk, block.repeat(rep) if rep > 1 else block, cv)
        init = beta_k.mean(1, keepdim=True), b_k.mean(1, keepdim=True)
        per_fold = beta_k, b_k
    C = torch.as_tensor(Cb, dtype=F.dtype, device=F.device)[:, None]
    train = torch.ones(B, 1, m, dtype=torch.bool, device=F.device)
    beta, b, allowed = _lbfgs(F, block, train, C, max_iter, init, B)
    return beta[:, 0], b[:, 0], allowed[:, 0], per_fold, Cb


def cv_default() -> float:
    """The penalty used when the labelled rows are too few to cross-validate."""
    return 1e-2


def _basis(Xc, d: int):
    """The rows in an orthonormal basis of their span: ``Xc = F @ V.T``, F (m, d), V (D, d)
    (an exact reduction: an L2-penalised linear model's optimal weights lie in that span),
    zero-padded to ``d`` columns where the rank is lower (a zero feature's weight stays
    exactly zero under an L2 penalty)."""
    import torch

    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    keep = S > S[0].clamp_min(1e-30) * 1e-6
    V = Vh[keep].T
    V = torch.cat([V, V.new_zeros(V.shape[0], d - V.shape[1])], 1)
    return Xc @ V, V


class TunedHeads(NamedTuple):
    """One configuration's tuned heads in the layout's columns (torch): ``W_x`` (D, W),
    ``b`` (W,), ``W_z`` (A, C_cls) or None, ``allowed`` (W,) the classes present in its
    labelled rows, and ``C`` (H,) the chosen penalty of each head (``layout.order``)."""

    W_x: Any
    b: Any
    W_z: Any
    allowed: Any
    C: np.ndarray


def fit_tuned_config(Xc, Y: np.ndarray, layout, groups: np.ndarray | None,
                     Cs: tuple[float, ...] = TUNED_CS, folds: int = CV_FOLDS,
                     max_iter: int = MAX_ITER, soft: np.ndarray | None = None) -> TunedHeads:
    """The tuned heads of one labelled subset: ``Xc`` (m, D) its standardised features
    (torch), ``Y`` (m, L) its labels, ``groups`` its rows' nodules (or None), ``soft``
    (m, W) optional soft targets in the layout's columns (a label's all-NaN row: its hard
    label; see :meth:`credanno.eval.probe.HeadLayout.to_columns`). Returns its
    :class:`TunedHeads`. Deterministic in its rows: the same subset gives the same heads,
    whatever the seed."""
    return fit_tuned_configs([Xc], [Y], layout, [groups], Cs, folds, max_iter, [soft])[0]


def _cv_setup(Ys: list, softs: list, layout, groups_list: list, folds: int, dev):
    """The CV folds (B, K, m) of configurations with m rows each (each its own, from its
    labels and nodules), or None when m is too small to cross-validate."""
    import torch

    cls = layout.order[-1]
    m = len(Ys[0])
    masks = np.stack([_folds(_strat_labels(Y, q, layout, cls), g, min(folds, m), 0)[1:]
                      for Y, q, g in zip(Ys, softs, groups_list, strict=True)])
    if m > HOLDOUT_ROWS:  # many rows: one held-out fold scores the penalty well enough
        masks = masks[:, :1]
    return torch.as_tensor(masks, device=dev) if masks.shape[1] else None


#: at most this many feature values (configurations x folds x rows x basis) in one batch
BATCH_ELEMENTS = 1 << 26


def fit_tuned_configs(X_list: list, Y_list: list, layout, groups_list: list | None = None,
                      Cs: tuple[float, ...] = TUNED_CS, folds: int = CV_FOLDS,
                      max_iter: int = MAX_ITER,
                      soft_list: list | None = None) -> list[TunedHeads]:
    """:func:`fit_tuned_config` of several configurations with the same number of
    labelled rows m, each with the heads it would get alone, at once: their bases padded
    to ``min(m, D)`` columns, their problems stacked so that one batched L-BFGS run
    (:func:`credanno.eval.lbfgs.batch_lbfgs`, every configuration its own L-BFGS) fits
    every configuration's folds at one penalty, and one their final fits (in batches of
    at most :data:`BATCH_ELEMENTS` feature values). ``X_list``: (m, D) torch features
    (one dtype and device); ``Y_list``, ``groups_list``, ``soft_list``: per configuration
    as in :func:`fit_tuned_config`."""
    B = len(X_list)
    groups_list = [None] * B if groups_list is None else list(groups_list)
    soft_list = [None] * B if soft_list is None else list(soft_list)
    m, D = X_list[0].shape
    if any(X.shape != (m, D) for X in X_list):
        raise CredannoError("fit_tuned_configs needs configurations with the same rows count")
    per = max(1, BATCH_ELEMENTS // (max(folds, 1) * m * min(m, D)))
    out: list[TunedHeads] = []
    for s in range(0, B, per):
        part = slice(s, s + per)
        out += _fit_batch(X_list[part], Y_list[part], layout, groups_list[part],
                          soft_list[part], tuple(Cs), folds, max_iter)
    return out


def _fit_batch(X_list: list, Y_list: list, layout, groups_list: list, soft_list: list,
               Cs: tuple[float, ...], folds: int, max_iter: int) -> list[TunedHeads]:
    """:func:`fit_tuned_configs` of one batch."""
    import torch

    B, (m, D) = len(X_list), X_list[0].shape
    F, V = map(torch.stack, zip(*(_basis(X, min(m, D)) for X in X_list), strict=True))
    masks = _cv_setup(Y_list, soft_list, layout, groups_list, folds, F.device)
    cv = None if masks is None else _Cv(masks, Cs, min(max_iter, CV_MAX_ITER))
    heads = list(layout.order)
    exp_heads = heads[:-1] if layout.cls is not None else heads
    block = _block(Y_list, soft_list, layout, exp_heads)
    Wx, bx, allowed, per_fold, Cb = _fit_block(F, F, block, cv, max_iter)
    Wz = [None] * B
    if layout.cls is not None:
        Wx, bx, allowed, Wz, C2 = _fit_cls(F, (Wx, bx, allowed, per_fold), cv, max_iter,
                                           _block(Y_list, soft_list, layout, [layout.cls]))
        Cb = np.concatenate([Cb, C2], 1)
    return [TunedHeads(V[i] @ Wx[i], bx[i], Wz[i], allowed[i], Cb[i]) for i in range(B)]


def quench_tuned(Xc, Y: np.ndarray, layout, prev: TunedHeads, soft: np.ndarray | None = None,
                 max_iter: int = QUENCH_ITER) -> TunedHeads:
    """cRedAnno+'s *training quenching* (Lu et al., ISBI 2023, section 2.3: each active
    round retrains the heads briefly from their previous weights) for the tuned recipe:
    the heads ``prev`` refitted on new rows (e.g. more true labels and pseudo-labels) at
    ``prev``'s penalties, without cross-validation (which on pseudo-labels would reward a
    model for reproducing its own guesses), from ``prev``'s weights, for at most
    ``max_iter`` L-BFGS iterations. ``Xc`` (m, D) the rows' features, scaled as ``prev``'s
    were; ``Y``, ``soft`` as in :func:`fit_tuned_config`."""
    import torch

    m, D = Xc.shape
    F, V = _basis(Xc, min(m, D))
    F, dt, dev = F[None], F.dtype, F.device
    exp_heads = list(layout.order)[:-1] if layout.cls is not None else list(layout.order)
    ne = layout.n_exp if layout.cls is not None else layout.width
    W, b = prev.W_x.to(dt), prev.b.to(dt)
    train = torch.ones(1, 1, m, dtype=torch.bool, device=dev)

    def fit(Fx, heads, init, C):
        Ct = torch.as_tensor(C, dtype=dt, device=dev)[None, None]
        w, bias, al = _lbfgs(Fx, _block([Y], [soft], layout, heads), train, Ct, max_iter,
                             (init[0][None, None], init[1][None, None]), 1)
        return w[:, 0], bias[:, 0], al[:, 0]

    Wx, bx, allowed = fit(F, exp_heads, (V.T @ W[:, :ne], b[:ne]), prev.C[:len(exp_heads)])
    Wz = None
    if layout.cls is not None:
        F2 = torch.cat([F, F @ Wx + bx[:, None]], -1)
        init = (torch.cat([V.T @ W[:, ne:], prev.W_z.to(dt)]), b[ne:])
        W2, b2, al2 = fit(F2, [layout.cls], init, prev.C[-1:])
        d = F.shape[-1]
        Wx, bx = torch.cat([Wx, W2[:, :d]], -1), torch.cat([bx, b2], -1)
        allowed, Wz = torch.cat([allowed, al2], -1), W2[0, d:]
    return TunedHeads(V @ Wx[0], bx[0], Wz, allowed[0], np.array(prev.C, copy=True))


def _fit_cls(F, exp, cv: _Cv | None, max_iter: int, block: _Block):
    """G_cls on ``f (+) z_exp`` of every configuration (F (B, m, d)), the attribute heads
    ``exp`` (weights, biases, allowed, per fold) fixed; each CV fold's G_cls sees the
    ``z_exp`` of the heads fitted on its training part only. Returns the joined weights
    (B, d, W), biases, allowed classes, W_z (B, A, C_cls) and G_cls's penalties (B, 1)."""
    import torch

    Wx, bx, allowed, per_fold = exp
    (B, m, d), Fk = F.shape, None
    if cv is not None:
        K = cv.folds.shape[1]
        zk = torch.matmul(F[:, None], per_fold[0]) + per_fold[1][:, :, None, :]
        Fk = torch.cat([F[:, None].expand(B, K, m, d), zk], -1).reshape(B * K, m, -1)
    F2 = torch.cat([F, F @ Wx + bx[:, None]], -1)
    W2, b2, al2, _, C2 = _fit_block(F2, Fk, block, cv, max_iter)
    return (torch.cat([Wx, W2[:, :d]], -1), torch.cat([bx, b2], -1),
            torch.cat([allowed, al2], -1), W2[:, d:], C2)
