"""``torch.optim.LBFGS`` (strong Wolfe line search) on many independent problems at once.

Each row of the parameter matrix x (nb, N) is one problem with its own history, step,
line search, evaluation count and stopping tests, exactly those of ``torch.optim.LBFGS(
lr=1, history_size=h, tolerance_grad, tolerance_change, line_search_fn="strong_wolfe")``
on that problem alone; only the function evaluations are shared (one batched call per
round, for every problem at once). A problem therefore takes the path it would take
alone (up to rounding), and a batch costs as many rounds as its slowest problem, not the
sum: what makes small problems fast, whose time is per-call overhead, not arithmetic.

The inverse Hessian is applied in its compact form (Byrd, Nocedal & Schnabel 1994), a
few batched products whatever the history's length, instead of the two-loop recursion.
"""

from __future__ import annotations

from typing import Any, NamedTuple

_C1, _C2, _LS_TOL = 1e-4, 0.9, 1e-9  # torch.optim.lbfgs._strong_wolfe's defaults


def _dots(A, v):
    """(nb, h): every row of A (nb, h, N) dotted with v (nb, N) (a row vector times A^T:
    far faster than A @ v as a batched product)."""
    import torch

    return torch.bmm(v[:, None], A.transpose(1, 2))[:, 0]


def _combine(A, c):
    """(nb, N): the rows of A (nb, h, N) weighted by c (nb, h)."""
    import torch

    return torch.bmm(c[:, None], A)[:, 0]


class _History:
    """Every problem's last ``h`` pairs (s, y) in a ring (slots written in turn by all
    problems at once; a problem without a pair that step gets a zero pair, which has no
    effect), their inner products ``SY[i, j] = s_i . y_j``, ``YY[i, j] = y_i . y_j``
    (nb, h, h), and those with the current gradient, ``a = S g``, ``c = Y g`` (nb, h).
    Kept up to date from two products with the history per step (``S g'`` and ``Y g'``
    for the new gradient g'): the others follow from the small matrices, the last
    direction's coefficients and ``y = g' - g``."""

    def __init__(self, x, h: int):
        import torch

        nb, N = x.shape
        self.S, self.Y = x.new_zeros(nb, h, N), x.new_zeros(nb, h, N)
        self.SY, self.YY = x.new_zeros(nb, h, h), x.new_zeros(nb, h, h)
        self.a, self.c = x.new_zeros(nb, h), x.new_zeros(nb, h)
        self.p, self.u = x.new_zeros(nb, h), x.new_zeros(nb, h)  # -H g = gamma Y'p - gamma g - S'u
        self.gamma, self.count, self.h = x.new_ones(nb), 0, h
        rings = [torch.tensor([(c + i) % h for i in range(h)], device=x.device) for c in range(h)]
        self._order = [(o, torch.argsort(o)) for o in rings]  # oldest first, and back

    _ROWS = ("S", "Y", "SY", "YY", "a", "c", "p", "u", "gamma")

    def select(self, keep) -> None:
        """Keep the problems ``keep`` (indices) only."""
        for name in self._ROWS:
            setattr(self, name, getattr(self, name)[keep])

    def direction(self, g):
        """``-H g`` per problem (the two-loop recursion's result) for the current gradient
        g (the one of ``a`` and ``c``), in the compact form."""
        import torch

        if self.count == 0:
            return -g
        order, back = self._order[self.count % self.h]
        SY = self.SY[:, order][:, :, order]
        Dg = SY.diagonal(dim1=1, dim2=2)
        R = SY.triu(1) + torch.diag_embed(torch.where(Dg > 0, Dg, torch.ones_like(Dg)))
        a, c = self.a[:, order, None], self.c[:, order, None]
        gam = self.gamma[:, None, None]
        p = torch.linalg.solve_triangular(R, a, upper=True)
        v = Dg[..., None] * p + gam * (torch.bmm(self.YY[:, order][:, :, order], p) - c)
        u = torch.linalg.solve_triangular(R.transpose(1, 2), v, upper=False)
        self.p, self.u = p[:, back, 0], u[:, back, 0]
        return _combine(self.Y, gam[..., 0] * self.p) - gam[..., 0] * g - _combine(self.S, self.u)

    def update(self, g_new, s, y, step, keep) -> None:
        """After the step s = t d along the last direction d (``step``: t, g.d, g'.d,
        s.y), y = g' - g: store the pair of the problems ``keep`` (the others: a zero
        pair), ``s.y / y.y`` as their initial inverse Hessian scale, and ``S g'``,
        ``Y g'``."""
        import torch

        t, gtd, gtd_new, ys = step
        j, k = self.count % self.h, keep.to(s.dtype)
        A, Cc = _dots(self.S, g_new), _dots(self.Y, g_new)  # the old pairs
        gam = self.gamma[:, None]
        Yd = (gam * (torch.bmm(self.YY, self.p[..., None])[..., 0] - self.c)
              - torch.bmm(self.SY.transpose(1, 2), self.u[..., None])[..., 0])  # y_i . d
        yy = (y * y).sum(-1) * k
        self.SY[:, j], self.SY[:, :, j] = t[:, None] * Yd * k[:, None], (A - self.a) * k[:, None]
        self.YY[:, j] = self.YY[:, :, j] = (Cc - self.c) * k[:, None]
        self.SY[:, j, j], self.YY[:, j, j] = ys * k, yy
        A[:, j], Cc[:, j] = t * gtd_new * k, (y * g_new).sum(-1) * k
        self.S[:, j], self.Y[:, j] = s * k[:, None], y * k[:, None]
        self.a, self.c = A, Cc
        self.gamma = torch.where(keep, ys / yy.clamp_min(1e-300), self.gamma)
        self.count += 1


