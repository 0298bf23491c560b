"""The whole cRedAnno pipeline in one call, everything under one folder, with ``report.md``.

prepare (phantom) -> pretrain (DINO; ``cpu-tiny`` on a CPU, ``paper`` on a GPU) -> embed
(the teacher, plus two baselines: the same architecture with random weights, and raw
pixels) -> k-NN and trained predictors over the paper's label fractions and seeds ->
t-SNE (Fig. 3) -> Table 1, Fig. 2, Fig. 4 -> ``report.md`` that links the figures and
compares pretrained, random and pixel features on malignancy.

The stages are declared in :func:`credanno.demo.pipeline.declare_stages` (name, inputs,
outputs, function) and run by :class:`credanno.demo.stages.StageRunner`. A second call
reuses the patch file and the stores when they were made from the same inputs (by content,
:mod:`credanno.demo.stages`), and the finished pretraining run (pretraining's own resume),
so it only redoes the evaluation and pictures. ``report.md`` is rendered from the template
``credanno/demo/report.md`` (:mod:`credanno.demo.report`); the numbers it shows come from
:mod:`credanno.bench` (the encoder comparison from :mod:`credanno.bench.compare`).
Layout of ``out``::

    data/<source>.h5     runs/demo/       stores/{teacher,random,pixels}.h5
    figures/*.png        tables/*.csv     report.md
    cache/stages/*.json  (what each reusable stage was made from)   cache/tsne/
"""

from credanno.demo.pipeline import (
    DEMO_CNN,
    DEMO_CNN_FRACS,
    DEMO_FRACS,
    DemoResult,
    DemoSpec,
    declare_stages,
    run_demo,
)
from credanno.demo.stages import Freshness, Stage, StageRunner

__all__ = ["DEMO_CNN", "DEMO_CNN_FRACS", "DEMO_FRACS", "DemoResult", "DemoSpec", "Freshness",
           "Stage", "StageRunner", "declare_stages", "run_demo"]
