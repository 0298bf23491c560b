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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from credanno.bench.paper import paper_table2
from credanno.errors import CredannoError
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
            acc = ""
            if np.isfinite(r["acc_mean"]):
                acc = f"{r['acc_mean'] * 100:.2f}"
                if r["n_seeds"] > 1 and np.isfinite(r["acc_sd"]):
                    acc += f" ± {r['acc_sd'] * 100:.2f}"
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


def _two_stage(data: Path, out: Path, arch_overrides: dict[str, Any], preset: str | None,
               seeds: Sequence[int], pretrain_overrides: dict[str, Any], device: str | None,
               reuse: str | os.PathLike | None, probe_epochs: int,
               progress: bool) -> list[float]:
    from credanno.embed import embed
    from credanno.eval import probe_sweep
    from credanno.pretrain import load_config, pretrain

    if reuse is not None:
        ckpt = Path(reuse)
    else:
        cfg = load_config(preset=preset, overrides={"data": str(data), "out": str(out / "run"),
                                                    **arch_overrides, **pretrain_overrides})
        ckpt = pretrain(cfg, progress=progress).checkpoint
    store = embed(data=data, checkpoint=ckpt, out=out / "teacher.h5", device=device,
                  progress=progress)
    res = probe_sweep(store, fracs=[1.0], seeds=list(seeds), epochs=probe_epochs,
                      device=device or "cpu", progress=progress)
    r = res.results
    return r[r["label"] == "malignancy"]["acc"].astype(float).tolist()


def run_table2(data: str | os.PathLike, out: str | os.PathLike, seeds: Sequence[int] = (0,),
               preset: str | None = None, resnet_arch: str | None = None,
               vit_arch: str | None = None, init_resnet: str | None = None,
               init_vit: str | None = None, vit_run: str | os.PathLike | None = None,
               cnn: dict[str, Any] | None = None,
               pretrain_overrides: dict[str, Any] | None = None, device: str | None = None,
               probe_epochs: int = 100, progress: bool = False,
               on_row: Callable[[str], None] | None = None) -> Table2Result:
    """Run the six rows of Table 2 on a patch file; work files go under ``out``.

    ``preset``: pretraining preset (None: ``paper`` on a GPU, ``cpu-tiny`` otherwise);
    the ViT is that preset's encoder unless ``vit_arch`` is given; the ResNet is ResNet-50
    on the ``paper`` preset and ResNet-18 otherwise. ``vit_run``: reuse a finished
    pretraining run (checkpoint) for the ViT two-stage row without init.
    """
    from credanno import checks
    from credanno.bench.supervised import EndToEndClassifier
    from credanno.data.patchfile import read_patch_file
    from credanno.pretrain import load_config
    from credanno.runtime import resolve_device
    from credanno.viz.source import describe_source

    # every row catches CredannoError as "not run": settings are checked before any row
    if device is not None:
        resolve_device(device)
    seeds = checks.seeds(seeds)
    checks.count(probe_epochs, "--probe-epochs")
    if (pretrain_overrides or {}).get("epochs") is not None:
        checks.count(pretrain_overrides["epochs"], "--epochs")
    resolve_device(EndToEndClassifier(**(cnn or {})).device)  # and --cnn-epochs
    data, out = Path(data), Path(out)
    attrs = read_patch_file(data, images=False).attrs
    cfg = load_config(preset=preset)
    resnet = resnet_arch or ("resnet50" if cfg.preset == "paper" else "resnet18")
    vit = vit_arch or cfg.arch
    vit_kwargs = {} if vit_arch else cfg.backbone_kwargs()
    # the end-to-end models see the same input size as the two-stage encoder
    size = cfg.eval_crop
    cnn = {"image_size": size, **(cnn or {})}
    recs = []
    for row in TABLE2_ROWS:
        arch = resnet if row.encoder == "ResNet" else vit
        init = init_resnet if row.encoder == "ResNet" else init_vit
        status, accs = "ok", []
        t0 = time.perf_counter()
        try:
            if row.init == "yes" and not init:
                flag = "--init-resnet" if row.encoder == "ResNet" else "--init-vit"
                status = f"not run: no local ImageNet weights (pass {flag} FILE)"
            elif row.strategy == "end-to-end":
                kw = {"model_kwargs": vit_kwargs} if row.encoder == "ViT" else {}
                accs = _e2e(data, arch, seeds, {**cnn, **kw})
            else:
                overrides = {"arch": arch}
                if row.init == "yes":
                    overrides["init"] = init
                reuse = vit_run if (row.encoder == "ViT" and row.init == "no") else None
                accs = _two_stage(data, out / f"{row.encoder}-{row.init}".lower(), overrides,
                                  preset, seeds, dict(pretrain_overrides or {}), device, reuse,
                                  probe_epochs, progress)
        except CredannoError as exc:
            status = f"not run: {exc}"
        a = np.asarray(accs, dtype=float)
        recs.append({"encoder": row.encoder, "arch": arch, "strategy": row.strategy,
                     "init": row.init, "acc_mean": a.mean() if len(a) else np.nan,
                     "acc_sd": a.std(ddof=1) if len(a) > 1 else np.nan, "n_seeds": len(a),
                     "status": status})
        recs[-1]["seconds"] = round(time.perf_counter() - t0, 1)
        if on_row:
            acc = f"{a.mean() * 100:.2f}%" if len(a) else "-"
            on_row(f"{row.encoder} {row.strategy} init={row.init} ({arch}): {acc} {status}")
    return Table2Result(rows=pd.DataFrame(recs), data=describe_source(attrs))
