"""Pretraining configuration: TOML presets shipped with the package, overridden by flags.

A preset file (``credanno/pretrain/presets/<name>.toml``) or ``--config FILE.toml`` groups
fields into tables (``[model]``, ``[crops]``, ``[optim]``, ``[dino]``, ``[run]``); the tables
are for reading only, every field name is unique. Flags override fields last. The resolved
config is saved beside the checkpoint as ``config.json``.

Learning rate convention (DINO's): ``lr`` is the rate *per 256 images*; the optimiser's peak
rate is ``lr * batch_size / 256``. The paper's 2.5e-4 at batch 128 is therefore ``lr = 5e-4``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from credanno.errors import CredannoError
from credanno.paths import DEFAULT_PATCH_FILE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run (defaults are the paper's, section 3.1)."""

    preset: str = "paper"
    # [run]
    data: str = str(DEFAULT_PATCH_FILE)
    out: str | None = None
    seed: int = 0
    device: str | None = None          # None: cuda if available, else cpu
    epochs: int = 300
    batch_size: int = 128              # global batch, over all ranks
    init: str | None = None            # PATH or timm:NAME (ImageNet DINO weights)
    monitor_every: int = 0             # k-NN malignancy monitor every N epochs (0 = off)
    monitor_val_frac: float = 0.2      # fraction of training nodules held out for it
    monitor_k: int = 20
    amp: str = "auto"                  # auto | bf16 | fp16 | none
    compile: bool = False              # torch.compile the student and teacher
    max_steps: int = 0                 # stop after this many optimiser steps (0 = no limit)
    # [model]
    arch: str = "vit_small_patch16_224"
    img_size: int = 224
    patch_size: int = 16
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (depth)
    drop_path: float = 0.1
    out_dim: int = 65536               # K, prototypes of the DINO head
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True
    eval_resize: int = 256
    eval_crop: int = 224
    # [crops]
    global_size: int = 224
    local_size: int = 96
    local_crops: int = 8
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    local_shift: float = 1.0           # max local-crop centre offset, fraction of the free room
    rotation: float = 0.0              # max in-plane rotation of every crop, degrees (0 = off)
    nodule_views: float = 0.0          # P(crops 2.. come from another patch of the same nodule)
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # [optim]
    lr: float = 5e-4                   # per 256 images; peak = lr * batch_size / 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0             # per-parameter gradient-norm clip (0 = off)
    freeze_last_layer: int = 1
    # [dino]
    momentum_teacher: float = 0.996
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / 256

    def backbone_kwargs(self) -> dict[str, Any]:
        """The encoder's timm kwargs (the checkpoint contract; no training-only options).

        ``dynamic_img_size`` lets one encoder see global and local crops (its position
        embeddings are interpolated per input size).
        """
        return {"img_size": self.img_size, "patch_size": self.patch_size,
                "dynamic_img_size": True, **self.model_kwargs}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> PretrainConfig:
        """Check every field before anything is written; one line naming the field and source.

        The source (preset, TOML file or command line) is known when the config came from
        :func:`load_config`; a config built in code says "the config".
        """
        problem = _first_problem(self)
        if problem is not None:
            name, msg = problem
            sources = getattr(self, "_sources", {})
            source = sources.get(name, "the config")
            fix = ("change the option" if source == "the command line" else
                   "fix the TOML file" if source.startswith("config file") else "fix it")
            raise CredannoError(f"invalid pretraining config: {name} {msg}, not "
                                f"{getattr(self, name)!r} (from {source}); {fix}")
        return self


_POSITIVE_INTS = ("epochs", "img_size", "patch_size", "head_hidden_dim", "head_bottleneck_dim",
                  "head_layers", "eval_resize", "eval_crop", "global_size", "local_size",
                  "monitor_k")
_NON_NEGATIVE_INTS = ("seed", "local_crops", "monitor_every", "warmup_epochs",
                      "freeze_last_layer", "warmup_teacher_temp_epochs", "max_steps")
