"""Frozen encoders for ``credanno embed``: a registry keyed by spec, and their feature sets.

Specs (timm-style registry, see :func:`register_encoder`):

- ``checkpoint:PATH`` -- a ``credanno pretrain`` run folder or ``checkpoint.pt``; ``which`` picks
  the teacher (DINO's and the paper's choice for features), the student, or ``random``
  (the same architecture, untrained: a baseline);
- ``timm:ARCH`` -- any timm architecture, randomly initialised (seed 0) or loaded from a
  local state-dict / safetensors file (:func:`credanno.weights.load_weights`); loaded
  weights are normalised with the model's timm ``pretrained_cfg`` mean/std (``ARCH.TAG``
  picks a tag's, e.g. ``vit_small_patch16_224.dino``), random ones with the LIDC statistics;
  ``normalise="lidc"`` / ``"model"`` overrides;
- ``pixels`` -- the raw flattened patch, the no-learning baseline.

Feature sets (the paper's evaluation, Sec. 3 and its public code):

- ``cls``: the CLS token of the last block after the final LayerNorm -- what k-NN uses;
- ``last4``: the CLS tokens of the last 4 blocks, each through the final LayerNorm,
  concatenated (DINO's ``get_intermediate_layers(x, 4)``) -- what the predictors G_exp and
  G_cls are trained on (1536-d for ViT-S).

Non-ViT timm models give ``cls`` only: their pooled pre-logits features.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from credanno.augment.rng import forked_seed
from credanno.errors import CredannoError
from credanno.transforms import LIDC_MEAN, LIDC_STD, EvalTransform

#: The paper's evaluation input: 256 px resize before a 224 px centre crop (DINO's ratio).
CROP_RATIO = 224 / 256
N_LAST = 4
#: ``normalise`` choices: ``auto`` (the model's statistics for loaded timm weights, LIDC's
#: otherwise), ``model`` (the timm ``pretrained_cfg`` mean/std), ``lidc`` (the paper's).
NORMALISE = ("auto", "model", "lidc")

FeatureFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]


# -- feature sets ---------------------------------------------------------------------------

class ViTFeatures(nn.Module):
    """``cls`` and ``last4`` of a timm VisionTransformer in one forward pass."""

    def __init__(self, model: nn.Module, n_last: int = N_LAST) -> None:
        super().__init__()
        self.model = model
        self.n_last = min(n_last, len(model.blocks))
        width = int(model.embed_dim)
        self.dims = {"cls": width, f"last{N_LAST}": width * self.n_last}
        self.definitions = {
            "cls": "CLS token of the last block after the final norm "
                   f"({type(model).__name__}.norm), {width}-d",
            f"last{N_LAST}": f"CLS tokens of the last {self.n_last} blocks, each through the "
                             f"final norm, concatenated in block order, {width * self.n_last}-d",
        }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # timm's forward_intermediates(norm=True) applies the final norm to each block output,
        # as DINO's get_intermediate_layers does; the last one is forward_features' output.
        inter = self.model.forward_intermediates(
            x, indices=self.n_last, norm=True, return_prefix_tokens=True, output_fmt="NLC",
            intermediates_only=True)
        cls_tokens = [prefix[:, 0] for _, prefix in inter]
        return {"cls": cls_tokens[-1], f"last{N_LAST}": torch.cat(cls_tokens, dim=-1)}


class PooledFeatures(nn.Module):
    """``cls`` = the pooled pre-logits features of any timm model built with num_classes=0."""

    def __init__(self, model: nn.Module, probe_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            dim = int(model(torch.zeros(2, *probe_shape)).flatten(1).shape[1])
        self.dims = {"cls": dim}
        self.definitions = {"cls": f"pooled pre-logits features of {type(model).__name__}, "
                                   f"{dim}-d"}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cls": self.model(x).flatten(1)}


class PixelFeatures(nn.Module):
    """``cls`` = the raw grey patch, flattened (values in [0, 1]): the no-encoder baseline."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.dims = {"cls": image_size * image_size}
        self.definitions = {"cls": f"raw {image_size}x{image_size} patch in [0, 1], "
                                   "flattened row-major"}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cls": x.flatten(1).float()}


def is_vit(model: nn.Module) -> bool:
    """A timm ViT with a class token, blocks and a final norm (the paper's encoder family)."""
    return (hasattr(model, "forward_intermediates") and hasattr(model, "blocks")
            and getattr(model, "cls_token", None) is not None and hasattr(model, "embed_dim"))


def feature_sets_for(model: nn.Module, input_size: int) -> nn.Module:
    """The feature-set extractor of ``model``: ViT tokens where possible, else pooled."""
    if is_vit(model):
        return ViTFeatures(model)
    return PooledFeatures(model, (3, input_size, input_size))


