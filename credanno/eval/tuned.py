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
  the held-out log loss, ties to the stronger penalty (whose limit is the prior);
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
the folds of one configuration are one batched problem for ``torch.optim.LBFGS`` (the
problems are independent, so the sum's optimum is every problem's optimum), Jacobi-
preconditioned, along the penalty grid from the strongest, each warm-started from the
previous.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from credanno.errors import CredannoError

#: scikit-learn's C per head; the smallest is close to the constant prior guess
TUNED_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
CV_FOLDS = 5
MAX_ITER = 200
#: above this many labelled rows the penalty is scored on one held-out fold (1/cv_folds
#: of the rows), not on all folds: k times cheaper, and >= 200 held-out rows suffice
HOLDOUT_ROWS = 1000
_NEG = -1e9  # masked logit while fitting (finite: no inf * 0 in the gradient)


class TunedFit(NamedTuple):
    """One configuration's fitted heads in the reduced basis (torch tensors):
    ``beta`` (d, W_grid) weights, ``b`` (W_grid,) biases, ``allowed`` (W_grid,) classes
    present in the labelled rows, ``C`` the chosen penalty per head."""

    beta: Any
    b: Any
    allowed: Any
    C: np.ndarray


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
    """Heads fitted together: each row's target distribution per head ``Q`` (m, H, cmax)
    (one-hot for a hard label, the given probabilities for a soft one, zero where the row
    has neither), ``valid`` (m, H) where it has one, and each head's number of classes."""

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


def _block(Y: np.ndarray, soft: np.ndarray | None, layout, heads: list[int]) -> _Block:
    """The targets of labels ``heads``: the soft row where ``soft`` has one (the layout's
    columns), else the hard label of ``Y`` (-1: none)."""
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
    return _Block(Q, valid, widths)


def _strat_labels(Y: np.ndarray, soft: np.ndarray | None, layout, i: int) -> np.ndarray:
    """What the CV folds stratify on: label ``i``'s hard label, else its soft target's
    most probable class, else -1."""
    y = np.asarray(Y[:, i], dtype=np.int64).copy()
    q, has = _soft_part(soft, layout, i, len(y))
    fill = has & (y < 0)
    y[fill] = q[fill].argmax(axis=1)
    return y


def _class_stats(block: _Block, train, dtype):
    """Per problem (any leading shape S) and head: row weights (*S, m, H), labelled counts
    (*S, H), log priors (*S, G) and allowed classes (*S, G) of its training rows,
    G = H * cmax; class counts sum the target probabilities (one-hot for hard labels)."""
    import torch

    dev = train.device
    H, cmax = len(block.widths), block.cmax
    valid = torch.as_tensor(block.valid, device=dev).to(dtype)
    wt = train.to(dtype)[..., None] * valid
    Q = torch.as_tensor(block.Q, dtype=dtype, device=dev)  # soft mass counts as present
    counts = torch.einsum("...mh,mhc->...hc", wt, Q)
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
    """One configuration's cross-validation: the fold masks (K, m) and the penalty grid."""

    folds: Any  # torch bool (K, m)
    Cs: tuple[float, ...]


