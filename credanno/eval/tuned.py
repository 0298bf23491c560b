"""The tuned recipe of the linear predictors G_exp and G_cls (Eq. 3): never worse than a
constant guess.

The paper's recipe (plain SGD, lr 2.5e-4, 100 epochs, N(0, 0.01) weights, zero biases)
leaves the heads near their random start when only 1% of the images are labelled: ~100
steps of a tiny rate. Here each configuration's heads are instead fitted to convergence:

- the multinomial logistic loss of every head (``F.cross_entropy`` semantics, -1 labels
  ignored) plus an L2 penalty, in scikit-learn's parametrisation: head h minimises
  ``sum_i CE_i + ||W_h||^2 / (2 C)`` over its labelled rows (biases unpenalised);
- biases start at the labelled rows' log class priors;
- ``C`` is chosen per head from a grid by k-fold cross-validation **inside the labelled
  subset** (folds stratified on the G_cls label, whole nodules when the nodules are known;
  the test split is never seen), scored with the paper's metric (+/-1 for attributes,
  exact for malignancy); ties go to the stronger penalty, whose limit is the constant
  prior guess;
- G_cls (Eq. 3) is fitted on ``f (+) z_exp`` after the attribute heads, with ``z_exp``
  held fixed: G_cls's gradient does not reach the attribute heads, so each attribute head
  is trained on its own loss (what the authors' code effectively does). Its CV folds use
  the ``z_exp`` of attribute heads fitted on that fold's training part only;
- classes absent from the labelled subset get no weights and are never predicted
  (their logits are masked to -inf).

Speed: the optimum of an L2-penalised linear model lies in the row space of its training
features, so a subset of m < D rows is solved in an m-dimensional basis (from one SVD);
all folds x penalties of one configuration are one batched problem for
``torch.optim.LBFGS`` (the problems are independent, so the sum's optimum is every
problem's optimum).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from credanno.labels import LABEL_NAMES, label_spec

#: scikit-learn's C per head; the smallest is close to the constant prior guess
TUNED_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
CV_FOLDS = 5
MAX_ITER = 300
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
    if groups is not None and len(np.unique(groups)) >= k:
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
    """Heads fitted together: labels (m, H), class counts, and a penalty grid."""

    Y: np.ndarray
    widths: list[int]
    Cs: tuple[float, ...]

    @property
    def cmax(self) -> int:
        return max(self.widths)


def _class_stats(block: _Block, train, dev, dtype):
    """Per fold and head: row weights (K1, m, H), labelled counts (K1, H), log priors and
    allowed classes (K1, H, cmax) of the fold's training rows."""
    import torch

    Y = torch.as_tensor(block.Y, device=dev)
    H, cmax = len(block.widths), block.cmax
    valid = (Y >= 0).to(dtype)
    wt = torch.as_tensor(train, device=dev).to(dtype)[:, :, None] * valid[None]
    onehot = torch.nn.functional.one_hot(Y.clamp_min(0), cmax).to(dtype) * valid[..., None]
    counts = torch.einsum("kmh,mhc->khc", wt, onehot)
    n = wt.sum(1)
    inside = torch.arange(cmax, device=dev)[None, :] < torch.as_tensor(block.widths,
                                                                        device=dev)[:, None]
    allowed = (counts > 0) & inside
    allowed = torch.where(allowed.any(-1, keepdim=True), allowed, inside.expand_as(allowed))
    logprior = torch.where(allowed & (counts > 0),
                           torch.log(counts.clamp_min(1e-12) / n.clamp_min(1)[..., None]),
                           torch.zeros_like(counts))
    return wt, n, logprior, allowed.reshape(len(train), H * cmax)


