"""Fig. 4 of the paper: malignancy accuracy as the annotations are reduced.

Our k-NN and trained predictors read the store; the end-to-end supervised CNN (the paper's
"Baseline", :class:`~credanno.bench.supervised.EndToEndClassifier`) trains on the images of
the patch file the store was embedded from, on exactly the same label subsets (drawn once by
:func:`credanno.eval.subsets.draw_subsets` from the store's training split and handed to all
three: any strategy, or a subset file).
Curves are mean +/- sd over seeds on a log fraction axis.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from credanno.bench.paper import PAPER_FIG4
from credanno.errors import CredannoError
from credanno.numerics import mean_sd
from credanno.outputs import md_text, one_line, write_csv
from credanno.viz.source import DataSource, describe_source, patch_file_of

if TYPE_CHECKING:
    from credanno.eval.specs import SubsetSpec
    from credanno.eval.subsets import Subset

FIG4_FRACS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class Fig4Result:
    """Per-seed accuracies (``raw``: series, frac, seed, acc, n_labelled) and the curves."""

    raw: pd.DataFrame
    data: DataSource
    store: Path
    notes: list[str] = field(default_factory=list)

    @property
    def curves(self) -> pd.DataFrame:
        g = self.raw.groupby(["series", "frac"], sort=False)["acc"]
        out = g.agg(mean="mean", sd="std", n_seeds="count").reset_index()
        return out

    def markdown(self) -> str:
        c = self.curves
        fracs = sorted(c["frac"].unique())
        lines = ["| series | " + " | ".join(f"{f * 100:g}%" for f in fracs) + " |",
                 "|---|" + "---:|" * len(fracs)]
        for name, g in c.groupby("series", sort=False):
            cells = []
            for f in fracs:
                r = g[np.isclose(g["frac"], f)]
                if r.empty:
                    cells.append("")
                    continue
                cells.append(mean_sd(float(r["mean"].iloc[0]), float(r["sd"].iloc[0])))
            lines.append(f"| {md_text(name)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def caption(self, markdown: bool = False) -> str:
        """One paragraph naming data, store and seeds: for the figure, or (``markdown``)
        with the store's name escaped for Markdown."""
        seeds = sorted(int(s) for s in self.raw["seed"].unique())
        store = md_text(self.store.name) if markdown else one_line(self.store.name)
        return (f"Data: {self.data.text}. Store {store}; seeds {list(seeds)}; "
                + " ".join(self.notes)
                + " Grey open markers: the paper's published points on real LIDC, for "
                "reference only.")

    def figure(self, paper: bool = True):
        from credanno.viz.figures import annotation_reduction_figure

        ref = None
        if paper:
            ref = pd.DataFrame([{"series": s, "frac": f, "acc": a / 100}
                                for s, f, a in PAPER_FIG4])
        return annotation_reduction_figure(self.curves, ref, caption=self.caption())

    def to_csv(self, path: str | os.PathLike, *, option: str = "--csv") -> Path:
        """Write the table as CSV (atomic, spreadsheet formulas neutralised)."""
        return write_csv(self.raw, path, option=option, index=False)


def _fracs(fracs: Sequence[float], option: str) -> list[float]:
    from credanno import checks

    out = [checks.finite(f, option, low=0, high=1, example="0.1") for f in fracs]
    if not out:
        raise CredannoError(f"{option} is empty; pass e.g. {option} 0.1,1")
    return out


def _malignancy_rows(results: pd.DataFrame, series: str) -> pd.DataFrame:
    r = results[results["label"] == "malignancy"]
    return pd.DataFrame({"series": series, "frac": r["frac"].astype(float).to_numpy(),
                         "seed": r["seed"].astype(int).to_numpy(),
                         "acc": r["acc"].astype(float).to_numpy(),
                         "n_labelled": r["n_labelled"].astype(int).to_numpy()})