# -- the encoder ----------------------------------------------------------------------------

@dataclass
class Encoder:
    """A frozen encoder: grey patches (B, H, W) in [0, 1] -> named feature batches."""

    name: str
    features: nn.Module
    transform: EvalTransform | None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_sets(self) -> dict[str, int]:
        return dict(self.features.dims)

    @property
    def definitions(self) -> dict[str, str]:
        return dict(self.features.definitions)

    def to(self, device: str | torch.device) -> Encoder:
        self.features.to(device).eval()
        return self

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.transform(images) if self.transform is not None else images
        out = self.features(x)
        return {k: v.float() for k, v in out.items()}


EncoderFactory = Callable[..., Encoder]
ENCODERS: dict[str, EncoderFactory] = {}


def register_encoder(prefix: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Register a factory for specs ``prefix`` or ``prefix:ARG``."""
    def wrap(fn: EncoderFactory) -> EncoderFactory:
        ENCODERS[prefix] = fn
        return fn
    return wrap


def build_encoder(spec: str, *, weights: str | os.PathLike | None = None, which: str = "teacher",
                  image_size: int = 32, kwargs: dict[str, Any] | None = None,
                  normalise: str = "auto") -> Encoder:
    """Build the frozen encoder named by ``spec`` (see the module docstring), in eval mode."""
    prefix, _, arg = spec.partition(":")
    if prefix not in ENCODERS:
        raise CredannoError(f"unknown encoder {spec!r}; use one of "
                            f"{', '.join(encoder_forms())}")
    if normalise not in NORMALISE:
        raise CredannoError(f"unknown --normalise {normalise!r}; choose one of "
                            f"{', '.join(NORMALISE)}")
    if normalise != "auto" and prefix != "timm":
        raise CredannoError(f"--normalise {normalise} is for --encoder timm:ARCH; a checkpoint "
                            "carries its own evaluation transform and pixels are not normalised")
    encoder = ENCODERS[prefix](arg, weights=weights, which=which, image_size=image_size,
                               kwargs=dict(kwargs or {}), normalise=normalise)
    encoder.features.eval()
    for p in encoder.features.parameters():
        p.requires_grad_(False)
    return encoder


_SPEC_FORMS = {"checkpoint": "checkpoint:runs/NAME", "timm": "timm:ARCH", "pixels": "pixels"}


def encoder_forms() -> list[str]:
    """How each registered encoder is named on the command line (``timm:ARCH``, ...)."""
    return [_SPEC_FORMS.get(p, p) for p in ENCODERS]


def input_transform(input_size: int, image_size: int,
                    mean: float | tuple[float, ...] = LIDC_MEAN,
                    std: float | tuple[float, ...] = LIDC_STD) -> EvalTransform:
    """The evaluation transform for an encoder taking ``input_size`` px inputs.

    Encoders at or below the patches' native size see them resized to their input;
    larger ones get the paper's upsample-then-centre-crop (256 -> 224 for 224 px input).
    ``mean``/``std``: the LIDC statistics, or the model's own (one value per channel).
    """
    if input_size <= image_size:
        return EvalTransform(resize=input_size, crop=input_size, mean=mean, std=std)
    return EvalTransform(resize=int(round(input_size / CROP_RATIO)), crop=input_size,
                         mean=mean, std=std)


def model_input_size(model: nn.Module) -> int:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None:
        return int(size[-1] if isinstance(size, (tuple, list)) else size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


@register_encoder("checkpoint")
def checkpoint_encoder(arg: str, *, weights=None, which: str = "teacher", image_size: int = 32,
                       kwargs: dict[str, Any], normalise: str = "auto") -> Encoder:
    """A ``credanno pretrain`` encoder (teacher, student or random), with its eval transform."""
    from credanno.pretrain.checkpoint import latest_run, load_backbone

    if weights is not None:
        raise CredannoError("--weights is for --encoder timm:ARCH; a checkpoint carries its "
                            "own weights (choose them with --which)")
    if kwargs:
        raise CredannoError("encoder options are for --encoder timm:ARCH; a checkpoint "
                            "records its own architecture")
    path = Path(arg) if arg else latest_run()
    model, info = load_backbone(path, which=which)
    run_name = info.checkpoint.parent.name if info.checkpoint.name == "checkpoint.pt" \
        else info.checkpoint.stem
    name = run_name if which == "teacher" else f"{run_name}-{which}"
    input_size = info.eval_transform.crop
    prov = {"kind": "checkpoint", "name": name, **info.to_dict()}
    if which == "random":
        prov["init_seed"] = 0
    return Encoder(name, feature_sets_for(model, input_size), info.eval_transform, prov)


#: timm.create_model options that are sizes or counts: positive whole numbers (or tuples)
SIZE_OPTIONS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans")


def check_encoder_options(kwargs: dict[str, Any]) -> None:
    """One-line errors for options timm would crash on (``patch_size=0`` divides by zero)."""
    import math

    for key, value in kwargs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if key in SIZE_OPTIONS and not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise CredannoError(f"--encoder-option {key}={value!r}: must be a positive whole "
                                f"number, e.g. --encoder-option {key}=16")
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise CredannoError(f"--encoder-option {key}={value!r}: must be a finite number")


def _check_builds(model: nn.Module, arch: str, kwargs: dict[str, Any], input_size: int) -> None:
    """Run one blank image through the model, so that option combinations timm accepts but
    cannot run (a patch larger than the image) fail here, before a store is started."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    except (RuntimeError, ValueError, ZeroDivisionError, AssertionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CredannoError(f"timm:{arch} cannot run with --encoder-option settings {kwargs} "
                            f"({first}); change them") from None