def _lbfgs(F, block: _Block, train, max_iter: int):
    """Fit every (fold, penalty) problem of ``block`` on features F (K1, m, d): returns
    beta (K1, J, d, G), b (K1, J, G) and the allowed classes (K1, G), G = H * cmax."""
    import torch

    dev, dtype = F.device, F.dtype
    K1, m, d = F.shape
    H, cmax, J = len(block.widths), block.cmax, len(block.Cs)
    wt, n, logprior, allowed = _class_stats(block, train, dev, dtype)
    Cs = torch.as_tensor(block.Cs, device=dev, dtype=dtype)
    # penalty per (fold, C, column): 1 / (C n_h), so the mean CE is sklearn's C-scaled sum
    lam = (1.0 / (Cs[None, :, None] * n.clamp_min(1)[:, None, :]))
    lam = lam[..., None].expand(K1, J, H, cmax).reshape(K1, J, 1, H * cmax)
    beta = torch.zeros(K1, J, d, H * cmax, device=dev, dtype=dtype, requires_grad=True)
    b = logprior.reshape(K1, 1, H * cmax).repeat(1, J, 1).requires_grad_()
    y = torch.as_tensor(block.Y, device=dev).clamp_min(0)[None, None, :, :, None]
    w = (wt / n.clamp_min(1)[:, None, :])[:, None]  # (K1, 1, m, H)
    mask = allowed[:, None, None, :]
    opt = torch.optim.LBFGS([beta, b], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        Z = torch.matmul(F[:, None], beta) + b[:, :, None, :]
        Z = Z.masked_fill(~mask, _NEG).view(K1, J, m, H, cmax)
        logp = torch.log_softmax(Z, -1).gather(-1, y.expand(K1, J, m, H, 1))[..., 0]
        loss = -(logp * w).sum() + 0.5 * (lam * beta ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return beta.detach(), b.detach(), allowed


def _cv_choice(F, beta, b, allowed, block: _Block, train, tol: np.ndarray) -> np.ndarray:
    """Index of the chosen penalty per head: the best pooled CV accuracy (with each head's
    tolerance) over folds 1..K; ties go to the stronger penalty (smaller C)."""
    import torch

    K1, J = beta.shape[:2]
    H, cmax = len(block.widths), block.cmax
    if K1 < 2:
        return np.full(H, J // 2 if J > 2 else 0)  # no CV possible: a middle penalty
    Z = torch.matmul(F[1:, None], beta[1:]) + b[1:, :, None, :]
    Z = Z.masked_fill(~allowed[1:, None, None, :], -np.inf).view(K1 - 1, J, -1, H, cmax)
    pred = Z.argmax(-1).cpu().numpy()  # (K, J, m, H)
    Y = block.Y[None, None]
    val = (~train[1:])[:, None, :, None] & (Y >= 0)
    ok = (np.abs(pred - Y) <= tol[None, None, None, :]) & val
    acc = ok.sum((0, 2)) / np.maximum(val.sum((0, 2)), 1)  # (J, H)
    return np.argmax(acc, axis=0)  # first maximum: Cs ascend, so the stronger penalty


def _select(beta, b, choice: np.ndarray, block: _Block):
    """Per fold, each head's columns from its chosen penalty: (K1, d, G), (K1, G)."""
    cols = np.repeat(choice, block.cmax)
    idx = np.arange(len(cols))
    return beta[:, cols, :, idx].permute(1, 2, 0), b[:, cols, idx]


def _grid_columns(widths: list[int], cmax: int) -> np.ndarray:
    """Grid slot (head * cmax + class) of every real column, heads in order."""
    return np.concatenate([h * cmax + np.arange(w) for h, w in enumerate(widths)])


def _fit_block(F, block: _Block, train: np.ndarray, tol: np.ndarray, max_iter: int):
    """One block of heads on features F (K1, m, d): per fold, the chosen penalty's weights
    (K1, d, W) and biases (K1, W) over the real columns, allowed classes (W,) of fold 0
    (all labelled rows) and the chosen C per head."""
    beta, b, allowed = _lbfgs(F, block, train, max_iter)
    choice = _cv_choice(F, beta, b, allowed, block, train, tol)
    Bsel, bsel = _select(beta, b, choice, block)
    cols = _grid_columns(block.widths, block.cmax)
    return Bsel[..., cols], bsel[..., cols], allowed[0, cols], np.asarray(block.Cs)[choice]


def _basis(Xc):
    """Orthonormal basis (D, r) of the rows' span, or None when it is no smaller than D."""
    import torch

    m, D = Xc.shape
    if m >= D:
        return None
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    keep = S > S[0].clamp_min(1e-30) * 1e-6
    return Vh[keep].T.contiguous()


def _tolerances(layout, heads: list[int]) -> np.ndarray:
    return np.array([label_spec(layout.names[i]).tolerance
                     if layout.names[i] in LABEL_NAMES else 0 for i in heads])


def fit_tuned_config(Xc, Y: np.ndarray, layout, groups: np.ndarray | None, seed: int,
                     Cs: tuple[float, ...] = TUNED_CS, folds: int = CV_FOLDS,
                     max_iter: int = MAX_ITER):
    """The tuned heads of one labelled subset: ``Xc`` (m, D) its standardised features
    (torch), ``Y`` (m, L) its labels. Returns ``(W_x (D, W), b (W,), W_z (A, C_cls) or
    None, allowed (W,))`` in the layout's columns."""
    import torch

    m, D = Xc.shape
    V = _basis(Xc)
    F = Xc if V is None else Xc @ V
    heads = list(layout.order)
    exp_heads = heads[:-1] if layout.cls is not None else heads
    strat = Y[:, heads[-1]]
    train = _folds(strat, groups, min(folds, m), seed)
    F1 = F[None].expand(len(train), *F.shape)
    block = _Block(Y[:, exp_heads], [layout.n_classes[i] for i in exp_heads], tuple(Cs))
    Bx, bx, allowed, _ = _fit_block(F1, block, train, _tolerances(layout, exp_heads), max_iter)
    Wz = None
    if layout.cls is not None:
        z = torch.matmul(F1, Bx) + bx[:, None, :]  # z_exp of each fold's attribute heads
        blk2 = _Block(Y[:, [layout.cls]], [layout.n_classes[layout.cls]], tuple(Cs))
        B2, b2, al2, _ = _fit_block(torch.cat([F1, z], -1), blk2, train,
                                    _tolerances(layout, [layout.cls]), max_iter)
        d = F.shape[1]
        Bx, bx = torch.cat([Bx, B2[:, :d]], -1), torch.cat([bx, b2], -1)
        allowed, Wz = torch.cat([allowed, al2]), B2[0, d:]
    Wx = Bx[0] if V is None else V @ Bx[0]
    return Wx, bx[0], Wz, allowed
