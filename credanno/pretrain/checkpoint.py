"""The pretraining checkpoint: the contract between ``credanno pretrain`` and ``credanno embed``.

``runs/NAME/checkpoint.pt`` is a ``torch.save`` dict (see docs/architecture.md):

- ``format`` = ``"credanno.dino"``, ``format_version``, ``epoch`` (completed epochs),
  ``config`` (the resolved :class:`~credanno.pretrain.config.PretrainConfig` as a dict);
- ``backbone`` = ``{"arch", "kwargs"}`` so that
  ``timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)`` rebuilds the encoder;
- ``teacher_backbone`` / ``student_backbone``: plain encoder state dicts (no DDP prefix);
- ``eval_transform``: :meth:`credanno.transforms.EvalTransform.to_dict` of the encoder's input;
- training state: ``teacher_head``, ``student_head``, ``optimizer``, ``centre``, ``scaler``,
  ``metrics``, ``data_sha256``. No generator state: all randomness is counter-based
  (:mod:`credanno.augment.rng`), so these are everything a bit-exact resume needs.

Only tensors and plain Python values are stored, so the file loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from credanno._atomic import atomic_path
from credanno.augment.rng import forked_seed
from credanno.errors import CredannoError
from credanno.paths import RUNS_DIR
from credanno.transforms import EvalTransform

FORMAT = "credanno.dino"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
WHICH = ("teacher", "student", "random")


@dataclass
class BackboneInfo:
    """Where an encoder came from: enough to rebuild it and to cite it in provenance."""

    arch: str
    kwargs: dict[str, Any]
    checkpoint: Path
    sha256: str
    which: str
    epoch: int
    eval_transform: EvalTransform = field(default_factory=EvalTransform)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "kwargs": dict(self.kwargs), "checkpoint": str(self.checkpoint),
                "sha256": self.sha256, "which": self.which, "epoch": self.epoch,
                "eval_transform": self.eval_transform.to_dict()}


def create_backbone(arch: str, kwargs: dict[str, Any] | None = None, **train_kwargs) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)`` with one-line errors.

    ``train_kwargs`` (e.g. ``drop_path_rate``) are training-only and not part of the contract.
    """
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"{arch.split('_')[0]}_*")[:5] if arch else []
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise CredannoError(f"unknown timm architecture {arch!r}{hint}; pass --arch with a name "
                            "from timm.list_models(), e.g. vit_small_patch16_224")
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0,
                                 **dict(kwargs or {}), **train_kwargs)
    except TypeError as exc:
        raise CredannoError(f"timm architecture {arch!r} rejects the settings {kwargs}: {exc}; "
                            "choose a ViT-style --arch or drop the size options") from None


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temp file, then rename) after checking the contract keys."""
    missing = [k for k in ("epoch", "config", "backbone", "teacher_backbone",
                           "student_backbone", "eval_transform") if k not in state]
    if missing:
        raise CredannoError(f"checkpoint state lacks {missing}; this is a credanno bug, report it")
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def checkpoint_path(path_or_run_dir: str | os.PathLike) -> Path:
    """The checkpoint file named by a run folder or by the file itself."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise CredannoError(f"no pretraining checkpoint at {path}; run `credanno pretrain` "
                            "or pass --checkpoint runs/NAME")
    return path