class _Point(NamedTuple):
    """A point on every problem's search line: step t, loss f, gradient g, slope g.d."""

    t: Any
    f: Any
    g: Any
    gtd: Any


def _where(mask, a: _Point, b: _Point) -> _Point:
    import torch

    return _Point(*(torch.where(mask if u.dim() == 1 else mask[:, None], u, v)
                    for u, v in zip(a, b, strict=True)))


def _cubic(x1, f1, g1, x2, f2, g2, lo, hi):
    """``torch.optim.lbfgs._cubic_interpolate`` elementwise: the minimiser of the cubic
    through (x1, f1, g1) and (x2, f2, g2) clamped to [lo, hi]; their middle when the
    cubic has none."""
    import torch

    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2sq = d1 ** 2 - g1 * g2
    d2 = d2sq.clamp_min(0).sqrt()
    up = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    down = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    pos = torch.where(x1 <= x2, up, down)
    return torch.where(d2sq >= 0, torch.minimum(torch.maximum(pos, lo), hi), (lo + hi) / 2)


class _Line(NamedTuple):
    """One line search: the loss at step t along d from x, for the problems in ``todo``."""

    fg: Any
    x: Any
    d: Any
    start: _Point  # t = 0
    max_ls: Any  # (nb,) evaluations left to each problem

    def at(self, t) -> _Point:
        f, g = self.fg(self.x + t[:, None] * self.d)
        return _Point(t, f, g, (g * self.d).sum(-1))

    def sufficient(self, p: _Point):
        return p.f <= self.start.f + _C1 * p.t * self.start.gtd

    def curvature(self, p: _Point):
        return p.gtd.abs() <= -_C2 * self.start.gtd


def _bracket(line: _Line, new: _Point, todo, ls_iter):
    """The first phase of ``_strong_wolfe``: from step t, extrapolate until the strong
    Wolfe conditions hold (done) or an interval holding such a step is found (to zoom).
    Returns each problem's pair of points (the interval, or twice the accepted point),
    the problems to zoom, and the evaluation counts."""
    import torch

    prev, brk = line.start, todo.clone()
    zoom, stop = torch.zeros_like(todo), torch.zeros_like(todo)
    while True:
        chk = brk & (ls_iter < line.max_ls)
        stop |= brk & ~chk  # out of evaluations: the interval [0, t]
        up = ~line.sufficient(new) | ((ls_iter > 1) & (new.f >= prev.f))
        ok = chk & ~up & line.curvature(new)
        go = chk & (up | (~ok & (new.gtd >= 0)))
        prev = _where(ok, new, prev)
        zoom |= go
        brk = chk & ~ok & ~go
        if not bool(brk.any()):
            break
        t = _cubic(prev.t, prev.f, prev.gtd, new.t, new.f, new.gtd,
                   new.t + 0.01 * (new.t - prev.t), 10 * new.t)
        prev, new = _where(brk, new, prev), _where(brk, line.at(torch.where(brk, t, new.t)), new)
        ls_iter = ls_iter + brk
    return _where(stop, line.start, prev), new, zoom, ls_iter


def _zoom(line: _Line, a: _Point, b: _Point, zm, ls_iter):
    """The second phase of ``_strong_wolfe``: shrink each interval [a, b] of the problems
    ``zm`` by safeguarded cubic interpolation until a step satisfies the strong Wolfe
    conditions. Returns the best point of every problem and the evaluation counts."""
    import torch

    first = a.f <= b.f
    lo, hi = _where(first, a, b), _where(first, b, a)
    insuf = torch.zeros_like(zm)
    dnorm = line.d.abs().amax(-1)
    while True:
        zm = zm & (ls_iter < line.max_ls) & ((hi.t - lo.t).abs() * dnorm >= _LS_TOL)
        if not bool(zm.any()):
            return lo, ls_iter
        tmin, tmax = torch.minimum(lo.t, hi.t), torch.maximum(lo.t, hi.t)
        t = _cubic(lo.t, lo.f, lo.gtd, hi.t, hi.f, hi.gtd, tmin, tmax)
        eps = 0.1 * (tmax - tmin)
        near = torch.minimum(tmax - t, t - tmin) < eps
        edge = insuf | (t >= tmax) | (t <= tmin)
        moved = torch.where((t - tmax).abs() < (t - tmin).abs(), tmax - eps, tmin + eps)
        t = torch.where(near & edge, moved, t)
        insuf = torch.where(zm, near & ~edge, insuf)
        new = line.at(torch.where(zm, t, lo.t))
        ls_iter = ls_iter + zm
        worse = zm & (~line.sufficient(new) | (new.f >= lo.f))
        hi = _where(worse, new, hi)
        swap = worse & (hi.f < lo.f)
        lo, hi = _where(swap, hi, lo), _where(swap, lo, hi)
        better = zm & ~worse
        done = better & line.curvature(new)
        back = better & ~done & (new.gtd * (hi.t - lo.t) >= 0)
        hi = _where(back, lo, hi)
        lo = _where(better, new, lo)
        zm = zm & ~done


