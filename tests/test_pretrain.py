"""Unit tests of the DINO pieces: schedules, head, loss, multi-crop, config, checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from credanno.augment.rng import mix64, sample_keys, uniforms
from credanno.errors import CredannoError
from credanno.pretrain.config import PretrainConfig, available_presets, load_config
from credanno.pretrain.heads import DINOHead, MultiCropWrapper
from credanno.pretrain.loss import DINOLoss
from credanno.pretrain.multicrop import CropSpec, MultiCrop
from credanno.pretrain.nodule_views import SameNoduleViews
from credanno.pretrain.schedules import cosine_schedule, teacher_temperature_schedule
from credanno.pretrain.train import clip_per_parameter, ema_update, param_groups


def test_cosine_schedule_warmup_and_ends():
    s = cosine_schedule(1.0, 0.01, epochs=10, steps_per_epoch=4, warmup_epochs=2)
    assert len(s) == 40
    assert s[0] == 0.0 and s[7] == pytest.approx(1.0)       # linear warm-up to the peak
    assert s[8] == pytest.approx(1.0) and np.all(np.diff(s[8:]) <= 0)
    assert 0.01 < s[-1] < 0.02   # DINO's cosine ends one step short of the final value
    m = cosine_schedule(0.996, 1.0, epochs=5, steps_per_epoch=3)
    assert m[0] == pytest.approx(0.996) and m[-1] > 0.9995
    t = teacher_temperature_schedule(0.04, 0.07, warmup_epochs=3, epochs=5)
    assert t.tolist() == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07])


def test_dino_head_shapes_and_weight_norm():
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 32)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)   # norm_last_layer
    # weight-normalised rows have unit norm, and the input is L2-normalised: |logit| <= 1
    assert out.abs().max() <= 1 + 1e-5
    free = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_multicrop_wrapper_groups_resolutions():
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return x.mean(dim=(2, 3))

    wrapper = MultiCropWrapper(Spy(), torch.nn.Identity())
    crops = [torch.rand(4, 3, 8, 8)] * 2 + [torch.rand(4, 3, 4, 4)] * 3
    assert wrapper(crops).shape == (20, 3)
    assert calls == [(8, 3, 8, 8), (12, 3, 4, 4)]


def test_dino_loss_matches_definition_and_updates_centre():
    torch.manual_seed(0)
    b, k, ncrops = 3, 7, 4
    student = torch.randn(ncrops * b, k)
    teacher = torch.randn(2 * b, k)
    loss_fn = DINOLoss(k, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.fill_(0.2)
    loss = loss_fn(student, teacher, teacher_temp=0.04)
    pt = torch.softmax((teacher - 0.2) / 0.04, -1).chunk(2)
    ls = torch.log_softmax(student / 0.1, -1).chunk(ncrops)
    pairs = [(t, s) for t in range(2) for s in range(ncrops) if s != t]
    expected = sum((-pt[t] * ls[s]).sum(-1).mean() for t, s in pairs) / len(pairs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    centre = 0.2 * 0.9 + 0.1 * teacher.mean(0, keepdim=True)
    assert torch.allclose(loss_fn.center, centre, atol=1e-6)


def test_splitmix_matches_reference_and_uniforms_are_uniform():
    def ref(x):
        m = (1 << 64) - 1
        x = (x + 0x9E3779B97F4A7C15) & m
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    vals = [0, 1, 987654321, 2**62 + 5, -3]
    got = mix64(torch.tensor(vals, dtype=torch.int64))
    assert [int(g) & ((1 << 64) - 1) for g in got] == [ref(v & ((1 << 64) - 1)) for v in vals]
    u = uniforms(sample_keys(0, 0, torch.arange(4000)), 3)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02


def test_multicrop_is_per_image_deterministic():
    mc = MultiCrop(CropSpec(global_size=16, local_size=8, n_local=3, blur_sigma=(0.1, 1.0)))
    images = torch.rand(6, 16, 16)
    keys = sample_keys(1, 2, torch.arange(6))
    crops = mc(images, keys)
    assert [tuple(c.shape) for c in crops] == [(6, 3, 16, 16)] * 2 + [(6, 3, 8, 8)] * 3
    # an image's crops do not depend on the rest of the batch (distributed shards)
    part = mc(images[2:4], keys[2:4])
    assert all(torch.equal(a[2:4], b) for a, b in zip(crops, part, strict=True))
    # other epochs draw other crops; all values stay in the normalised [0, 1] range
    other = mc(images, sample_keys(1, 3, torch.arange(6)))
    assert not torch.equal(other[0], crops[0])
    lo, hi = (0 - mc.spec.mean) / mc.spec.std, (1 - mc.spec.mean) / mc.spec.std
    assert all(c.min() >= lo - 1e-5 and c.max() <= hi + 1e-5 for c in crops)


def test_multicrop_flips_half_the_crops():
    mc = MultiCrop(CropSpec(global_size=8, local_size=4, n_local=0, global_scale=(1.0, 1.0),
                            brightness=0.0, contrast=0.0, blur_sigma=(1e-3, 1e-3), channels=1,
                            mean=0.0, std=1.0, interpolation="bilinear"))
    ramp = torch.linspace(0, 1, 8)[None, :].expand(8, 8)
    c = mc(ramp[None].expand(64, 8, 8).contiguous(), sample_keys(0, 0, torch.arange(64)))[0]
    flipped = c[:, 0, 4, 0] > c[:, 0, 4, -1]
    assert 10 < int(flipped.sum()) < 54                  # horizontal flip with p = 0.5


def test_local_shift_keeps_local_crops_on_the_centre():
    """local_shift = 0 centres every local crop; 1 spreads them over the whole image."""
    quiet = dict(global_size=16, local_size=4, n_local=8, local_scale=(1 / 16, 1 / 16),
                 brightness=0.0, contrast=0.0, blur_sigma=(1e-3, 1e-3), channels=1,
                 mean=0.0, std=1.0, interpolation="bilinear")
    dot = torch.zeros(16, 16)
    dot[6:10, 6:10] = 1.0                                  # a 4 px "nodule" in the centre
    images, keys = dot[None].expand(32, 16, 16).contiguous(), sample_keys(0, 0, torch.arange(32))

    def nodule_fraction(shift: float) -> torch.Tensor:
        local = torch.cat(MultiCrop(CropSpec(local_shift=shift, **quiet))(images, keys)[2:])
        return local.mean(dim=(1, 2, 3))

    centred = nodule_fraction(0.0)
    assert torch.all(centred > 0.85)                       # the centre, at native scale
    spread = nodule_fraction(1.0)
    assert float((spread < 0.1).float().mean()) > 0.3       # many crops miss the nodule


def test_rotation_turns_crops_about_their_centre():
    quiet = dict(global_size=16, local_size=8, n_local=0, global_scale=(1.0, 1.0),
                 brightness=0.0, contrast=0.0, blur_sigma=(1e-3, 1e-3), channels=1,
                 mean=0.0, std=1.0, interpolation="bilinear")
    bar = torch.zeros(16, 16)
    bar[7:9, 2:14] = 1.0                                   # a horizontal bar
    images, keys = bar[None].expand(64, 16, 16).contiguous(), sample_keys(0, 0, torch.arange(64))

    def n_vertical(rotation: float) -> int:
        crops = MultiCrop(CropSpec(rotation=rotation, **quiet))(images, keys)[0][:, 0]
        return int((crops[:, 2:14, 7:9].mean(dim=(1, 2))
                    > crops[:, 7:9, 2:14].mean(dim=(1, 2))).sum())

    assert n_vertical(0.0) == 0
    assert 8 < n_vertical(90.0) < 56                      # about half turn past 45 degrees


def test_same_nodule_views_pick_another_patch_of_the_nodule():
    nodules = np.array(["a", "b", "a", "c", "a", "b"])
    rows = torch.arange(6).repeat(40)
    keys = sample_keys(3, 1, torch.arange(len(rows)))
    partner = SameNoduleViews(nodules, p=1.0)(rows, keys)
    for r in range(6):
        got = set(partner[rows == r].tolist())
        others = set(np.flatnonzero(nodules == nodules[r]).tolist()) - {r}
        assert got == (others or {r})                    # every other patch, never itself
    assert torch.equal(SameNoduleViews(nodules, p=0.0)(rows, keys), rows)
    half = SameNoduleViews(nodules, p=0.5)(rows, keys)
    assert 0.25 < float((half != rows)[nodules[rows] != "c"].float().mean()) < 0.75
    # a pure function of (row, key): a sub-batch draws the same partners
    assert torch.equal(SameNoduleViews(nodules, 1.0)(rows[7:19], keys[7:19]), partner[7:19])


def test_multicrop_second_images_feed_crop_two_and_the_locals():
    quiet = dict(global_size=8, local_size=4, n_local=2, brightness=0.0, contrast=0.0,
                 blur_sigma=(1e-3, 1e-3), channels=1, mean=0.0, std=1.0)
    dark, bright = torch.zeros(4, 8, 8), torch.full((4, 8, 8), 0.4)  # below solarisation
    keys = sample_keys(0, 0, torch.arange(4))
    crops = MultiCrop(CropSpec(**quiet))(dark, keys, bright)
    assert crops[0].max() == 0 and all(c.min() > 0.3 for c in crops[1:])


def test_param_groups_clip_and_ema():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    decay, no_decay = param_groups(model)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3
    assert no_decay["weight_decay"] == 0.0
    p = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    p[0].grad, p[1].grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4])
    clip_per_parameter(p, 3.0)
    assert p[0].grad.norm().item() == pytest.approx(3.0, rel=1e-4)
    assert torch.allclose(p[1].grad, torch.tensor([0.3, 0.4]))   # below the cap: untouched
    t, s = [torch.ones(2)], [torch.zeros(2)]
    ema_update(t, s, 0.9)
    assert torch.allclose(t[0], torch.full((2,), 0.9))


def test_presets_and_overrides(tmp_path):
    assert {"paper", "cpu-tiny"} <= set(available_presets())
    paper = load_config("paper")
    assert (paper.arch, paper.global_size, paper.local_size, paper.local_crops) == \
        ("vit_small_patch16_224", 224, 96, 8)
    assert paper.batch_size == 128 and paper.epochs == 300 and paper.out_dim == 65536
    assert paper.peak_lr == pytest.approx(2.5e-4)          # the paper's lr at batch 128
    assert (paper.eval_resize, paper.eval_crop) == (256, 224)
    tiny = load_config("cpu-tiny")
    if not torch.cuda.is_available():
        assert load_config().preset == "cpu-tiny"          # the default without a GPU
    assert tiny.global_size == 32 and tiny.eval_resize == tiny.eval_crop == 32
    assert tiny.backbone_kwargs()["depth"] == 4
    toml = tmp_path / "c.toml"
    toml.write_text('[optim]\nepochs = 3\n[model]\nmodel_kwargs = { depth = 2 }\n')
    cfg = load_config("cpu-tiny", file=toml, overrides={"epochs": 5, "lr": 1})
    assert cfg.epochs == 5 and cfg.lr == 1.0 and cfg.model_kwargs == {"depth": 2}
    assert isinstance(cfg, PretrainConfig)


@pytest.mark.parametrize("kwargs, match", [
    ({"preset": "nope"}, "unknown preset"),
    ({"overrides": {"colour": 1}}, "unknown pretraining setting"),
    ({"overrides": {"epochs": "ten"}}, "wrong type"),
    ({"overrides": {"epochs": 0}}, "epochs must be"),
    ({"overrides": {"local_size": 15}}, "multiple of the patch"),
    ({"file": "/nonexistent.toml"}, "not found"),
])
def test_config_errors(kwargs, match):
    kwargs.setdefault("preset", "cpu-tiny")
    with pytest.raises(CredannoError, match=match):
        load_config(**kwargs)


def test_checkpoint_errors(tmp_path):
    from credanno.pretrain.checkpoint import create_backbone, latest_run, load_backbone

    with pytest.raises(CredannoError, match="no pretraining run"):
        latest_run(tmp_path)
    with pytest.raises(CredannoError, match="no pretraining checkpoint"):
        load_backbone(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CredannoError, match="not a readable checkpoint"):
        load_backbone(tmp_path / "bad")
    with pytest.raises(CredannoError, match="unknown timm architecture"):
        create_backbone("vit_does_not_exist")