def _lbfgs(F, block: _Block, train, C, max_iter: int, init=None):
    """Fit independent problems of ``block``: features F (Kf, m, d), training masks
    ``train`` (Kf, P, m), penalties ``C`` (Kf, P, H), optionally from ``init`` (weights,
    biases). Returns weights (Kf, P, d, G), biases (Kf, P, G), allowed classes (Kf, P, G).

    Jacobi-preconditioned: each weight is optimised in units of ``1 / sqrt(h)``, ``h`` the
    diagonal of its problem's Hessian bound (``mean(f^2) / 4 + lambda``), so penalties from
    1e-4 to 10 converge in a similar number of L-BFGS steps."""
    import torch

    Kf, P, m = train.shape
    d, H, cmax = F.shape[-1], len(block.widths), block.cmax
    wt, n, logprior, allowed = _class_stats(block, train, F.dtype)
    lam = (1.0 / (C * n.clamp_min(1)))[..., None].expand(Kf, P, H, cmax).reshape(Kf, P, 1, -1)
    msq = torch.einsum("kpm,kmd->kpd", train.to(F.dtype), F ** 2) / train.sum(-1, keepdim=True)
    scale = torch.rsqrt(0.25 * msq[..., None] + lam)  # (Kf, P, d, G)
    theta = torch.zeros(Kf, P, d, H * cmax, dtype=F.dtype, device=F.device)
    b = logprior.clone()
    if init is not None:
        theta = theta + init[0] / scale
        b = torch.where(allowed, init[1].expand_as(b), b)
    theta, b = theta.requires_grad_(), b.requires_grad_()
    q = torch.as_tensor(block.Q, dtype=F.dtype, device=F.device)  # (m, H, cmax)
    w = wt / n.clamp_min(1)[..., None, :]  # (Kf, P, m, H): mean CE per head
    opt = torch.optim.LBFGS([theta, b], lr=1, max_iter=max_iter, history_size=10,
                            tolerance_grad=1e-5, tolerance_change=1e-8,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        beta = theta * scale
        Z = _logits(F, beta, b).masked_fill(~allowed[:, :, None, :], _NEG)
        logp = torch.log_softmax(Z.view(Kf, P, m, H, cmax), -1)
        # -sum_c q_c log p_c: F.cross_entropy with probability targets (one-hot: the
        # hard label's, exactly: the other terms are exact zeros)
        logp = (logp * q).sum(-1)
        loss = -(logp * w).sum() + 0.5 * (lam * beta ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (theta * scale).detach(), b.detach(), allowed


def _cv_loss(F, fit, block: _Block, train) -> tuple[np.ndarray, np.ndarray]:
    """Held-out log loss (cross-entropy of the targets, soft or one-hot) summed per head
    (H,) over the folds, and the number of held-out labels. Probabilities are mixed with
    1% of a uniform guess, so a class absent from a fold's training part costs a bounded
    amount."""
    import torch

    beta, b, allowed = fit
    H, cmax = len(block.widths), block.cmax
    with torch.no_grad():
        Z = _logits(F, beta, b).masked_fill(~allowed[:, :, None, :], -np.inf)
        P = torch.softmax(Z.view(*Z.shape[:3], H, cmax), -1).cpu().numpy()
    P = 0.99 * P + 0.01 / np.asarray(block.widths)[:, None]
    ce = -(block.Q * np.log(P)).sum(-1)  # soft targets' cross-entropy (one-hot: -log p_y)
    val = ~train.cpu().numpy()[..., None] & block.valid  # (Kf, P, m, H)
    return np.where(val, ce, 0).sum((0, 1, 2)), val.sum((0, 1, 2))


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


def _cv_path(Fk, block: _Block, folds, Cs: tuple[float, ...], max_iter: int):
    """Every penalty of the grid on every fold, from the strongest (each warm-started
    from the previous); features Fk (Kf, m, d), Kf = 1 (shared) or one set per fold.
    Returns the chosen C per head (H,): the smallest held-out log loss (far less noisy
    than held-out accuracy on a few labelled rows, which picks weak penalties by chance),
    ties to the stronger penalty; and each fold's weights (K, d, G) and biases (K, G) at
    its head's chosen C."""
    import torch

    H, (K, m), Kf = len(block.widths), folds.shape, Fk.shape[0]
    train = folds.reshape(Kf, K // Kf, m)
    fits, losses, prev = [], [], None
    for c in Cs:
        C = torch.full((Kf, K // Kf, H), c, dtype=Fk.dtype, device=Fk.device)
        fit = _lbfgs(Fk, block, train, C, max_iter, prev)
        loss, count = _cv_loss(Fk, fit, block, train)
        fits.append(fit)
        losses.append(loss / np.maximum(count, 1))
        prev = fit[:2]
    choice = np.argmin(np.stack(losses), axis=0)  # first minimum: the stronger penalty
    cg = torch.as_tensor(np.repeat(choice, block.cmax), device=Fk.device)
    G = fits[0][0].shape[-1]
    beta = torch.stack([f[0].reshape(K, -1, G) for f in fits])  # (J, K, d, G)
    b = torch.stack([f[1].reshape(K, G) for f in fits])
    idx = torch.arange(G, device=Fk.device)
    return (np.asarray(Cs)[choice], beta[cg, :, :, idx].permute(1, 2, 0),
            b[cg, :, idx].permute(1, 0))


def _fit_block(F, Fk, block: _Block, cv: _Cv | None, max_iter: int):
    """Heads of ``block`` on features F (m, d) of all labelled rows: the penalty per head
    by CV (on Fk (Kf, m, d), the features per fold), then the final fit (from the folds'
    mean). Returns the final (d, W) weights, (W,) biases, (W,) allowed classes, and per
    fold the chosen penalty's weights (K, d, W) and biases (K, W) (None without CV)."""
    import torch

    H, m = len(block.widths), F.shape[0]
    dtype, dev = F.dtype, F.device
    init = per_fold = None
    if cv is None:  # too few rows to cross-validate
        Cb = np.full(H, cv_default())
    else:
        Cb, beta_k, b_k = _cv_path(Fk, block, cv.folds, cv.Cs, max_iter)
        init = beta_k.mean(0), b_k.mean(0)
        per_fold = beta_k[..., block.cols], b_k[..., block.cols]
    C = torch.as_tensor(Cb, dtype=dtype, device=dev)[None, None]
    beta, b, allowed = _lbfgs(F[None], block, torch.ones(1, 1, m, dtype=torch.bool,
                                                         device=dev), C, max_iter, init)
    cols = block.cols
    return beta[0, 0][:, cols], b[0, 0][cols], allowed[0, 0][cols], per_fold


def cv_default() -> float:
    """The penalty used when the labelled rows are too few to cross-validate."""
    return 1e-2


def _basis(Xc):
    """The rows in an orthonormal basis of their span: ``Xc = F @ V.T``, F (m, r), V (D, r)
    (an exact reduction: an L2-penalised linear model's optimal weights lie in that span)."""
    import torch

    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    keep = S > S[0].clamp_min(1e-30) * 1e-6
    V = Vh[keep].T.contiguous()
    return Xc @ V, V


def fit_tuned_config(Xc, Y: np.ndarray, layout, groups: np.ndarray | None,
                     Cs: tuple[float, ...] = TUNED_CS, folds: int = CV_FOLDS,
                     max_iter: int = MAX_ITER, soft: np.ndarray | None = None):
    """The tuned heads of one labelled subset: ``Xc`` (m, D) its standardised features
    (torch), ``Y`` (m, L) its labels, ``groups`` its rows' nodules (or None), ``soft``
    (m, W) optional soft targets in the layout's columns (a label's all-NaN row: its hard
    label; see :meth:`credanno.eval.probe.HeadLayout.to_columns`). Returns
    ``(W_x (D, W), b (W,), W_z (A, C_cls) or None, allowed (W,))`` in the layout's columns.
    Deterministic in its rows: the same subset gives the same heads, whatever the seed."""
    import torch

    m = Xc.shape[0]
    F, V = _basis(Xc)
    heads = list(layout.order)
    exp_heads = heads[:-1] if layout.cls is not None else heads
    masks = _folds(_strat_labels(Y, soft, layout, heads[-1]), groups, min(folds, m), 0)[1:]
    if m > HOLDOUT_ROWS:  # many rows: one held-out fold scores the penalty well enough
        masks = masks[:1]
    cv = _Cv(torch.as_tensor(masks, device=F.device), tuple(Cs)) if len(masks) else None
    block = _block(Y, soft, layout, exp_heads)
    Wx, bx, allowed, per_fold = _fit_block(F, F[None], block, cv, max_iter)
    Wz = None
    if layout.cls is not None:
        d = F.shape[1]
        Fk = None
        if cv is not None:  # each fold's G_cls sees z_exp of heads fitted on its part only
            Fk = torch.cat([F.expand(len(masks), *F.shape),
                            torch.matmul(F, per_fold[0]) + per_fold[1][:, None, :]], -1)
        blk2 = _block(Y, soft, layout, [layout.cls])
        F2 = torch.cat([F, F @ Wx + bx], -1)
        W2, b2, al2, _ = _fit_block(F2, Fk, blk2, cv, max_iter)
        Wx, bx = torch.cat([Wx, W2[:d]], -1), torch.cat([bx, b2])
        allowed, Wz = torch.cat([allowed, al2]), W2[d:]
    return V @ Wx, bx, Wz, allowed