def _strong_wolfe(line: _Line, t, todo):
    """``torch.optim.lbfgs._strong_wolfe`` for every problem in ``todo`` from step t.
    Returns the accepted point (t = 0: not moved for the others) and the evaluations."""
    import torch

    ls_iter = torch.zeros_like(t, dtype=torch.long)
    new = line.at(t)
    if not bool((todo & ~(line.sufficient(new) & line.curvature(new))).any()):
        return _where(todo, new, line.start), todo.long()  # the usual case: the first step
    a, b, zoom, ls_iter = _bracket(line, new, todo, ls_iter)
    best, ls_iter = _zoom(line, a, b, zoom, ls_iter)
    return _where(todo, best, line.start), (ls_iter + 1) * todo


class _State(NamedTuple):
    """The per-problem state carried between L-BFGS steps (rows: problems)."""

    x: Any
    f: Any
    g: Any
    evals: Any
    active: Any


def _compact(state: _State, idx, out, hist: _History, make_fg):
    """Go on with the active problems only (``out`` keeps the others' final x)."""
    out[idx] = state.x
    keep = state.active.nonzero()[:, 0]
    hist.select(keep)
    idx = idx[keep]
    return _State(*(v[keep] for v in state)), idx, make_fg(idx)


def batch_lbfgs(make_fg, x, max_iter: int, history: int = 10, tol_grad: float = 1e-5,
                tol_change: float = 1e-8, skip=None):
    """Minimise the independent problems in the rows of x (nb, N) from x, each exactly as
    ``torch.optim.LBFGS(lr=1, max_iter=max_iter, history_size=history, tolerance_grad=
    tol_grad, tolerance_change=tol_change, line_search_fn="strong_wolfe").step`` would
    alone. ``make_fg(idx)``: the function x -> (losses (n,), gradients (n, N)) of the
    problems ``idx`` (a tensor of row indices; None: all). Once a problem is done, goes on
    with the others only. ``skip`` (nb,) bool: problems left at x, never evaluated.
    Returns the minimisers (nb, N)."""
    import torch

    max_eval = max_iter * 5 // 4
    out, idx = x.clone(), torch.arange(len(x), device=x.device)
    if skip is not None and bool(skip.any()):
        idx = idx[~skip]
        if not len(idx):
            return out
        x, fg = x[idx], make_fg(idx)
    else:
        fg = make_fg(None)
    f, g = fg(x)
    st = _State(x, f, g, torch.ones_like(f, dtype=torch.long), g.abs().amax(-1) > tol_grad)
    hist = _History(x, history)
    for n_iter in range(1, max_iter + 1):
        if 0 < int(st.active.sum()) < len(st.active):
            st, idx, fg = _compact(st, idx, out, hist, make_fg)
        d = hist.direction(st.g)
        gtd = (st.g * d).sum(-1)
        active = st.active & (gtd <= -tol_change)
        if not bool(active.any()):
            break
        t = ((1.0 / st.g.abs().sum(-1)).clamp(max=1.0) if n_iter == 1
             else torch.ones_like(st.f))
        d = d * active[:, None]
        line = _Line(fg, st.x, d, _Point(torch.zeros_like(t), st.f, st.g, gtd),
                     max_eval - st.evals)
        p, ls_evals = _strong_wolfe(line, t, active)
        evals = st.evals + ls_evals
        s, y = d * p.t[:, None], p.g - st.g
        stop = ((n_iter == max_iter) | (evals >= max_eval) | (p.g.abs().amax(-1) <= tol_grad)
                | (s.abs().amax(-1) <= tol_change) | ((p.f - st.f).abs() < tol_change))
        ys = (s * y).sum(-1)  # torch keeps the pair when s.y > 1e-10
        go = active & ~stop
        hist.update(p.g, s, y, (p.t, gtd, p.gtd, ys), go & (ys > 1e-10))
        st = _State(st.x + s, p.f, p.g, evals, go)
    out[idx] = st.x
    return out
