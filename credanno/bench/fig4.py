"""Fig. 4 of the paper: malignancy accuracy as the annotations are reduced.

Our k-NN and trained predictors read the store; the end-to-end supervised CNN (the paper's
"Baseline", :class:`~credanno.bench.supervised.EndToEndClassifier`) trains on the images of
the patch file the store was embedded from, on exactly the same label subsets
(:func:`credanno.eval.subsets.label_subset` of the training split, same fraction and seed).
Curves are mean +/- sd over seeds on a log fraction axis.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from credanno.bench.paper import PAPER_FIG4
from credanno.errors import CredannoError
from credanno.numerics import mean_sd
from credanno.outputs import md_text, one_line, write_csv
from credanno.viz.source import DataSource, describe_source, patch_file_of

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
                        on_config: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Malignancy accuracy of the end-to-end CNN trained on each (fraction, seed) subset."""
    from credanno.bench.supervised import EndToEndClassifier
    from credanno.data.patchfile import read_patch_file
    from credanno.eval.specs import SubsetSpec
    from credanno.eval.subsets import draw_subsets

    ps = read_patch_file(patch_file)
    split = ps.table["split"].astype(str).to_numpy()
    tr, te = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    y = ps.table["malignancy"].to_numpy().astype(np.int64)
    table_train = ps.table.iloc[tr].reset_index(drop=True)
    test_keep = te[y[te] >= 0]
    recs = []
    # the same subsets as the k-NN and the probes: one draw_subsets for all three
    for subset in draw_subsets(SubsetSpec(fracs=fracs, seeds=seeds), table_train):
        rows, seed = tr[subset.rows], subset.seed
        clf = EndToEndClassifier(seed=seed, n_classes=2, **(cnn or {}))
        clf.fit(ps.images[rows], y[rows])
        acc = float((clf.predict(ps.images[test_keep]) == y[test_keep]).mean())
        recs.append({"series": series, "frac": subset.frac, "seed": seed, "acc": acc,
                     "n_labelled": int((y[rows] >= 0).sum())})
        if on_config:
            on_config(f"{series}: {subset.frac:g} seed {seed}: {acc * 100:.1f}%")
    return pd.DataFrame(recs)


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
             progress: bool = False,
             on_config: Callable[[str], None] | None = None) -> Fig4Result:
    """Malignancy accuracy over label fractions for k-NN, probes and the end-to-end CNN
    (``cnn=None``: without the CNN)."""
    from credanno import checks, stores
    from credanno.bench.supervised import EndToEndClassifier
    from credanno.eval import knn_sweep, probe_sweep
    from credanno.eval.specs import KnnSpec, ProbeSpec, SubsetSpec
    from credanno.runtime import resolve_device
    from credanno.viz.tsne import resolve_store

    # every setting is checked before the k-NN and probes run, so none of their work is lost
    subsets = SubsetSpec(fracs=sorted(_fracs(fracs, "--frac")), seeds=checks.seeds(seeds))
    k = checks.count(k, "--k")
    probe = ProbeSpec(epochs=checks.count(probe_epochs, "--probe-epochs"), device=device)
    cnn_fracs = None if cnn is None or cnn.fracs is None else _fracs(cnn.fracs, "--cnn-frac")
    if cnn is not None:
        resolve_device(EndToEndClassifier(**cnn.options).device)
    path = resolve_store(store)
    with stores.open(path) as s:
        prov = dict(s.provenance)
        if cnn is not None and cnn.data is not None:
            check_patch_file(Path(cnn.data), prov, path, s.table())
        probe = replace(probe, kind="last4" if "last4" in s.feature_sets else s.feature_sets[0])
        knn_kind = "cls" if "cls" in s.feature_sets else s.feature_sets[0]
        n_train = len(s.rows("train"))
    knn = knn_sweep(path, subsets, KnnSpec(ks=[k], kind=knn_kind), labels=["malignancy"],
                    progress=progress)
    frames = [_malignancy_rows(knn.results, f"ours: {k}-NN")]
    res = probe_sweep(path, subsets, probe, progress=progress)
    frames.append(_malignancy_rows(res.results, "ours: trained (G_cls)"))
    notes = [f"k-NN uses k = {k} (clamped to the labelled images when fewer; "
             f"{n_train} training images)."]
    if cnn is not None:
        patch = Path(cnn.data) if cnn.data is not None else patch_file_of(prov, path)
        if patch is None:
            raise CredannoError(f"cannot find the patch file of store {path} for the "
                                "end-to-end baseline; pass --data PATH or --no-cnn")
        arch = cnn.options.get("arch", "resnet18")
        frames.append(cnn_subset_accuracy(patch, sorted(cnn_fracs or subsets.fracs),
                                          subsets.seeds, cnn.options,
                                          series=f"end-to-end {arch} (baseline)",
                                          on_config=on_config))
        notes.append(f"Baseline: timm {arch} trained end-to-end from random weights on the "
                     f"same label subsets ({cnn.options.get('epochs', 30)} epochs; the "
                     "paper's is ResNet-50).")
    return Fig4Result(raw=pd.concat(frames, ignore_index=True),
                      data=describe_source(prov, path), store=path, notes=notes)
