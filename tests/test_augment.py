"""The one augmentation module: counter-based views for embed and the supervised baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from credanno.augment import ViewAugmentation, forked_seed
from credanno.errors import CredannoError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, size: int = 12, channels: int | None = None) -> torch.Tensor:
    shape = (n, size, size) if channels is None else (n, channels, size, size)
    return torch.rand(shape, generator=torch.Generator().manual_seed(n + size))


def _reference_view(image: torch.Tensor, params: tuple[bool, int, int, int], s: int):
    """One image's view from its parameters with plain torch ops: flip, rot90, shift."""
    flip, k, dy, dx = params
    x = image.flip(-1) if flip else image
    x = torch.rot90(x, k, dims=(-2, -1))
    if not s:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x.reshape(1, -1, h, w), (s, s, s, s), mode="reflect").reshape(
        *x.shape[:-2], h + 2 * s, w + 2 * s)
    return padded[..., s + dy:s + dy + h, s + dx:s + dx + w]


def test_a_view_is_the_same_alone_in_a_batch_and_in_any_order():
    aug = ViewAugmentation(max_shift=2, seed=3)
    imgs, rows = _images(9), np.arange(40, 49)
    batch = aug(imgs, rows, view=1)
    for i in range(len(rows)):
        torch.testing.assert_close(aug(imgs[i:i + 1], rows[i:i + 1], view=1), batch[i:i + 1],
                                   rtol=0, atol=0)
    perm = np.random.default_rng(0).permutation(len(rows))
    torch.testing.assert_close(aug(imgs[perm], rows[perm], view=1), batch[perm], rtol=0, atol=0)
    # channels are turned together: a 3-channel copy gives the grey view in every channel
    three = aug(imgs[:, None].expand(-1, 3, -1, -1), rows, view=1)
    torch.testing.assert_close(three, batch[:, None].expand(-1, 3, -1, -1), rtol=0, atol=0)


def test_views_are_flips_quarter_turns_and_shifts_only():
    imgs, rows = _images(64), np.arange(64)
    for s in (0, 2):
        aug = ViewAugmentation(max_shift=s, seed=1)
        out = aug(imgs, rows, view=5)
        for i in range(len(rows)):
            expected = _reference_view(imgs[i], aug.params(int(rows[i]), 5), s)
            torch.testing.assert_close(out[i], expected, rtol=0, atol=0)
    # without a shift the pixel histogram is exactly preserved; a shift only repeats pixels
    flat = ViewAugmentation(max_shift=0, seed=1)(imgs, rows, view=5).flatten(1)
    torch.testing.assert_close(flat.sort(1).values, imgs.flatten(1).sort(1).values)
    shifted = ViewAugmentation(max_shift=2, seed=1)(imgs, rows, view=5)
    assert all(torch.isin(shifted[i], imgs[i]).all() for i in range(len(rows)))


def test_draws_depend_on_seed_view_and_row_and_cover_their_range():
    rows = np.arange(4000)

    def draws(seed, view):
        p = ViewAugmentation(max_shift=2, seed=seed).draw(rows, view)
        return torch.stack([p.flip.long(), p.quarter_turns, p.dy, p.dx], 1)

    base = draws(0, 0)
    for other in (draws(1, 0), draws(0, 1)):
        assert (other != base).any(1).float().mean() > 0.9
    flip, k, dy, dx = base.T
    assert abs(flip.float().mean() - 0.5) < 0.05
    assert torch.bincount(k, minlength=4).tolist() == pytest.approx([1000] * 4, abs=150)
    for d in (dy, dx):
        assert torch.bincount(d + 2, minlength=5).tolist() == pytest.approx([800] * 5, abs=150)


def test_bad_view_settings_are_one_line_errors():
    with pytest.raises(CredannoError, match="max_shift must be >= 0"):
        ViewAugmentation(max_shift=-1)
    with pytest.raises(CredannoError, match="square"):
        ViewAugmentation()(torch.rand(2, 8, 6), np.arange(2), 0)
    with pytest.raises(CredannoError, match="below the image size"):
        ViewAugmentation(max_shift=4)(torch.rand(2, 4, 4), np.arange(2), 0)


def test_forked_seed_leaves_the_global_generator_alone():
    before = torch.get_rng_state()
    with forked_seed(5):
        a = torch.rand(3)
    with forked_seed(5):
        b = torch.rand(3)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), before)


def _fit_predict(seed, images, y):
    from credanno.bench.supervised import EndToEndClassifier

    clf = EndToEndClassifier(arch="test_resnet", epochs=2, min_steps=4, batch_size=16,
                             image_size=16, seed=seed, n_classes=2)
    return clf.fit(images, y).predict_proba(images)


def test_supervised_baseline_is_reproducible_and_ignores_the_global_rng():
    images = _images(40, size=16).numpy()
    y = np.arange(40) % 2
    y[::7] = -1  # unlabelled images are skipped
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = _fit_predict(0, images, y)
    assert torch.equal(torch.get_rng_state(), state)  # fit neither reads nor moves it
    torch.manual_seed(987)
    torch.rand(17)
    np.testing.assert_array_equal(_fit_predict(0, images, y), first)
    assert not np.array_equal(_fit_predict(1, images, y), first)


def test_embed_stores_the_shared_views_and_says_how(tiny_patch_file, tmp_path):
    from credanno import stores
    from credanno.data.patchfile import read_patch_file
    from credanno.embed import embed

    out = embed(tiny_patch_file, encoder="pixels", out=tmp_path / "v.h5", batch_size=17,
                views=2, view_seed=4)
    ps = read_patch_file(tiny_patch_file)
    rows = np.flatnonzero(ps.table["split"].to_numpy() == "train")
    aug = ViewAugmentation(max_shift=2, seed=4)
    with stores.open(out) as s:
        stored, prov = s.views(kind="cls"), s.provenance["views"]
    for v in range(2):
        expected = aug(torch.from_numpy(ps.images[rows]), rows, v).reshape(len(rows), -1)
        np.testing.assert_array_equal(stored[v], expected.numpy())
    assert prov["augmentation"] == aug.to_dict()
    assert prov["augmentation"]["scheme"].startswith("credanno.augment.views/1")