def read_checkpoint(path_or_run_dir: str | os.PathLike,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint dict (tensors and plain values only).

    Every contract field is checked here, so that a damaged or foreign file with the right
    format marker fails with one line naming the field rather than deep inside torch or timm.
    """
    path = checkpoint_path(path_or_run_dir)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/foreign files
        raise CredannoError(f"{path} is not a readable checkpoint ({type(exc).__name__}); "
                            "re-run `credanno pretrain`") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CredannoError(f"{path} is not a credanno DINO checkpoint; pass a runs/NAME folder "
                            "written by `credanno pretrain`")
    version = state.get("format_version")
    if not _is_int(version) or version < 1:
        raise bad_field(path, "format_version", f"is {version!r}, not a positive integer")
    if version > FORMAT_VERSION:
        raise CredannoError(f"{path} has a newer checkpoint format; upgrade credanno")
    _validate_contract(path, state)
    return state


def bad_field(path: Path, name: str, problem: str) -> CredannoError:
    """The one-line error for a damaged checkpoint field."""
    return CredannoError(f"{path} is a damaged checkpoint: {name} {problem}; re-run "
                         "`credanno pretrain` or pass another checkpoint")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_contract(path: Path, state: dict[str, Any]) -> None:
    epoch = state.get("epoch")
    if not _is_int(epoch) or epoch < 0:
        raise bad_field(path, "epoch", f"is {epoch!r}, not an integer >= 0")
    if not isinstance(state.get("config"), dict):
        raise bad_field(path, "config", "is missing or not a dict")
    backbone = state.get("backbone")
    if not isinstance(backbone, dict):
        raise bad_field(path, "backbone", "is missing or not a dict")
    arch = backbone.get("arch")
    if not isinstance(arch, str) or not arch:
        raise bad_field(path, "backbone.arch", f"is {arch!r}, not a timm architecture name")
    kwargs = backbone.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise bad_field(path, "backbone.kwargs", "is not a dict of timm keyword arguments")
    for name in ("teacher_backbone", "student_backbone"):
        sd = state.get(name)
        if not isinstance(sd, dict) or not sd or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise bad_field(path, name, "is missing or not a state dict of tensors")
    parse_eval_transform(path, state.get("eval_transform"))


def parse_eval_transform(path: Path, d: Any) -> EvalTransform:
    """The checkpoint's eval transform; a damaged one is an error, never the default."""
    fields = {"resize": int, "crop": int, "mean": float, "std": float, "channels": int}
    if not isinstance(d, dict) or set(fields) - set(d):
        raise bad_field(path, "eval_transform", f"is not a dict with {', '.join(fields)}")
    for key, kind in fields.items():
        v = d[key]
        ok = (_is_int(v) if kind is int else
              isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        if not ok:
            raise bad_field(path, f"eval_transform.{key}",
                            f"is {v!r}, not a finite {kind.__name__}")
    if not (1 <= d["crop"] <= d["resize"]) or d["std"] <= 0 or d["channels"] not in (1, 3):
        raise bad_field(path, "eval_transform", f"has impossible values {d}")
    return EvalTransform.from_dict(d)


def check_state_dict(path: Path, name: str, module: nn.Module, sd: dict[str, Any]) -> None:
    """Refuse a state dict that does not fit ``module`` with one line (torch's is many)."""
    if not isinstance(sd, dict):
        raise bad_field(path, name, "is missing or not a state dict")
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and (not isinstance(sd[k], torch.Tensor)
                                                 or sd[k].shape != expected[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]!r})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected),
                  ("wrong-shape tensors", wrong)) if v]
        raise bad_field(path, name, f"does not fit the model: {', '.join(parts)}")


def latest_run(root: str | os.PathLike = RUNS_DIR) -> Path:
    """The newest run folder under ``root`` that holds a checkpoint (by checkpoint time)."""
    root = Path(root)
    found = sorted(root.glob(f"*/{CHECKPOINT_NAME}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CredannoError(f"no pretraining run with a {CHECKPOINT_NAME} under {root}/; "
                            "run `credanno pretrain` first or pass --checkpoint")
    return found[-1].parent


def _sha256(path: Path) -> str:
    from credanno.data.patchfile import file_sha256

    return file_sha256(path)


def load_backbone(path_or_run_dir: str | os.PathLike, which: str = "teacher",
                  map_location: str | torch.device = "cpu") -> tuple[nn.Module, BackboneInfo]:
    """Rebuild a checkpoint's encoder in eval mode.

    ``which``: ``"teacher"`` (the paper's choice for features), ``"student"``, or ``"random"``
    (the same architecture with timm's initialisation under seed 0: an untrained baseline).
    """
    if which not in WHICH:
        raise CredannoError(f"unknown encoder {which!r}; choose one of {', '.join(WHICH)}")
    path = checkpoint_path(path_or_run_dir)
    state = read_checkpoint(path, map_location=map_location)
    arch = state["backbone"]["arch"]
    kwargs = dict(state["backbone"].get("kwargs", {}))
    with forked_seed(0):  # "random" is timm's initialisation under seed 0
        try:
            model = create_backbone(arch, kwargs)
        except (ValueError, RuntimeError, AssertionError, ZeroDivisionError) as exc:
            # timm validates kwargs with asserts and arithmetic, not with one exception type
            raise bad_field(path, "backbone.kwargs",
                            f"{kwargs} do not build {arch} ({type(exc).__name__})") from None
    if which != "random":
        check_state_dict(path, f"{which}_backbone", model, state[f"{which}_backbone"])
        model.load_state_dict(state[f"{which}_backbone"])
    model.to(map_location).eval()
    info = BackboneInfo(arch=arch, kwargs=kwargs, checkpoint=path, sha256=_sha256(path),
                        which=which, epoch=state["epoch"],
                        eval_transform=parse_eval_transform(path, state["eval_transform"]))
    return model, info
