""":class:`JointLinearProbe`: the joint G_exp/G_cls heads (Eq. 3) as a scikit-learn
estimator, on :func:`credanno.eval.probe.train_joint_heads`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from credanno.errors import CredannoError
from credanno.eval.probe import (
    HeadLayout,
    HeadParams,
    ProbeRun,
    _decisions,
    _predict_heads,
    split_validation,
    train_joint_heads,
)
from credanno.eval.specs import PaperRecipe
from credanno.eval.tuned import TUNED_CS
from credanno.labels import LABEL_NAMES, label_spec
from credanno.numerics import require_finite

if TYPE_CHECKING:
    from credanno.eval.specs import ProbeSpec


class JointLinearProbe(BaseEstimator):
    """The joint G_exp/G_cls heads (Eq. 3) as a scikit-learn estimator
    (``sklearn.base.clone``, ``GridSearchCV`` and pipelines work on it).

    ``fit(X, Y)`` with ``Y`` a DataFrame of label columns (names from
    :data:`credanno.labels.LABEL_NAMES`; ``malignancy`` becomes G_cls fed with the other
    heads' logits), a 2-D int array (one column per head, ``n_classes`` inferred, no G_cls
    unless ``cls_label`` gives a column index) or a 1-D array (one softmax regression).
    Labels of -1 are missing and ignored by that head. ``recipe``: ``"tuned"`` (``Cs``,
    ``cv``) or ``"paper"`` (its settings in ``paper``, a
    :class:`~credanno.eval.specs.PaperRecipe`; None: ``PaperRecipe()``, the paper's
    section 3 with lr 5e-4); see :class:`~credanno.eval.specs.ProbeSpec`. Fitted state:
    ``heads_``, ``layout_``, ``classes_``, ``single_output_``.
    """

    def __init__(self, recipe: str = "tuned", Cs: tuple[float, ...] = TUNED_CS, cv: int = 5,
                 paper: PaperRecipe | None = None, standardize: bool = True, seed: int = 0,
                 device: str = "cpu", cls_label: str | int | None = "malignancy") -> None:
        # stored as given (scikit-learn's clone and set_params rely on it); read in fit
        self.recipe, self.Cs, self.cv, self.paper = recipe, Cs, cv, paper
        self.standardize, self.seed, self.device, self.cls_label = (standardize, seed, device,
                                                                     cls_label)

    def _layout(self, Y, soft: list | None) -> tuple[np.ndarray, HeadLayout, bool]:
        """Labels (n, L), their layout, and whether the target is 1-D; a label's number of
        classes: its LIDC scale, else the largest label (or soft-target width) seen."""
        if isinstance(Y, pd.DataFrame):
            names = [str(c) for c in Y.columns]
            arr, single = Y.to_numpy().astype(np.int64), False
            cls = names.index(self.cls_label) if self.cls_label in names else None
        else:
            arr = np.asarray(Y).astype(np.int64)
            single = arr.ndim == 1
            arr = arr.reshape(len(arr), -1)
            names = [str(i) for i in range(arr.shape[1])]
            cls = self.cls_label if isinstance(self.cls_label, int) else None
        counts = [label_spec(c).n_classes if c in LABEL_NAMES else int(arr[:, i].max()) + 1
                  for i, c in enumerate(names)]
        if soft is not None:
            if len(soft) != len(names):
                raise CredannoError(f"{len(soft)} soft-target arrays for {len(names)} labels; "
                                    "pass one (or None) per label")
            counts = [c if s is None or names[i] in LABEL_NAMES else max(c, np.shape(s)[1])
                      for i, (c, s) in enumerate(zip(counts, soft, strict=True))]
        return arr, HeadLayout(names, counts, cls), single

    def _paper(self) -> PaperRecipe:
        return PaperRecipe() if self.paper is None else self.paper

    def _spec(self) -> ProbeSpec:
        from credanno.eval.specs import ProbeSpec

        p = self._paper()
        return ProbeSpec(kind=None, recipe=self.recipe, Cs=self.Cs, cv_folds=self.cv,
                         epochs=p.epochs, batch_size=p.batch_size, momentum=p.momentum,
                         select=p.select if self.recipe == "paper" else "last",
                         val_frac=p.val_frac, standardize=self.standardize,
                         device=self.device)

    def fit(self, X: np.ndarray, Y, views: np.ndarray | None = None,
            groups: np.ndarray | None = None,
            soft: Sequence[np.ndarray | None] | np.ndarray | None = None,
            unlabelled: np.ndarray | None = None,
            init: JointLinearProbe | None = None) -> JointLinearProbe:
        """Train on all rows of ``X`` (n, D) (paper recipe with ``select="val"``: hold out
        ``val_frac``; tuned: CV folds keep whole ``groups``, e.g. nodules, when given).

        ``soft``: class-probability targets (e.g. soft pseudo-labels) instead of the labels,
        one entry per label column: an (n, C_l) array (rows of NaN: use the label) or None
        (that label's hard labels only); for a 1-D target, one (n, C) array.
        ``unlabelled``: features (u, D) of the other training images, whose labels are not
        used: with ``standardize``, the features are scaled by the mean and sd of ``X`` and
        ``unlabelled`` together, i.e. of the whole training split as ``credanno probe``
        does (statistics of a few labelled rows alone are noisy and make few-label fits
        worse). They never enter the loss.
        ``init`` (tuned recipe): a fitted tuned probe of the same labels to *quench* from,
        cRedAnno+'s short retraining (:func:`credanno.eval.tuned.quench_tuned`): its
        penalties, no cross-validation, a few L-BFGS iterations from its weights.
        """
        if soft is not None and not isinstance(soft, (list, tuple)):
            soft = [soft]  # a 1-D target's one array
        Yarr, layout, single = self._layout(Y, None if soft is None else list(soft))
        X = require_finite(np.asarray(X, dtype=np.float32), "features")
        if soft is not None:
            soft = layout.to_columns(list(soft), len(X))
        run = self._run(np.arange(len(X)), groups, self._init_heads(init))
        if unlabelled is not None:  # rows after X's: statistics only (label -1, no target)
            X, Yarr, soft = _with_unlabelled(X, Yarr, soft, unlabelled)
        heads = train_joint_heads(X, Yarr, layout, [run], self._spec(), views=views, soft=soft)
        return self._fitted(heads, layout, single)

    def _run(self, rows: np.ndarray, groups: np.ndarray | None, init=None) -> ProbeRun:
        """The training run of ``rows`` (paper recipe with ``select="val"``: its
        validation part carved out)."""
        paper, val = self._paper(), None
        if self.recipe == "paper" and paper.select == "val":
            rows, val = split_validation(rows, paper.val_frac, self.seed)
        return ProbeRun(rows, paper.lr, self.seed, val, groups, init)

    def _fitted(self, heads, layout: HeadLayout, single: bool) -> JointLinearProbe:
        """Set the fitted state from one configuration's ``heads``."""
        self.heads_, self.layout_, self.single_output_ = heads, layout, single
        self.classes_ = [np.arange(c) for c in layout.n_classes]
        return self

    def predict_proba(self, X: np.ndarray):
        """Class probabilities: (n, C) for a 1-D target, else a list of (n, C_l) arrays."""
        import torch

        check_is_fitted(self, "heads_")
        Xt = torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.heads_.exp[0].device)
        with torch.no_grad():
            probs = [p[0].cpu().numpy() for p in _predict_heads(self.heads_, Xt)]
        return probs[0] if self.single_output_ else probs

    def _init_heads(self, init: JointLinearProbe | None):
        """The tuned heads of ``init`` to quench from (None: a cross-validated fit)."""
        if init is None:
            return None
        check_is_fitted(init, "heads_")
        if self.recipe != "tuned" or init.heads_.tuned is None:
            raise CredannoError("quenching (init=) needs the tuned recipe on both probes")
        return init.heads_.tuned[0]

    def decide(self, X: np.ndarray) -> np.ndarray:
        """The classes the paper's metric most likely scores correct, (n, L) (or (n,) for a
        1-D target): with the tuned recipe, per label ``argmax_c P(|y - c| <= tol)`` among
        the classes its labelled rows hold (:func:`credanno.eval.tuned.decide`; ``tol`` 1
        for a rated attribute, 0 otherwise), what ``credanno probe`` scores; with the paper
        recipe, the most probable class (:meth:`predict`)."""
        probs = self.predict_proba(X)
        probs = [probs] if self.single_output_ else probs
        out = _decisions(dict(zip(self.layout_.names, probs, strict=True)), self.heads_, 0,
                         self.recipe)
        out = [out[name] for name in self.layout_.names]
        return out[0] if self.single_output_ else np.stack(out, axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted classes: (n,) for a 1-D target, else (n, L) in the columns' order."""
        probs = self.predict_proba(X)
        if self.single_output_:
            return probs.argmax(axis=1)
        return np.stack([p.argmax(axis=1) for p in probs], axis=1)

    def score(self, X: np.ndarray, Y) -> float:
        """Mean exact accuracy over heads (ignoring missing labels)."""
        Yarr = np.asarray(Y).reshape(len(X), -1)
        pred = self.predict(X).reshape(len(X), -1)
        ok = Yarr >= 0
        return float((pred[ok] == Yarr[ok]).mean())


def _with_unlabelled(X: np.ndarray, Y: np.ndarray, soft: np.ndarray | None,
                     unlabelled: np.ndarray) -> tuple:
    """``X`` with the unlabelled rows appended (labels -1, soft rows NaN)."""
    U = require_finite(np.asarray(unlabelled, dtype=np.float32), "unlabelled features")
    if U.ndim != 2 or U.shape[1] != X.shape[1]:
        raise CredannoError(f"unlabelled features of shape {U.shape}; expected (u, "
                            f"{X.shape[1]}) like X")
    Y = np.concatenate([Y, np.full((len(U), Y.shape[1]), -1, Y.dtype)])
    if soft is not None:
        soft = np.concatenate([soft, np.full((len(U), soft.shape[1]), np.nan, soft.dtype)])
    return np.concatenate([X, U]), Y, soft


def fit_many(probe: JointLinearProbe, X: np.ndarray, Y: pd.DataFrame,
             subsets: Sequence[np.ndarray], groups: np.ndarray | None = None
             ) -> list[JointLinearProbe]:
    """``probe`` (unfitted; its parameters) fitted on each training subset, as one batched
    sweep: ``X`` (n, D) every training image's features (the scaling statistics, as
    ``fit(..., unlabelled=)``), ``Y`` their label columns (only the subsets' rows are
    read), ``subsets`` arrays of row positions, ``groups`` (n,) the rows' nodules (CV
    folds). Identical subsets are fitted once and subsets of equal size together (tuned
    recipe), or with equal steps per epoch (paper recipe); each result equals
    ``clone(probe).fit(X[rows], Y.iloc[rows], groups=groups[rows], unlabelled=X[rest])``."""
    from dataclasses import replace as dc_replace

    from sklearn.base import clone

    Yarr, layout, single = probe._layout(Y, None)
    X = require_finite(np.asarray(X, dtype=np.float32), "features")
    runs = [probe._run(np.asarray(rows, dtype=np.int64),
                       None if groups is None else np.asarray(groups)[rows])
            for rows in subsets]
    heads = train_joint_heads(X, Yarr, layout, runs, probe._spec())
    out = []
    for c in range(len(runs)):
        one = slice(c, c + 1)
        mine = dc_replace(
            heads, exp=HeadParams(*(None if v is None else v[one] for v in heads.exp)),
            cls=HeadParams(*(None if v is None else v[one] for v in heads.cls)),
            mask=None if heads.mask is None else heads.mask[one],
            tuned=None if heads.tuned is None else [heads.tuned[c]])
        out.append(clone(probe)._fitted(mine, layout, single))
    return out