def cnn_subset_accuracy(patch_file: str | os.PathLike, fracs: Sequence[float],
                        seeds: Sequence[int], cnn: dict[str, Any] | None = None,
                        series: str = "end-to-end CNN",
                        on_config: Callable[[str], None] | None = None, *,
                        labelled: Sequence[Subset] | None = None,
                        labelled_ids: np.ndarray | None = None) -> pd.DataFrame:
    """Malignancy accuracy of the end-to-end CNN trained on each (fraction, seed) subset.

    ``labelled``: subsets already drawn (by the k-NN and probes' :func:`draw_subsets`), their
    rows numbering ``labelled_ids``, the annotation ids of the store's training rows; the
    CNN then trains on exactly those images. Otherwise the paper's random subsets of
    ``fracs`` x ``seeds`` are drawn from the patch file's training split.
    """
    from credanno.bench.supervised import EndToEndClassifier
    from credanno.data.patchfile import read_patch_file

    ps = read_patch_file(patch_file)
    split = ps.table["split"].astype(str).to_numpy()
    tr, te = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    y = ps.table["malignancy"].to_numpy().astype(np.int64)
    table_train = ps.table.iloc[tr].reset_index(drop=True)
    test_keep = te[y[te] >= 0]
    recs = []
    for subset in _cnn_subsets(table_train, fracs, seeds, labelled, labelled_ids):
        rows, seed = tr[subset.rows], subset.seed
        clf = EndToEndClassifier(seed=seed, n_classes=2, **(cnn or {}))
        clf.fit(ps.images[rows], y[rows])
        acc = float((clf.predict(ps.images[test_keep]) == y[test_keep]).mean())
        recs.append({"series": series, "frac": subset.frac, "seed": seed, "acc": acc,
                     "n_labelled": int((y[rows] >= 0).sum())})
        if on_config:
            on_config(f"{series}: {subset.frac:g} seed {seed}: {acc * 100:.1f}%")
    return pd.DataFrame(recs)


def _cnn_subsets(table_train: pd.DataFrame, fracs: Sequence[float], seeds: Sequence[int],
                 labelled: Sequence[Subset] | None,
                 labelled_ids: np.ndarray | None) -> list[Subset]:
    """The CNN's subsets as rows of the patch file's training split."""
    from credanno.eval.specs import SubsetSpec
    from credanno.eval.subsets import draw_subsets

    if labelled is None:
        # the same subsets as the k-NN and the probes: one draw_subsets for all three
        return draw_subsets(SubsetSpec(fracs=fracs, seeds=seeds), table_train)
    index = pd.Index(table_train["annotation_id"].to_numpy())
    out = []
    for s in labelled:
        rows = index.get_indexer(np.asarray(labelled_ids)[s.rows])
        if (rows < 0).any():
            raise CredannoError("the patch file lacks training images of the store's subsets; "
                                "pass the patch file the store was embedded from")
        out.append(s._replace(rows=np.sort(rows)))
    return out


def _recorded_sha256(provenance: dict[str, Any]) -> str | None:
    pf = provenance.get("patch_file")
    return pf.get("sha256") if isinstance(pf, dict) else None


def check_patch_file(patch: Path, provenance: dict[str, Any], store: Path,
                     store_table: pd.DataFrame) -> None:
    """``patch`` must be the patch file ``store`` was embedded from: the CNN trains on the
    same label subsets by row, so another file would compare different images.

    The sha256 the store's provenance records decides when there is one; otherwise the
    images' ids and splits must match the store's table.
    """
    from credanno.data.patchfile import file_sha256, read_patch_file

    if not patch.is_file():
        raise CredannoError(f"--data {patch} not found; pass the patch file of store "
                            f"{store.name} or leave --data out")
    recorded = _recorded_sha256(provenance)
    if recorded:
        same, why = file_sha256(patch) == recorded, "its sha256 differs from the store's record"
    else:
        table = read_patch_file(patch, images=False).table
        same = len(table) == len(store_table) and all(
            np.array_equal(table[c].to_numpy(), store_table[c].to_numpy())
            for c in ("annotation_id", "split"))
        why = "its images or splits differ from the store's"
    if not same:
        raise CredannoError(f"--data {patch} is not the patch file store {store.name} was "
                            f"embedded from ({why}); pass that patch file or leave --data out")


@dataclass(frozen=True)
class CnnBaseline:
    """The end-to-end CNN of Fig. 4 (the paper's "Baseline").

    ``options``: keyword arguments of :class:`EndToEndClassifier` (arch, epochs, ...);
    ``fracs``: the fractions it trains on (None: all of Fig. 4's; the CNN costs minutes per
    point on a CPU where the two-stage methods cost seconds); ``data``: its patch file
    (None: the one the store's provenance names).
    """

    options: dict[str, Any] = field(default_factory=dict)
    fracs: tuple[float, ...] | None = None
    data: str | os.PathLike | None = None