#: float fields -> (low, high, low inclusive, high inclusive); None = unbounded
_FLOAT_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "lr": (0.0, None, False, True), "min_lr": (0.0, None, True, True),
    "weight_decay": (0.0, None, True, True), "weight_decay_end": (0.0, None, True, True),
    "clip_grad": (0.0, None, True, True), "drop_path": (0.0, 1.0, True, False),
    "momentum_teacher": (0.0, 1.0, True, True), "center_momentum": (0.0, 1.0, True, True),
    "teacher_temp": (0.0, None, False, True), "warmup_teacher_temp": (0.0, None, False, True),
    "student_temp": (0.0, None, False, True), "monitor_val_frac": (0.0, 1.0, True, False),
    "local_shift": (0.0, 1.0, True, True), "rotation": (0.0, 180.0, True, True),
    "nodule_views": (0.0, 1.0, True, True),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _range_text(lo: float | None, hi: float | None, lo_in: bool, hi_in: bool) -> str:
    if hi is None:
        return f"must be {'>=' if lo_in else '>'} {lo:g}"
    return f"must be in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _first_problem(cfg: PretrainConfig) -> tuple[str, str] | None:
    """``(field, what is wrong)`` for the first invalid field, or None."""
    for name in _POSITIVE_INTS:
        if not _is_int(getattr(cfg, name)) or getattr(cfg, name) < 1:
            return name, "must be an integer >= 1"
    for name in _NON_NEGATIVE_INTS:
        if not _is_int(getattr(cfg, name)) or getattr(cfg, name) < 0:
            return name, "must be an integer >= 0"
    if not _is_int(cfg.batch_size) or cfg.batch_size < 2:
        return "batch_size", "must be an integer >= 2"
    if not _is_int(cfg.out_dim) or cfg.out_dim < 2:
        return "out_dim", "(K, the prototypes) must be an integer >= 2"
    for name, (lo, hi, lo_in, hi_in) in _FLOAT_RANGES.items():
        v = getattr(cfg, name)
        ok = _is_real(v) and (v >= lo if lo_in else v > lo) and \
            (hi is None or (v <= hi if hi_in else v < hi))
        if not ok:
            return name, _range_text(lo, hi, lo_in, hi_in)
    for name in ("global_scale", "local_scale", "blur_sigma"):
        v = getattr(cfg, name)
        pair = isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_real(x) for x in v)
        if not pair or not 0 < v[0] <= v[1] or (name != "blur_sigma" and v[1] > 1):
            upper = "" if name == "blur_sigma" else " <= 1"
            return name, f"must be two finite numbers 0 < low <= high{upper}"
    for name in ("img_size", "global_size", "local_size", "eval_crop"):
        if getattr(cfg, name) % cfg.patch_size:
            return name, f"must be a multiple of the patch size {cfg.patch_size}"
    if cfg.eval_crop > cfg.eval_resize:
        return "eval_crop", f"must be <= eval_resize ({cfg.eval_resize})"
    if not isinstance(cfg.arch, str) or not cfg.arch.strip():
        return "arch", "must be a timm architecture name"
    if not isinstance(cfg.data, str) or not cfg.data.strip():
        return "data", "must be a patch file path"
    if cfg.amp not in ("auto", "bf16", "fp16", "none"):
        return "amp", "must be auto, bf16, fp16 or none"
    if not isinstance(cfg.model_kwargs, dict) or \
            not all(isinstance(k, str) for k in cfg.model_kwargs):
        return "model_kwargs", "must be a table of timm keyword arguments"
    for name in ("out", "device", "init"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            return name, "must be a non-empty string"
    if not isinstance(cfg.compile, bool) or not isinstance(cfg.norm_last_layer, bool):
        return ("compile" if not isinstance(cfg.compile, bool) else "norm_last_layer",
                "must be true or false")
    return None


FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}

#: Settings that may change when a run is resumed: where and how fast it runs, what it
#: reports, the start weights (a resumed run has its weights already) and where this call
#: stops (``max_steps``). Every other field changes the result, so a resume with another
#: value is refused.
RESUMABLE_CHANGES = frozenset({"out", "device", "monitor_every", "monitor_val_frac",
                               "monitor_k", "compile", "amp", "init", "max_steps"})
#: Run facts saved in config.json beside the config fields (not settings).
RUN_FACTS = ("data_sha256",)


def result_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The fields of a config dict (or a saved ``config.json``) that decide a run's result:
    two runs may continue each other only where these are equal."""
    return {k: v for k, v in cfg.items() if k not in RESUMABLE_CHANGES and k not in RUN_FACTS}


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise CredannoError(f"config file {path} not found; pass an existing --config") from None
    except OSError as exc:  # a folder, no permission, ...
        raise CredannoError(f"cannot read config file {path} ({exc.strerror}); pass a readable "
                            "--config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CredannoError(f"{path} is not valid TOML ({reason}); fix the file") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        # a table groups fields, except model_kwargs which is itself a table
        is_group = isinstance(value, dict) and key != "model_kwargs"
        items = value.items() if is_group else [(key, value)]
        for k, v in items:
            flat[k] = v
    return flat


def _apply(cfg: PretrainConfig, values: dict[str, Any], source: str) -> None:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise CredannoError(f"unknown pretraining setting(s) {unknown} in {source}; "
                            f"valid ones: {', '.join(FIELDS)}")
    for key, value in values.items():
        if value is None and key not in ("out", "device", "init"):
            continue
        default = getattr(PretrainConfig(), key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, dict):
            ok = isinstance(value, dict)
            value = dict(value) if ok else value
        elif isinstance(default, list):
            ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            value = [float(v) for v in value] if ok else value
        else:
            ok = value is None or isinstance(value, (str, os.PathLike))
            value = None if value is None else str(value)
        if not ok:
            raise CredannoError(f"setting {key}={value!r} in {source} has the wrong type; "
                                f"expected a {type(default).__name__}")
        setattr(cfg, key, value)
        cfg._sources[key] = source


def default_preset() -> str:
    """``paper`` where the default device is a GPU, ``cpu-tiny`` otherwise."""
    from credanno.runtime import default_device

    return "paper" if default_device() == "cuda" else "cpu-tiny"


def load_config(preset: str | None = None, file: str | os.PathLike | None = None,
                overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Preset (default: :func:`default_preset`) <- ``file`` (TOML) <- ``overrides``."""
    name = preset or default_preset()
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        raise CredannoError(f"unknown preset {name!r}; choose one of "
                            f"{', '.join(available_presets())} or pass --config FILE.toml")
    cfg = PretrainConfig(preset=name)
    cfg._sources = {}
    _apply(cfg, _read_toml(path), f"preset {name}")
    cfg.preset = name
    if file is not None:
        _apply(cfg, _read_toml(Path(file)), f"config file {file}")
    if overrides:
        _apply(cfg, dict(overrides), "the command line")
    return cfg.validate()


def save_config(cfg: PretrainConfig, path: str | os.PathLike,
                extra: dict[str, Any] | None = None) -> None:
    """``config.json``: the resolved config, plus ``extra`` run facts (the data's sha256)."""
    from credanno._atomic import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps({**cfg.to_dict(), **(extra or {})}, indent=2) + "\n")
