"""``credanno.weights``: the one weight-loading path (DINOv2 and DINO layouts, strictness,
the model's own normalisation for ``embed --weights``, and its three callers)."""

from __future__ import annotations

import argparse

import pytest
import torch

from credanno import stores, weights
from credanno.cli import main
from credanno.errors import CredannoError, CredannoWarning
from credanno.transforms import LIDC_MEAN, LIDC_STD, EvalTransform

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A narrow, 2-block ViT: the key names of the released files at a fraction of the size.
SMALL = {"depth": 2, "embed_dim": 32, "num_heads": 2}

#: Block 0 of Meta's ``dinov2_vits14_pretrain.pth`` (other blocks alike), plus the rest.
DINOV2_KEYS = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight",
               "patch_embed.proj.bias", "norm.weight", "norm.bias"} | {
    f"blocks.0.{k}" for k in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
        "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma")}
#: The same for DINO's ``dino_deitsmall16_pretrain.pth``: no layer scale, no mask token, no head.
DINO_KEYS = (DINOV2_KEYS - {"mask_token", "blocks.0.ls1.gamma", "blocks.0.ls2.gamma"})


def _vit(arch: str, seed: int, **kwargs):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=kwargs.pop("num_classes", 0),
                             **SMALL, **kwargs)


def _blocks0_and_globals(state):
    return {k for k in state if not k.startswith("blocks.") or k.startswith("blocks.0.")}


def _dinov2_file(tmp_path):
    """Meta's layout: patch 14, position embeddings of the 518 px (37 x 37) grid + CLS."""
    state = _vit("vit_small_patch14_dinov2", 1).state_dict()
    state["mask_token"] = torch.randn(1, SMALL["embed_dim"])
    assert _blocks0_and_globals(state) == DINOV2_KEYS
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, SMALL["embed_dim"])
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    return state, path


def _dino_file(tmp_path):
    """DINO's release layout: plain ViT-S/16 keys, 224 px (14 x 14) grid + CLS, no head."""
    state = _vit("vit_small_patch16_224", 2).state_dict()
    assert _blocks0_and_globals(state) == DINO_KEYS
    assert state["pos_embed"].shape == (1, 1 + 14 * 14, SMALL["embed_dim"])
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(state, path)
    return state, path


def _assert_loaded(model, state, resampled=("pos_embed",)):
    own = model.state_dict()
    for key, value in state.items():
        if key in own and key not in resampled:
            assert torch.equal(own[key], value), key
    # timm's resampling keeps the CLS position and changes only the patch grid
    assert torch.equal(own["pos_embed"][:, 0], state["pos_embed"][:, 0])


def test_meta_dinov2_layout_loads_with_pos_embed_resampled(tmp_path):
    state, path = _dinov2_file(tmp_path)
    model = _vit("vit_small_patch14_dinov2", 9, img_size=28)   # a 2 x 2 grid
    report = weights.load_weights(model, path)
    _assert_loaded(model, state)
    assert model.pos_embed.shape == (1, 5, SMALL["embed_dim"])
    assert report.adapted == ["pos_embed (1, 1370, 32) -> (1, 5, 32)"]
    assert report.dropped == [] and report.tensors == len(state) - 1   # mask_token unused


def test_dino_release_and_training_checkpoint_layouts_load(tmp_path):
    state, path = _dino_file(tmp_path)
    model = _vit("vit_small_patch16_224", 9, img_size=32)       # a 2 x 2 grid
    weights.load_weights(model, path)
    _assert_loaded(model, state)
    # DINO's training checkpoint: teacher (no DDP) and student (DDP) with their DINO heads
    student = _vit("vit_small_patch16_224", 3).state_dict()
    head = {"head.mlp.0.weight": torch.randn(8, 32), "head.last_layer.weight_g": torch.ones(16, 1)}
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"student": {f"module.backbone.{k}": v for k, v in student.items()}
                | {f"module.{k}": v for k, v in head.items()},
                "teacher": {f"backbone.{k}": v for k, v in state.items()} | head,
                "epoch": 100, "args": argparse.Namespace(arch="vit_small")}, ckpt)
    model = _vit("vit_small_patch16_224", 9, img_size=32)
    with pytest.warns(CredannoWarning, match="dropped 2 head tensors.*head.mlp.0.weight"):
        report = weights.load_weights(model, ckpt)
    _assert_loaded(model, state)                                   # the teacher, not the student
    assert sorted(report.dropped) == sorted(head)


def test_missing_backbone_key_is_a_one_line_error_naming_it(tmp_path):
    state, _ = _dino_file(tmp_path)
    del state["blocks.1.norm1.weight"]
    model = _vit("vit_small_patch16_224", 9, img_size=32)
    with pytest.raises(CredannoError, match="missing: blocks.1.norm1.weight") as err:
        weights.load_into(model, state, source="f.pth")
    assert "\n" not in str(err.value) and "do not fit the architecture" in str(err.value)
    # DINOv2 weights need the layer-scale model: ls1.gamma has no place in a plain ViT
    v2, _ = _dinov2_file(tmp_path)
    with pytest.raises(CredannoError, match="unexpected: blocks.0.ls1.gamma"):
        weights.load_into(_vit("vit_small_patch16_224", 9, img_size=28, patch_size=14),
                          v2, source="v2.pth")