def run_fig4(store: str | os.PathLike | None = None, fracs: Sequence[float] = FIG4_FRACS,
             seeds: Sequence[int] = (0, 1, 2), k: int = 50, probe_epochs: int = 100,
             cnn: CnnBaseline | None = CnnBaseline(), device: str | None = None,
             progress: bool = False, on_config: Callable[[str], None] | None = None,
             subsets: SubsetSpec | None = None) -> Fig4Result:
    """Malignancy accuracy over label fractions for k-NN, probes and the end-to-end CNN
    (``cnn=None``: without the CNN). ``subsets``: another strategy or a subset file instead
    of the paper's random ``fracs`` x ``seeds``; every method trains on the same rows."""
    from credanno import checks, stores
    from credanno.bench.supervised import EndToEndClassifier
    from credanno.eval import knn_sweep, probe_sweep
    from credanno.eval.specs import KnnSpec, ProbeSpec, SubsetSpec
    from credanno.runtime import resolve_device
    from credanno.viz.tsne import resolve_store

    # every setting is checked before the k-NN and probes run, so none of their work is lost
    if subsets is None:
        subsets = SubsetSpec(fracs=sorted(_fracs(fracs, "--frac")), seeds=checks.seeds(seeds))
    subsets = replace(subsets, fracs=tuple(sorted(subsets.fracs)))
    k = checks.count(k, "--k")
    probe = ProbeSpec(epochs=checks.count(probe_epochs, "--probe-epochs"), device=device)
    cnn_fracs = None if cnn is None or cnn.fracs is None else _fracs(cnn.fracs, "--cnn-frac")
    if cnn_fracs is not None and subsets.file is not None:
        raise CredannoError("--cnn-frac does not apply to a --subset-file; drop it")
    if cnn is not None:
        resolve_device(EndToEndClassifier(**cnn.options).device)
    path = resolve_store(store)
    with stores.open(path) as s:
        prov = dict(s.provenance)
        if cnn is not None and cnn.data is not None:
            check_patch_file(Path(cnn.data), prov, path, s.table())
        probe = replace(probe, kind="last4" if "last4" in s.feature_sets else s.feature_sets[0])
        knn_kind = "cls" if "cls" in s.feature_sets else s.feature_sets[0]
        table_train = s.table("train").reset_index(drop=True)
    drawn = _draw(subsets, table_train, path, knn_kind)
    knn = knn_sweep(path, drawn, KnnSpec(ks=[k], kind=knn_kind), labels=["malignancy"],
                    progress=progress)
    frames = [_malignancy_rows(knn.results, f"ours: {k}-NN")]
    res = probe_sweep(path, drawn, probe, progress=progress)
    frames.append(_malignancy_rows(res.results, "ours: trained (G_cls)"))
    notes = [f"k-NN uses k = {k} (clamped to the labelled images when fewer; "
             f"{len(table_train)} training images)."]
    if subsets.strategy != "random" or subsets.file is not None:
        notes.append(f"Label subsets: {_subsets_text(subsets)}.")
    if cnn is not None:
        patch = Path(cnn.data) if cnn.data is not None else patch_file_of(prov, path)
        if patch is None:
            raise CredannoError(f"cannot find the patch file of store {path} for the "
                                "end-to-end baseline; pass --data PATH or --no-cnn")
        arch = cnn.options.get("arch", "resnet18")
        cnn_drawn = drawn if cnn_fracs is None else _draw(
            replace(subsets, fracs=tuple(sorted(cnn_fracs))), table_train, path, knn_kind)
        frames.append(cnn_subset_accuracy(
            patch, [], subsets.seeds, cnn.options, series=f"end-to-end {arch} (baseline)",
            on_config=on_config, labelled=cnn_drawn,
            labelled_ids=table_train["annotation_id"].to_numpy()))
        notes.append(f"Baseline: timm {arch} trained end-to-end from random weights on the "
                     f"same label subsets ({cnn.options.get('epochs', 30)} epochs; the "
                     "paper's is ResNet-50).")
    return Fig4Result(raw=pd.concat(frames, ignore_index=True),
                      data=describe_source(prov, path), store=path, notes=notes)


def _draw(subsets: SubsetSpec, table_train: pd.DataFrame, path: Path,
          kind: str) -> list[Subset]:
    """The subsets every Fig. 4 method trains on (features read only if the strategy asks)."""
    from credanno import stores
    from credanno.eval.subsets import draw_subsets

    def features() -> np.ndarray:
        with stores.open(path) as s:
            return s.features("train", kind)

    return draw_subsets(subsets, table_train, features)


def _subsets_text(subsets: SubsetSpec) -> str:
    if subsets.file is not None:
        return f"the images listed in {Path(subsets.file).name}"
    return f"strategy {subsets.strategy}" + (f" by {subsets.stratify}" if subsets.stratify
                                             else "")
