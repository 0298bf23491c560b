"""Stage 1: self-supervised DINO pretraining of a timm ViT on the nodule patches.

Public API::

    from credanno.pretrain import load_config, pretrain
    cfg = load_config(preset="cpu-tiny", overrides={"epochs": 10})
    result = pretrain(cfg)          # -> RunResult(run_dir, checkpoint, metrics)

The checkpoint contract that ``credanno embed`` reads lives in
:mod:`credanno.pretrain.checkpoint` (``latest_run``, ``load_backbone``).
Names are resolved lazily so that importing the checkpoint reader stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PretrainConfig": "credanno.pretrain.config",
    "load_config": "credanno.pretrain.config",
    "pretrain": "credanno.pretrain.train",
    "RunResult": "credanno.pretrain.train",
    "latest_run": "credanno.pretrain.checkpoint",
    "load_backbone": "credanno.pretrain.checkpoint",
    "BackboneInfo": "credanno.pretrain.checkpoint",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'credanno.pretrain' has no attribute {name!r}")
