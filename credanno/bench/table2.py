"""Table 2 of the paper: encoder x training strategy x ImageNet initialisation.

Malignancy accuracy with all annotations for:

- end-to-end: the encoder trained supervised on the labelled images
  (:class:`~credanno.bench.supervised.EndToEndClassifier`);
- two-stage: DINO pretraining (:mod:`credanno.pretrain`), teacher features into a store
  (:func:`credanno.embed.embed`), then the trained linear predictors (G_exp, G_cls) with
  all labels (:func:`credanno.eval.probe_sweep`), the paper's "trained" setting;
- init "yes": pretraining starts from a local ImageNet weights file (``--init-resnet`` /
  ``--init-vit``); without such a file the row is reported as not run.

The paper's encoders are ResNet-50 and ViT-S/16 at 224 px; on a CPU, small stand-ins at the
patches' native 32 px (ResNet-18 and the ``cpu-tiny`` ViT) keep the table to minutes,
and every row names the architecture it actually ran.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from credanno.bench.paper import paper_table2
from credanno.errors import CredannoError
from credanno.numerics import mean_sd
from credanno.outputs import md_text, write_csv
from credanno.viz.source import DataSource


@dataclass(frozen=True)
class Table2Row:
    encoder: str  # "ResNet" or "ViT", as in the paper
    strategy: str  # "end-to-end" or "two-stage"
    init: str  # "no" or "yes"


TABLE2_ROWS: tuple[Table2Row, ...] = (
    Table2Row("ResNet", "end-to-end", "no"),
    Table2Row("ResNet", "two-stage", "no"),
    Table2Row("ResNet", "two-stage", "yes"),
    Table2Row("ViT", "end-to-end", "no"),
    Table2Row("ViT", "two-stage", "no"),
    Table2Row("ViT", "two-stage", "yes"),
)

#: paper encoder name -> the name Table 2's CSV uses
_PAPER_ARCH = {"ResNet": "ResNet-50", "ViT": "ViT-S/16"}


@dataclass
class Table2Result:
    rows: pd.DataFrame  # encoder, arch, strategy, init, acc_mean, acc_sd, n_seeds, status
    data: DataSource

    def markdown(self) -> str:
        paper = paper_table2()
        lines = ["| Encoder | Arch (ran) | Strategy | ImageNet init | Malignancy acc (%) | "
                 "Paper (%) | Note |", "|---|---|---|---|---:|---:|---|"]
        for _, r in self.rows.iterrows():
            p = paper[(paper["arch"] == _PAPER_ARCH[r["encoder"]])
                      & (paper["strategy"] == r["strategy"])
                      & (paper["imagenet_pretrain"] == r["init"])]
            ref = f"{float(p['malignancy'].iloc[0]):.2f}" if len(p) else ""
            acc = mean_sd(r["acc_mean"], r["acc_sd"] if r["n_seeds"] > 1 else None)
            lines.append(f"| {r['encoder']} | {r['arch']} | {r['strategy']} | {r['init']} | "
                         f"{acc} | {ref} | {md_text(r['status'])} |")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike, *, option: str = "--csv") -> Path:
        """Write the table as CSV (atomic, spreadsheet formulas neutralised)."""
        return write_csv(self.rows, path, option=option, index=False)


def _e2e(data: Path, arch: str, seeds: Sequence[int], cnn: dict[str, Any]) -> list[float]:
    from credanno.bench.fig4 import cnn_subset_accuracy

    df = cnn_subset_accuracy(data, [1.0], seeds, {**cnn, "arch": arch})
    return df["acc"].tolist()


@dataclass(frozen=True)
class Table2Pretraining:
    """How the two-stage rows pretrain, and which encoders every row uses.

    ``preset``: pretraining preset (None: ``paper`` on a GPU, ``cpu-tiny`` otherwise);
    ``overrides``: config fields changed on top of it; ``resnet_arch``/``vit_arch``: the
    encoders (default: ResNet-50 on the ``paper`` preset and ResNet-18 otherwise, and the
    preset's ViT); ``init_resnet``/``init_vit``: local ImageNet weights files for the rows
    with ImageNet initialisation; ``vit_run``: reuse a finished pretraining run
    (checkpoint) for the ViT two-stage row without init.
    """

    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    resnet_arch: str | None = None
    vit_arch: str | None = None
    init_resnet: str | os.PathLike | None = None
    init_vit: str | os.PathLike | None = None
    vit_run: str | os.PathLike | None = None


def _two_stage(data: Path, out: Path, arch_overrides: dict[str, Any], setup: Table2Pretraining,
               seeds: Sequence[int], device: str | None, reuse: str | os.PathLike | None,
               probe_epochs: int, progress: bool) -> list[float]:
    from credanno.embed import embed
    from credanno.eval import probe_sweep
    from credanno.eval.specs import ProbeSpec, SubsetSpec
    from credanno.pretrain import load_config, pretrain

    if reuse is not None:
        ckpt = Path(reuse)
    else:
        cfg = load_config(preset=setup.preset,
                          overrides={"data": str(data), "out": str(out / "run"),
                                     **arch_overrides, **setup.overrides})
        ckpt = pretrain(cfg, progress=progress).checkpoint
    store = embed(data=data, checkpoint=ckpt, out=out / "teacher.h5", device=device,
                  progress=progress)
    res = probe_sweep(store, SubsetSpec(fracs=[1.0], seeds=seeds),
                      ProbeSpec(epochs=probe_epochs, device=device), progress=progress)
    r = res.results
    return r[r["label"] == "malignancy"]["acc"].astype(float).tolist()


@dataclass(frozen=True)
class _Table2Run:
    """What every row of one Table 2 run shares."""

    data: Path
    out: Path
    setup: Table2Pretraining
    seeds: list[int]
    cnn: dict[str, Any]
    vit_kwargs: dict[str, Any]
    device: str | None
    probe_epochs: int
    progress: bool

    def accuracies(self, row: Table2Row, arch: str) -> list[float]:
        """One row's accuracies over seeds; a row that cannot run raises CredannoError."""
        setup = self.setup
        init = setup.init_resnet if row.encoder == "ResNet" else setup.init_vit
        if row.init == "yes" and not init:
            flag = "--init-resnet" if row.encoder == "ResNet" else "--init-vit"
            raise CredannoError(f"no local ImageNet weights (pass {flag} FILE)")
        if row.strategy == "end-to-end":
            kw = {"model_kwargs": self.vit_kwargs} if row.encoder == "ViT" else {}
            return _e2e(self.data, arch, self.seeds, {**self.cnn, **kw})
        overrides = {"arch": arch}
        if row.init == "yes":
            overrides["init"] = init
        reuse = setup.vit_run if (row.encoder == "ViT" and row.init == "no") else None
        return _two_stage(self.data, self.out / f"{row.encoder}-{row.init}".lower(), overrides,
                          setup, self.seeds, self.device, reuse, self.probe_epochs,
                          self.progress)


def run_table2(data: str | os.PathLike, out: str | os.PathLike, seeds: Sequence[int] = (0,),
               setup: Table2Pretraining | None = None, cnn: dict[str, Any] | None = None,
               device: str | None = None, probe_epochs: int = 100, progress: bool = False,
               on_row: Callable[[str], None] | None = None) -> Table2Result:
    """Run the six rows of Table 2 on a patch file; work files go under ``out``.

    ``setup``: pretraining preset and overrides, encoders, ImageNet weights files (see
    :class:`Table2Pretraining`); ``cnn``: options of the end-to-end rows.
    """
    from credanno import checks
    from credanno.bench.supervised import EndToEndClassifier
    from credanno.data.patchfile import read_patch_file
    from credanno.pretrain import load_config
    from credanno.runtime import resolve_device
    from credanno.viz.source import describe_source

    setup = Table2Pretraining() if setup is None else setup
    # every row catches CredannoError as "not run": settings are checked before any row
    if device is not None:
        resolve_device(device)
    seeds = checks.seeds(seeds)
    checks.count(probe_epochs, "--probe-epochs")
    if setup.overrides.get("epochs") is not None:
        checks.count(setup.overrides["epochs"], "--epochs")
    resolve_device(EndToEndClassifier(**(cnn or {})).device)  # and --cnn-epochs
    data, out = Path(data), Path(out)
    attrs = read_patch_file(data, images=False).attrs
    cfg = load_config(preset=setup.preset)
    resnet = setup.resnet_arch or ("resnet50" if cfg.preset == "paper" else "resnet18")
    vit = setup.vit_arch or cfg.arch
    # the end-to-end models see the same input size as the two-stage encoder
    run = _Table2Run(data, out, setup, seeds, {"image_size": cfg.eval_crop, **(cnn or {})},
                     {} if setup.vit_arch else cfg.backbone_kwargs(), device, probe_epochs,
                     progress)
    recs = []
    for row in TABLE2_ROWS:
        arch = resnet if row.encoder == "ResNet" else vit
        status, accs = "ok", []
        t0 = time.perf_counter()
        try:
            accs = run.accuracies(row, arch)
        except CredannoError as exc:
            status = f"not run: {exc}"
        a = np.asarray(accs, dtype=float)
        recs.append({"encoder": row.encoder, "arch": arch, "strategy": row.strategy,
                     "init": row.init, "acc_mean": a.mean() if len(a) else np.nan,
                     "acc_sd": a.std(ddof=1) if len(a) > 1 else np.nan, "n_seeds": len(a),
                     "status": status, "seconds": round(time.perf_counter() - t0, 1)})
        if on_row:
            acc = f"{a.mean() * 100:.2f}%" if len(a) else "-"
            on_row(f"{row.encoder} {row.strategy} init={row.init} ({arch}): {acc} {status}")
    return Table2Result(rows=pd.DataFrame(recs), data=describe_source(attrs))
