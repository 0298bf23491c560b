"""Declared stages and the one rule that decides whether a stage's outputs can be reused.

A :class:`Stage` names what it reads (``inputs``), what it writes (``outputs``), the
settings its outputs depend on besides those files (``params``) and the function that makes
them. :class:`StageRunner` runs a list of stages in order, timing each and reporting one
progress line when it starts and one when it ends.

The freshness rule, the only one the demo has: a stage that declares outputs is skipped
when they all exist and a manifest written when they were made records the same content
identities of its inputs, the same params, and the same identities of the outputs
themselves (:func:`credanno.cache.content_identity`: a patch file's or store's
``content_id``, else the sha256 of the file). Sizes and modification times play no part: a
file rewritten with other content can keep both (``os.utime``, ``cp -p``). A stage that
declares no outputs (evaluation, figures, the report, whose results later stages need in
memory) always runs; pretraining's resume logic stays in :mod:`credanno.pretrain`. Outputs
found without any manifest are made again unless the stage can check them against its
params (``Stage.adopt``: the demo's patch file records its source); the demo needs that
for folders of older versions, whose finished pretraining run is tied to the patch file's
bytes.

Manifests are small JSON files, one per stage, written atomically after the stage's
outputs, and removed before a stage reruns, so a killed run never leaves a manifest that
vouches for half-made outputs.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from credanno.cache import content_identity
from credanno.errors import CredannoWarning
from credanno.outputs import write_json

#: Bump when the manifest layout changes; older manifests then read as stale.
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline.

    ``run`` makes the outputs; it may return ``True``/``False`` to say whether it found its
    work already done by its own logic (pretraining's resume, a given patch file), which is
    recorded like a freshness decision. ``parts`` are sub-stages timed as this one stage
    (each judged by the freshness rule on its own), run before ``run`` if both are given.
    ``title`` is the progress line and the row of the timing table (default ``name``).
    ``adopt`` decides whether outputs found without any manifest (left by an older
    credanno, or after ``cache/`` was deleted) were made with these params, when the
    outputs record them (a patch file its source); without it such outputs are made again.
    """

    name: str
    run: Callable[[], bool | None] | None = None
    inputs: tuple[Path, ...] = ()
    outputs: tuple[Path, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    parts: tuple[Stage, ...] = ()
    title: str = ""
    adopt: Callable[[], bool] | None = None

    @property
    def label(self) -> str:
        return self.title or self.name


def _jsonable(obj: Any) -> Any:
    """``obj`` as JSON reads it back (tuples as lists, paths as strings), for comparing."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


class Freshness:
    """The freshness rule over manifests kept in ``folder`` (one ``<stage>.json`` each)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def manifest(self, stage: Stage) -> Path:
        return self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', stage.name)}.json"

    def record(self, stage: Stage) -> dict[str, Any]:
        """What the manifest of ``stage`` holds when its outputs match its inputs now."""
        return _jsonable({"format": MANIFEST_VERSION, "stage": stage.name,
                          "params": dict(stage.params),
                          "inputs": [content_identity(p) for p in stage.inputs],
                          "outputs": [content_identity(p) for p in stage.outputs]})

    def is_fresh(self, stage: Stage) -> bool:
        """The stage's outputs exist and were made from the inputs and params it has now."""
        paths = (*stage.inputs, *stage.outputs)
        if not stage.outputs or not all(p.is_file() for p in paths):
            return False
        try:
            saved = json.loads(self.manifest(stage).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False  # no manifest, or a damaged one: make the outputs again
        return saved == self.record(stage)

    def _adopted(self, stage: Stage) -> bool:
        """Outputs without a manifest that ``stage.adopt`` vouches for get one now."""
        paths = (*stage.inputs, *stage.outputs)
        if (stage.adopt is None or self.manifest(stage).exists()
                or not all(p.is_file() for p in paths) or not stage.adopt()):
            return False
        write_json(self.record(stage), self.manifest(stage), option="--out")
        return True

    def run(self, stage: Stage) -> bool | None:
        """Skip ``stage`` if fresh (True), else run it and write its manifest (False)."""
        if not stage.outputs:  # nothing to reuse: always runs
            return stage.run() if stage.run else None
        if self.is_fresh(stage) or self._adopted(stage):
            return True
        self.manifest(stage).unlink(missing_ok=True)
        if stage.run:
            stage.run()
        write_json(self.record(stage), self.manifest(stage), option="--out")
        return False


class StageRunner:
    """Runs stages in order: times each, reports progress, applies :class:`Freshness`.

    ``timings`` maps each stage's label to seconds, ``reused`` each stage (and part) that
    said whether it reused earlier work to that answer, ``warnings`` the
    :class:`~credanno.errors.CredannoWarning` messages raised inside stages, prefixed by
    the stage (collected for a report instead of flooding the terminal).
    """

    def __init__(self, freshness: Freshness,
                 on_stage: Callable[[str], None] | None = None) -> None:
        self.n, self.i, self.freshness, self.on_stage = 0, 0, freshness, on_stage
        self.timings: dict[str, float] = {}
        self.reused: dict[str, bool] = {}
        self.warnings: list[str] = []

    def run_all(self, stages: Sequence[Stage]) -> None:
        self.n += len(stages)
        for stage in stages:
            self.run(stage)

    def run(self, stage: Stage) -> None:
        self.i += 1
        self._say(f"[{self.i}/{self.n}] {stage.label} ...")
        t0 = time.perf_counter()
        # tiny label fractions on purpose leave classes unlabelled and clamp k: collect
        # those warnings for the report instead of flooding the terminal
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CredannoWarning)
            for part in stage.parts:
                self._note(part.name, self.freshness.run(part))
            self._note(stage.name, self.freshness.run(stage))
        for w in caught:
            if issubclass(w.category, CredannoWarning):
                self.warnings.append(f"{stage.label.split(' (')[0]}: {w.message}")
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        self.timings[stage.label] = time.perf_counter() - t0
        self._say(f"[{self.i}/{self.n}] {stage.label}: done in {self.timings[stage.label]:.1f} s")

    def _note(self, name: str, reused: bool | None) -> None:
        if reused is not None:
            self.reused[name] = reused

    def _say(self, line: str) -> None:
        if self.on_stage:
            self.on_stage(line)
