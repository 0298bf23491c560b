"""What an evaluation runs, as small frozen specs: the CLI builds them, the library takes them.

- :class:`SubsetSpec`: which training rows keep their labels (label fractions or counts
  drawn by a strategy of :mod:`credanno.eval.strategies` over seeds, or a subset file);
- :class:`KnnSpec`: the k-NN classifier (k, temperature, weighting, feature set, device);
- :class:`ProbeSpec`: the trained linear predictors G_exp/G_cls (tuned or paper recipe);
- :class:`PaperRecipe`: the paper recipe's settings, as the estimator
  :class:`~credanno.eval.estimator.JointLinearProbe` takes them.

Each validates its fields once, at construction, with the one-line errors of the CLI
options they come from, so that a typo fails before any store is read. Numbers are kept
in canonical form (tuples, sorted unique k, resolved label names), which is what the
sweeps record in ``EvalResult.config``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from credanno import checks
from credanno.errors import CredannoError


def _tuple(values) -> tuple:
    if values is None:
        return ()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        return (values,)
    return tuple(values)


def _set(spec, **fields) -> None:
    for name, value in fields.items():
        object.__setattr__(spec, name, value)  # frozen: canonical values set once


@dataclass(frozen=True)
class SubsetSpec:
    """The labelled subsets: every label fraction (or count) x every seed, or a file.

    ``fracs``: label fractions in (0, 1] of the training images; ``n_labels``: numbers of
    labelled images instead (when given, ``fracs`` is not used); ``strategy``: how they are
    chosen, a name of :mod:`credanno.eval.strategies` (``random``, the paper's, ``nodule``,
    ``stratified``, ...); ``mode``: draw images one by one (``"annotation"``) or whole
    nodules (``"nodule"``); ``stratify``: a label name (``True`` = malignancy) whose classes
    share the budget; ``seeds``: one subset per seed (for ``random`` and ``nodule``, seed s
    of a smaller fraction lies inside seed s of a larger one). ``file``: a subset file
    (:func:`credanno.eval.subsets.read_subset_file`) naming the labelled images instead;
    its rows are then the subset of every seed.

    ``mode="nodule"`` and ``stratify`` are the older spellings of the strategies: they are
    folded in (``random`` + ``mode="nodule"`` is ``nodule``, ``random``/``nodule`` +
    ``stratify`` is ``stratified``), so the three fields always agree once built.
    """

    fracs: tuple[float, ...] = (1.0,)
    n_labels: tuple[int, ...] | None = None
    mode: str = "annotation"
    stratify: str | None = None
    seeds: tuple[int, ...] = (0,)
    strategy: str = "random"
    file: str | None = None

    def __post_init__(self) -> None:
        from credanno.eval.subsets import check_frac

        n_labels = None
        if self.n_labels is not None:
            n_labels = tuple(checks.count(n, "--n-labels") for n in _tuple(self.n_labels))
            if not n_labels:
                raise CredannoError("--n-labels is empty; pass e.g. --n-labels 20")
        fracs = tuple(check_frac(f) for f in _tuple(self.fracs))
        if n_labels is None and not fracs:
            raise CredannoError("no label fraction given; pass e.g. --frac 0.01,0.1,1")
        strategy, mode, stratify = _strategy(self.strategy, self.mode, self.stratify)
        _set(self, fracs=fracs, n_labels=n_labels, strategy=strategy, mode=mode,
             stratify=stratify, seeds=tuple(checks.seeds(_tuple(self.seeds))),
             file=_subset_file(self.file, strategy, mode, n_labels))

    def sizes(self, n_train: int) -> list[tuple[float, float | None, int | None]]:
        """``(recorded fraction, fraction, count)`` per setting, for ``n_train`` images."""
        if self.n_labels is not None:
            return [(n / n_train, None, n) for n in self.n_labels]
        return [(f, f, None) for f in self.fracs]

    def record(self) -> dict:
        """What a result records about its subsets (the file's sha256 is added when read)."""
        return {"strategy": self.strategy, "seeds": list(self.seeds), "mode": self.mode,
                "stratify": self.stratify}


def _strategy(strategy: str, mode: str, stratify) -> tuple[str, str, str | None]:
    """The canonical (strategy, mode, stratify): the older ``mode``/``stratify`` spellings
    folded into the strategy, and checked against what the strategy supports."""
    from credanno.eval.strategies import MODES, get_strategy
    from credanno.eval.subsets import stratify_column

    if mode not in MODES:
        raise CredannoError(f"unknown subset mode {mode!r}; choose one of {', '.join(MODES)}")
    stratify = stratify_column(stratify)
    if strategy == "nodule":
        mode = "nodule"
    if stratify is not None and strategy in ("random", "nodule"):
        strategy = "stratified"
    if strategy == "random" and mode == "nodule":
        strategy = "nodule"
    found = get_strategy(str(strategy))
    if found.name == "stratified" and stratify is None:
        stratify = "malignancy"
    if mode not in found.modes:
        raise CredannoError(f"subset strategy {found.name!r} draws per "
                            f"{' or '.join(found.modes)}, not per {mode}; drop --subset {mode}")
    if stratify is not None and not found.reads_labels:
        raise CredannoError(f"subset strategy {found.name!r} does not read labels, so it "
                            "cannot be stratified; drop --stratify")
    return found.name, mode, stratify


def _subset_file(file, strategy: str, mode: str, n_labels) -> str | None:
    """The subset file's path, checked to exist and not to be combined with a draw."""
    if file is None:
        return None
    from pathlib import Path

    if strategy != "random" or mode != "annotation" or n_labels is not None:
        raise CredannoError("--subset-file names the labelled images itself; drop "
                            "--strategy, --subset, --stratify and --n-labels")
    if not Path(file).is_file():
        raise CredannoError(f"--subset-file {file} not found; pass a CSV with an "
                            "annotation_id or nodule_id column, or one id per line")
    return str(file)


@dataclass(frozen=True)
class KnnSpec:
    """The weighted k-NN classifier (the paper's section 3.1).

    ``ks``: numbers of neighbours (all answered from one search); ``T``: temperature of the
    ``exp(sim / T)`` votes; ``weighting``: ``"exp"`` or ``"majority"``; ``kind``: the
    store's feature set; ``block_rows``: stream the training features in blocks of this
    many rows instead of loading them; ``device``: ``cpu``/``cuda`` for faiss (None: GPU
    when faiss sees one).
    """

    ks: tuple[int, ...] = (20,)
    T: float = 0.1
    weighting: str = "exp"
    kind: str = "cls"
    block_rows: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        from credanno.eval.knn import check_ks, check_T, get_weighting
        from credanno.runtime import check_device

        get_weighting(self.weighting)
        block_rows = self.block_rows
        if block_rows is not None:
            if isinstance(block_rows, bool) or int(block_rows) <= 0:
                raise CredannoError(f"--block-rows must be positive, got {block_rows}")
            block_rows = int(block_rows)
        _set(self, ks=tuple(check_ks(_tuple(self.ks))), T=check_T(self.T),
             block_rows=block_rows, device=check_device(self.device))


@dataclass(frozen=True)
class ProbeSpec:
    """The trained linear predictors G_exp and G_cls (Eq. 3).

    ``recipe``: ``"tuned"`` (default; :mod:`credanno.eval.tuned`: fitted to convergence,
    biases at log class priors, the L2 penalty ``C`` per head picked from ``Cs`` by
    ``cv_folds``-fold cross-validation inside the labelled subset, absent classes never
    predicted) or ``"paper"`` (section 3: SGD, the fields below). Paper recipe only:
    ``epochs``, ``lr``, ``batch_size``, ``momentum``, ``select``, ``val_frac``,
    ``init_std``, ``views``, ``cls_grad`` (G_cls's gradient reaches the attribute heads
    through z_exp; False: each attribute head trains on its own loss, as the authors'
    code effectively does).

    ``lr=None``: the paper's rate per label fraction (5e-4 with all labels, 2.5e-4 with
    partial labels); ``select``: the last epoch, or each head's best epoch on ``val_frac``
    of the labelled subset (``"val"``); ``standardize``: scale features by the training
    split's mean and sd; ``views``: train on the store's augmented views when it has them;
    ``kind=None``: ``last4`` when the store has it, else its default feature set;
    ``device``: cpu, cuda or cuda:N (None: cuda when available).
    """

    kind: str | None = "last4"
    recipe: str = "tuned"
    Cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    cv_folds: int = 5
    epochs: int = 100
    lr: float | None = None
    batch_size: int = 128
    momentum: float = 0.9
    select: str = "last"
    val_frac: float = 0.2
    standardize: bool = True
    views: bool = True
    device: str | None = None  # None: runtime.default_device() (a GPU when torch sees one)
    init_std: float = 0.01
    cls_grad: bool = True

    def __post_init__(self) -> None:
        from credanno.eval.probe import PROBE_RECIPES
        from credanno.runtime import resolve_device

        if self.recipe not in PROBE_RECIPES:
            raise CredannoError(f"unknown probe recipe {self.recipe!r}; use one of "
                                f"{', '.join(PROBE_RECIPES)}")
        paper = _paper_fields(self)
        Cs = tuple(sorted(checks.finite(c, "C", low=0) for c in _tuple(self.Cs)))
        if not Cs:
            raise CredannoError("no penalty C given for the tuned recipe; pass e.g. Cs=(0.01, 1)")
        _set(self, **paper,
             init_std=checks.finite(self.init_std, "init_std", low=0, low_open=False),
             Cs=Cs, cv_folds=checks.count(self.cv_folds, "cv_folds"),
             device=resolve_device(self.device))
        if self.recipe == "tuned" and (self.lr is not None or self.select != "last"):
            raise CredannoError("--lr and --select val belong to --recipe paper; the tuned "
                                "recipe cross-validates its penalty (add --recipe paper)")


def _paper_fields(spec) -> dict:
    """The paper recipe's fields of ``spec`` (a :class:`ProbeSpec` or :class:`PaperRecipe`)
    checked and in canonical form."""
    from credanno.eval.probe import SELECTIONS, check_lr

    if spec.select not in SELECTIONS:
        raise CredannoError(f"unknown selection {spec.select!r}; use one of "
                            f"{', '.join(SELECTIONS)}")
    return {"lr": None if spec.lr is None else check_lr(spec.lr),
            "epochs": checks.count(spec.epochs, "--epochs"),
            "batch_size": checks.count(spec.batch_size, "--batch-size"),
            "momentum": checks.finite(spec.momentum, "momentum", low=0, high=1,
                                      low_open=False, high_open=True),
            "val_frac": checks.finite(spec.val_frac, "--val-frac", low=0, high=1,
                                      high_open=True, example="0.2")}


@dataclass(frozen=True)
class PaperRecipe:
    """The paper recipe's settings (section 3, "Training settings"), for
    :class:`~credanno.eval.estimator.JointLinearProbe` (``paper=PaperRecipe(...)``): SGD
    for ``epochs`` at initial rate ``lr`` (5e-4, the paper's with all labels; 2.5e-4 is its
    rate with partial labels), minibatches of ``batch_size``, ``momentum``, cosine
    schedule; ``select``: the last epoch or each head's best epoch on ``val_frac`` of the
    training rows (``"val"``). Frozen and compared by value, so ``sklearn.base.clone`` and
    ``GridSearchCV`` (``{"paper": [PaperRecipe(lr=1e-3), ...]}``) work on it.
    """

    epochs: int = 100
    lr: float = 5e-4
    batch_size: int = 128
    momentum: float = 0.9
    select: str = "last"
    val_frac: float = 0.2

    def __post_init__(self) -> None:
        if self.lr is None:
            raise CredannoError("PaperRecipe needs a learning rate; pass e.g. lr=5e-4")
        _set(self, **_paper_fields(self))