def test_a_head_that_does_not_fit_is_dropped_and_said(tmp_path):
    imagenet = _vit("vit_small_patch16_224", 4, img_size=32, num_classes=1000).state_dict()
    model = _vit("vit_small_patch16_224", 9, img_size=32, num_classes=3)
    own_head = model.head.weight.clone()
    with pytest.warns(CredannoWarning, match="dropped 2 head tensors.*head.weight"):
        report = weights.load_into(model, imagenet, source="in1k.pth")
    assert torch.equal(model.head.weight, own_head)                # left as initialised
    assert torch.equal(model.blocks[1].mlp.fc2.weight, imagenet["blocks.1.mlp.fc2.weight"])
    assert sorted(report.dropped) == ["head.bias", "head.weight"]
    # a head of the right size is loaded like any tensor
    three = _vit("vit_small_patch16_224", 5, img_size=32, num_classes=3).state_dict()
    weights.load_into(model, three, source="three.pth")
    assert torch.equal(model.head.weight, three["head.weight"])


def test_unwrap_and_prefixes():
    t = torch.zeros(1)
    raw = {"state_dict": {"model": {"module._orig_mod.backbone.norm.weight": t}}, "epoch": 3}
    assert weights.strip_prefixes(weights.unwrap(raw)) == {"norm.weight": t}
    assert weights.unwrap({"teacher": {"a": t}, "student": {"b": t}}) == {"a": t}
    assert weights.unwrap([t]) == {}


def test_embed_with_weights_uses_the_models_normalisation(tiny_patch_file, tmp_path):
    arch = "vit_small_patch16_224.dino"   # the tag's pretrained_cfg: ImageNet mean/std
    kwargs = {"img_size": 32, "patch_size": 8, **SMALL}
    path = tmp_path / "w.pth"
    torch.save(_vit(arch, 6, img_size=32, patch_size=8).state_dict(), path)
    opts = [x for k, v in kwargs.items() for x in ("--encoder-option", f"{k}={v}")]
    common = ["embed", "--encoder", f"timm:{arch}", "--data", str(tiny_patch_file), "--quiet",
              *opts]
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for extra, (mean, std), how in (
            (["--weights", str(path)], imagenet, "model"),
            (["--weights", str(path), "--normalise", "lidc"], (LIDC_MEAN, LIDC_STD), "lidc"),
            ([], (LIDC_MEAN, LIDC_STD), "lidc")):                  # random weights: unchanged
        out = tmp_path / f"{how}{len(extra)}.h5"
        main([*common, *extra, "--out", str(out)])
        with stores.open(out) as s:
            prov = s.provenance
        assert EvalTransform.from_dict(prov["transform"]) == EvalTransform(32, 32, mean, std)
        assert prov["encoder"]["normalise"] == how
    assert prov["encoder"]["which"] == "random"


def test_per_channel_normalisation_replicates_the_grey_channel():
    x = torch.rand(2, 8, 8)
    t = EvalTransform(8, 8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    y = t(x)
    assert y.shape == (2, 3, 8, 8)
    for c, (m, s) in enumerate(zip(t.mean, t.std, strict=True)):
        torch.testing.assert_close(y[:, c], (x - m) / s)


class _Called(Exception):
    pass


def test_embed_pretrain_and_the_supervised_baseline_share_the_loader(tiny_patch_file, tmp_path,
                                                                     monkeypatch):
    from credanno import runtime
    from credanno.bench.supervised import EndToEndClassifier
    from credanno.encoders import build_encoder
    from credanno.pretrain import load_config
    from credanno.pretrain.train import Trainer

    calls = []

    def spy(model, spec, **kw):
        calls.append((str(spec), kw.get("option")))
        raise _Called

    monkeypatch.setattr(weights, "load_weights", spy)
    tiny = {"img_size": 32, "patch_size": 8, **SMALL}
    with pytest.raises(_Called):
        build_encoder("timm:vit_tiny_patch16_224", weights="a.pth", kwargs=tiny)
    with pytest.raises(_Called):
        EndToEndClassifier(arch="vit_tiny_patch16_224", weights="b.pth",
                           model_kwargs=tiny)._model(2)
    cfg = load_config("cpu-tiny", overrides={"data": str(tiny_patch_file), "init": "c.pth",
                                             "out": str(tmp_path / "run"), "device": "cpu",
                                             "model_kwargs": SMALL})
    with pytest.raises(_Called):
        Trainer(cfg, runtime.DistEnv())
    assert calls == [("a.pth", "--weights"), ("b.pth", "weights"), ("c.pth", "--init")]
