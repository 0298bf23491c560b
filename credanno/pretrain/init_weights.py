"""Start the encoder from ImageNet (DINO) weights: ``--init PATH`` or ``--init timm:NAME``.

The paper starts from the ImageNet DINO ViT-S/16 (section 3.1). Accepted layouts:

- the official DINO release (``dino_deitsmall16_pretrain.pth``: a plain backbone state dict
  with keys ``cls_token, pos_embed, patch_embed.proj.weight, blocks.N...``) and DINO's full
  training checkpoints (``{"teacher": {"module.backbone.blocks...": ...}, "student": ...}``;
  the teacher is taken);
- timm's state dicts (``.pth``/``.bin``) and ``.safetensors`` files.

Keys are remapped (prefixes ``module.``/``backbone.``/``model.`` dropped, classifier and DINO
head dropped), position embeddings are interpolated to the run's grid and patch-embedding
kernels resampled to its patch size. Only weights are loaded: the epoch, optimiser and
schedules always start from zero (the original code's resume-from-ImageNet trap restored its
epoch counter).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from credanno.errors import CredannoError

_PREFIXES = ("module.", "backbone.", "model.", "encoder.", "_orig_mod.")
_DROP = ("head.", "fc_norm_head.", "head_drop.")


def read_weights(spec: str) -> tuple[dict[str, torch.Tensor], str]:
    """The raw state dict named by ``spec`` and a short description of its source."""
    if spec.startswith("timm:"):
        return _timm_weights(spec[5:]), spec
    path = Path(spec)
    if not path.exists():
        raise CredannoError(f"init weights {path} not found; pass an existing --init file "
                            "or --init timm:NAME")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            # DINO's training checkpoints pickle their argparse.Namespace of arguments.
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except CredannoError:
        raise
    except Exception as exc:
        raise CredannoError(f"cannot read init weights {path} ({type(exc).__name__}); "
                            "pass a .pth/.pt state dict or a .safetensors file") from None
    return _select(raw, path), str(path)


def _timm_weights(name: str) -> dict[str, torch.Tensor]:
    import timm

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        raise CredannoError(f"--init timm:{name} needs a download but HF_HUB_OFFLINE is set; "
                            "download the weights elsewhere and pass --init FILE")
    if not timm.is_model(name):
        raise CredannoError(f"unknown timm model {name!r} for --init; pass a name from "
                            "timm.list_pretrained(), e.g. vit_small_patch16_224.dino")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:
        raise CredannoError(f"could not download timm weights {name!r} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                            "check the network or pass --init FILE") from None
    return model.state_dict()


def _select(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the backbone state dict inside a checkpoint of any accepted layout."""
    if isinstance(raw, dict):
        for key in ("teacher", "state_dict", "model", "teacher_backbone"):
            if key in raw and isinstance(raw[key], dict):
                return _select(raw[key], path)
        tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CredannoError(f"{path} holds no state dict of tensors; pass a DINO or timm "
                        "backbone checkpoint")


def remap_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes and every classifier / DINO-head tensor."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        if key.startswith(_DROP):
            continue
        out[key] = value
    return out


def adapt_to(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Resample position embeddings and patch kernels to ``model``'s sizes."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    target = model.state_dict()
    notes = []
    pos = state.get("pos_embed")
    # only the token grid is adapted; a different width is reported as a shape mismatch
    if pos is not None and "pos_embed" in target and pos.shape != target["pos_embed"].shape \
            and pos.shape[-1] == target["pos_embed"].shape[-1]:
        n_prefix = 0 if getattr(model, "no_embed_class", False) else \
            getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        old = pos.shape[1] - n_prefix
        side = int(round(old ** 0.5))
        if side * side != old:
            raise CredannoError(f"init weights have position embeddings {tuple(pos.shape)} that "
                                f"cannot map to {tuple(target['pos_embed'].shape)}; pass "
                                "weights of the same ViT width")
        state["pos_embed"] = resample_abs_pos_embed(pos.float(), new_size=list(grid),
                                                    old_size=[side, side],
                                                    num_prefix_tokens=n_prefix)
        notes.append(f"pos_embed {side}x{side} -> {grid[0]}x{grid[1]}")
    key = "patch_embed.proj.weight"
    w = state.get(key)
    if w is not None and key in target and w.shape[-2:] != target[key].shape[-2:] \
            and w.shape[:2] == target[key].shape[:2]:
        state[key] = resample_patch_embed(w.float(), list(target[key].shape[-2:]))
        notes.append(f"patch kernel {w.shape[-1]} -> {target[key].shape[-1]}")
    return state, notes


def load_init_weights(model: nn.Module, spec: str) -> dict[str, Any]:
    """Load ``spec``'s weights into ``model`` (in place); error on any key/shape mismatch."""
    raw, source = read_weights(spec)
    state, notes = adapt_to(model, remap_keys(raw))
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", wrong)):
            if keys:
                more = f" (+{len(keys) - 6} more)" if len(keys) > 6 else ""
                parts.append(f"{label}: {', '.join(keys[:6])}{more}")
        raise CredannoError(f"init weights {source} do not fit the encoder ({'; '.join(parts)}); "
                            "pass --arch matching the weights")
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()})
    return {"source": source, "tensors": len(state), "adapted": notes}