@register_encoder("timm")
def timm_encoder(arg: str, *, weights=None, which: str = "teacher", image_size: int = 32,
                 kwargs: dict[str, Any], normalise: str = "auto") -> Encoder:
    """Any timm architecture: random (seed 0) or weights from a local file."""
    from credanno.data.patchfile import file_sha256
    from credanno.pretrain.checkpoint import create_backbone
    from credanno.weights import load_weights

    if not arg:
        raise CredannoError("--encoder timm needs an architecture: timm:ARCH, e.g. "
                            "timm:vit_small_patch16_224")
    check_encoder_options(kwargs)
    with forked_seed(0):  # random weights are a function of seed 0 alone
        try:
            model = create_backbone(arg, kwargs)
        except (RuntimeError, ValueError, ZeroDivisionError, AssertionError) as exc:
            raise CredannoError(f"timm:{arg} cannot be built with --encoder-option settings "
                                f"{kwargs} ({exc}); change them") from None
    prov: dict[str, Any] = {"kind": "timm", "arch": arg, "kwargs": kwargs, "init_seed": 0,
                            "which": "random", "weights": None, "weights_sha256": None,
                            "sha256": None}
    name = f"timm-{arg}"
    if weights is not None and str(weights).startswith("timm:"):
        # the store records the weights file's sha256; a download has no file to hash
        raise CredannoError(f"--weights takes a local file, not {weights}; download the "
                            "weights elsewhere and pass --weights FILE")
    if weights is not None:
        wpath = Path(weights)
        report = load_weights(model, wpath, option="--weights", credanno_checkpoints=False)
        sha = file_sha256(wpath)
        prov.update(which="weights", weights=str(wpath), weights_sha256=sha, sha256=sha,
                    load=report.to_dict())
        name += f"-{wpath.stem}"
    else:
        name += "-random"
    model.eval()
    input_size = model_input_size(model)
    if kwargs:
        _check_builds(model, arg, kwargs, input_size)
    prov["name"] = name
    transform = _timm_transform(model, input_size, image_size, normalise,
                                loaded=weights is not None, prov=prov)
    return Encoder(name, feature_sets_for(model, input_size), transform, prov)


def _timm_transform(model: nn.Module, input_size: int, image_size: int, normalise: str, *,
                    loaded: bool, prov: dict[str, Any]) -> EvalTransform:
    """The input transform of a timm encoder; records the normalisation in ``prov``.

    Loaded (ImageNet) weights expect the statistics they were trained with, not LIDC's: the
    model's timm ``pretrained_cfg`` has them. Random weights keep the LIDC statistics.
    """
    from credanno.weights import model_normalisation, pretrained_tag

    mode = ("model" if loaded else "lidc") if normalise == "auto" else normalise
    if mode == "lidc":
        prov["normalise"] = "lidc"
        return input_transform(input_size, image_size)
    stats = model_normalisation(model)
    if stats is None:
        raise CredannoError(f"timm model {prov['arch']!r} has no pretrained_cfg mean/std; pass "
                            "--normalise lidc")
    prov.update(normalise="model", pretrained_cfg=pretrained_tag(model))
    return input_transform(input_size, image_size, mean=stats[0], std=stats[1])


@register_encoder("pixels")
def pixel_encoder(arg: str, *, weights=None, which: str = "teacher", image_size: int = 32,
                  kwargs: dict[str, Any], normalise: str = "auto") -> Encoder:
    """The raw patch: a baseline that shows what the encoder adds."""
    if arg or weights is not None or kwargs:
        raise CredannoError("the pixels encoder takes no architecture, weights or options; "
                            "pass just --encoder pixels")
    prov = {"kind": "pixels", "name": "pixels", "arch": "pixels", "which": "pixels"}
    return Encoder("pixels", PixelFeatures(image_size), None, prov)
