"""Default locations of the pipeline's artefacts, relative to the working directory.

Each stage reads what the previous one wrote: ``data/`` (patch files) ->
``runs/`` (pretraining checkpoints) -> ``stores/`` (feature stores) -> ``results/``.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path("data")
RUNS_DIR = Path("runs")
STORES_DIR = Path("stores")
RESULTS_DIR = Path("results")

#: The patch file that later stages read when none is named.
DEFAULT_PATCH_FILE = DATA_DIR / "phantom.h5"


def cache_dir() -> Path:
    """Where derived tables are cached (``$CREDANNO_CACHE``, else ``~/.cache/credanno``)."""
    root = os.environ.get("CREDANNO_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "credanno"


def newest(pattern: str, root: Path) -> Path | None:
    """The most recently modified path under ``root`` matching ``pattern``, or None."""
    if not root.exists():
        return None
    found = [p for p in root.glob(pattern)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
