"""The one way weights files enter a model: ``embed --weights``, ``pretrain --init`` and the
end-to-end baseline all call :func:`load_weights`.

The steps, each a function of its own:

- :func:`read_state`: a local file (``.pt``/``.pth``/``.bin`` read with ``weights_only=True``,
  so no pickled code runs; ``.safetensors``) or ``timm:NAME`` (timm's own pretrained weights,
  a download) -> a state dict of tensors and a short name of its source;
- :func:`unwrap`: the backbone inside a checkpoint -- DINO's training checkpoints
  (``teacher``, preferred, or ``student``), ``state_dict`` / ``model`` wrappers, a credanno
  checkpoint's ``teacher_backbone``;
- :func:`strip_prefixes`: DDP / DINO / ``torch.compile`` prefixes (``module.``,
  ``backbone.``, ``model.``, ``encoder.``, ``_orig_mod.``);
- :func:`load_into`: timm's ``checkpoint_filter_fn`` of the model's family converts the
  layout to the architecture (Meta's DINOv2 files: ``mask_token`` dropped, registers split;
  position embeddings resampled to the model's token grid, patch kernels to its patch size),
  then one strictness rule: every backbone tensor must fit (missing, unexpected or
  wrong-shape keys are a one-line error naming them); classifier / DINO-head tensors that do
  not fit are dropped with a :class:`~credanno.errors.CredannoWarning` saying so.

Only weights are loaded: epochs, optimiser state and schedules in a checkpoint are ignored.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from credanno.errors import CredannoError, CredannoWarning

#: Wrapper prefixes removed from every key (repeatedly: ``module.backbone.`` is two).
PREFIXES = ("module.", "backbone.", "model.", "encoder.", "_orig_mod.")
#: Keys of classifiers and DINO projection heads: dropped, with a warning, when they do not fit.
HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_dist.", "fc_norm_head.")
#: Checkpoint entries that hold the backbone, in order of preference (DINO's teacher first,
#: as DINO and the paper evaluate the teacher).
WRAPPERS = ("teacher", "state_dict", "model", "teacher_backbone", "student")

State = dict[str, torch.Tensor]


@dataclass
class LoadReport:
    """What :func:`load_into` did: ``adapted`` lists the tensors timm reshaped
    (``"pos_embed (1, 65, 32) -> (1, 17, 32)"``), ``dropped`` the head tensors left out."""

    source: str
    tensors: int
    adapted: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_weights(model: nn.Module, spec: str | os.PathLike, *, option: str = "--weights",
                 credanno_checkpoints: bool = True) -> LoadReport:
    """Load the weights named by ``spec`` (file or ``timm:NAME``) into ``model`` in place.

    ``option`` names the command-line option in error messages. With
    ``credanno_checkpoints=False`` a credanno pretraining checkpoint is refused (``embed``
    reads those with ``--checkpoint``, which also restores their evaluation transform).
    """
    state, source = read_state(spec, option=option, credanno_checkpoints=credanno_checkpoints)
    return load_into(model, state, source=source)


# -- reading --------------------------------------------------------------------------------

def read_state(spec: str | os.PathLike, *, option: str = "--weights",
               credanno_checkpoints: bool = True) -> tuple[State, str]:
    """The backbone state dict named by ``spec``, unwrapped and prefix-free, and its source."""
    text = str(spec)
    if text.startswith("timm:"):
        return _timm_state(text[5:], option), text
    path = Path(text)
    raw = _read_file(path, option)
    if isinstance(raw, dict) and raw.get("format") == "credanno.dino" \
            and not credanno_checkpoints:
        raise CredannoError(f"{path} is a credanno pretraining checkpoint; embed it with "
                            f"--checkpoint {path} instead of {option}")
    state = unwrap(raw)
    if not state:
        raise CredannoError(f"{path} holds no state dict of tensors; pass a DINO, DINOv2 or "
                            f"timm backbone checkpoint to {option}")
    return strip_prefixes(state), str(path)


def _read_file(path: Path, option: str) -> Any:
    if not path.exists():
        raise CredannoError(f"weights file {path} not found; pass an existing {option} file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        # DINO's training checkpoints pickle their argparse.Namespace of arguments
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # only the read of the user's file is inside:
        # torch's unpickler and safetensors raise many types (UnpicklingError, struct.error,
        # RuntimeError, SafetensorError, ...) for a file that is not theirs
        raise CredannoError(f"cannot read weights {path} ({type(exc).__name__}); pass a "
                            f".pth/.pt state dict or a .safetensors file to {option}") from None


def _timm_state(name: str, option: str) -> State:
    """timm's pretrained weights for ``name`` (needs the network)."""
    import timm

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        raise CredannoError(f"{option} timm:{name} needs a download but HF_HUB_OFFLINE is set; "
                            f"download the weights elsewhere and pass {option} FILE")
    if not timm.is_model(name):
        raise CredannoError(f"unknown timm model {name!r} for {option}; pass a name from "
                            "timm.list_pretrained(), e.g. vit_small_patch16_224.dino")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CredannoError(f"could not download timm weights {name!r} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                            f"check the network or pass {option} FILE") from None
    return model.state_dict()


def unwrap(raw: Any) -> State:
    """The tensors of the backbone state dict inside ``raw`` (empty when there is none)."""
    if not isinstance(raw, dict):
        return {}
    for key in WRAPPERS:
        if isinstance(raw.get(key), dict):
            return unwrap(raw[key])
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def strip_prefixes(state: State) -> State:
    """Keys without DDP (``module.``), DINO (``backbone.``) and other wrapper prefixes."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


# -- loading --------------------------------------------------------------------------------

def family_filter(model: nn.Module) -> Callable[[State, nn.Module], State] | None:
    """timm's ``checkpoint_filter_fn`` for ``model``'s family (module), if it has one."""
    module = sys.modules.get(type(model).__module__)
    if module is None or not module.__name__.startswith("timm."):
        return None
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def load_into(model: nn.Module, state: State, *, source: str) -> LoadReport:
    """Convert ``state`` with timm's filter for ``model``, check it fits, load it in place."""
    before = {k: tuple(v.shape) for k, v in state.items()}
    state = _filtered(model, state, source)
    target = model.state_dict()
    fits, dropped, problems = _sort_keys(model, state, target)
    if problems:
        raise CredannoError(f"weights {source} do not fit the architecture {_arch(model)} "
                            f"({'; '.join(problems)}); pass weights of the same architecture "
                            "and size, or the architecture and size options of the weights")
    if dropped:
        plural = "s" if len(dropped) != 1 else ""
        warnings.warn(f"dropped {len(dropped)} head tensor{plural} of {source} that the model "
                      f"has no place for ({_few(dropped)}); the backbone is loaded",
                      CredannoWarning, stacklevel=3)
    model.load_state_dict(fits, strict=False)
    adapted = [f"{k} {before[k]} -> {tuple(v.shape)}" for k, v in fits.items()
               if k in before and before[k] != tuple(v.shape)]
    return LoadReport(source, len(fits), adapted, dropped)


def _filtered(model: nn.Module, state: State, source: str) -> State:
    fn = family_filter(model)
    if fn is None:
        return dict(state)
    try:
        # a copy: timm's converters pop keys (DINOv2's mask_token) from what they are given
        return fn(dict(state), model)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise CredannoError(f"weights {source} do not fit the architecture {_arch(model)} "
                            f"(timm's conversion failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); pass "
                            "weights of the same architecture") from None


def _sort_keys(model: nn.Module, state: State,
               target: State) -> tuple[State, list[str], list[str]]:
    """(tensors that fit, head tensors dropped, one text per kind of misfit)."""
    fits: State = {}
    dropped, unexpected, wrong = [], [], []
    for key, value in state.items():
        if key in target and target[key].shape == value.shape:
            fits[key] = value
        elif key.startswith(HEAD_PREFIXES + _classifier_prefixes(model)):
            dropped.append(key)
        elif key in target:
            wrong.append(key)
        else:
            unexpected.append(key)
    own_head = _classifier_prefixes(model) or HEAD_PREFIXES
    # a head the file does not fill stays as initialised; num_batches_tracked is bookkeeping
    missing = [k for k in target if k not in fits and not k.startswith(own_head)
               and not k.endswith("num_batches_tracked")]
    problems = [f"{label}: {_few(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if keys]
    return fits, dropped, problems


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The model's own classifier module names (timm's ``pretrained_cfg['classifier']``)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _few(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# -- normalisation --------------------------------------------------------------------------

def model_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The per-channel mean/std of ``model``'s timm ``pretrained_cfg`` (None without one)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if not mean or not std:
        return None
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def pretrained_tag(model: nn.Module) -> str | None:
    """``arch.tag`` of the timm ``pretrained_cfg`` whose normalisation ``model`` carries."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    return f"{arch}.{tag}" if arch and tag else arch
