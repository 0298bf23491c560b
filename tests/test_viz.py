import shutil

import numpy as np
import pytest

from credanno.errors import CredannoError
from credanno.labels import label_spec
from credanno.synthetic import synthetic_features, synthetic_table


@pytest.fixture
def syn_store(tmp_path):
    from credanno import stores

    table = synthetic_table(n_nodules=60, per_nodule=3, seed=1)
    x = synthetic_features(table, dim=24)
    path = tmp_path / "syn.h5"
    stores.save(path, features={"cls": x, "last4": np.concatenate([x] * 4, axis=1)},
                table=table, provenance={"source": "synthetic"})
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CREDANNO_CACHE", str(root))
    return root


def _no_fit(*args, **kwargs):
    raise AssertionError("the t-SNE map was refitted although it is cached")


def test_tsne_cache_hit_does_not_refit(syn_store, cache, monkeypatch):
    from credanno.viz import tsne as T

    first = T.tsne_map(syn_store, split="test", perplexity=10)
    assert not first.cached
    assert first.coords.shape == (len(first.table), 2)
    assert set(first.table["split"]) == {"test"}
    assert np.isfinite(first.coords).all()
    assert list((cache / "tsne").glob("*.npz"))
    monkeypatch.setattr(T, "_fit", _no_fit)
    second = T.tsne_map(syn_store, split="test", perplexity=10)
    assert second.cached
    np.testing.assert_array_equal(first.coords, second.coords)
    # another parameter is another map
    with pytest.raises(AssertionError, match="refitted"):
        T.tsne_map(syn_store, split="test", perplexity=12)


def test_tsne_places_test_points_into_train_map(syn_store, cache, monkeypatch):
    from credanno.viz import tsne as T

    placed = T.tsne_map(syn_store, split="test", fit_split="train", perplexity=10)
    train = T.tsne_map(syn_store, split="train", perplexity=10)
    assert train.cached  # the reference map was cached by the first call
    assert placed.coords.shape == (len(placed.table), 2)
    # placed points land inside the span of the training map
    lo, hi = train.coords.min(0), train.coords.max(0)
    span = hi - lo
    assert ((placed.coords > lo - span) & (placed.coords < hi + span)).all()
    # with the placed coordinates evicted, transform reuses the cached map: no refit
    for f in (cache / "tsne").glob("*.npz"):
        key = np.load(f)["key"]
        if '"split": "test"' in str(key):
            f.unlink()
    monkeypatch.setattr(T, "_fit", _no_fit)
    again = T.tsne_map(syn_store, split="test", fit_split="train", perplexity=10)
    assert not again.cached
    assert again.coords.shape == placed.coords.shape


def test_tsne_bad_inputs(syn_store, tmp_path, cache):
    from credanno.viz import tsne_map

    with pytest.raises(CredannoError, match="not found"):
        tsne_map(tmp_path / "missing.h5")
    with pytest.raises(CredannoError, match="unknown split"):
        tsne_map(syn_store, split="validation")
    with pytest.raises(CredannoError, match="no feature set 'patch'"):
        tsne_map(syn_store, kind="patch")
    with pytest.raises(CredannoError, match="training split"):
        tsne_map(syn_store, split="train", fit_split="test")


def test_legend_entries_use_radiologists_words():
    from credanno.viz import legend_entries

    spec = label_spec("calcification")
    entries = legend_entries(spec, np.array([0, 5, 5, 2, -1]))
    texts = [t for _, t in entries]
    assert texts == ["popcorn (1)", "solid (1)", "absent (2)", "not rated (1)"]
    mal = [t for _, t in legend_entries(label_spec("malignancy"), np.array([0, 1, 1]))]
    assert mal == ["benign (1)", "malignant (2)"]
    tex = legend_entries(label_spec("texture"), np.arange(5))
    assert [t.split(" (")[0] for _, t in tex] == list(label_spec("texture").words)
    assert len({c for c, _ in tex}) == 5  # distinct colours


def test_tsne_figure_panels_and_formats(tmp_path):
    from credanno.viz import FIG3_LABELS, save_figure, tsne_figure

    table = synthetic_table(n_nodules=20, per_nodule=2)
    coords = np.random.default_rng(0).normal(size=(len(table), 2))
    fig = tsne_figure(coords, table, "all", caption="Data: SYNTHETIC")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(FIG3_LABELS) == 8
    titles = [ax.get_title() for ax in axes]
    assert titles[0] == "(a) malignancy" and titles[-1] == "(h) texture"
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend[0].startswith("benign (") and legend[1].startswith("malignant (")
    tex = [t.get_text().split(" (")[0] for t in axes[-1].get_legend().get_texts()]
    assert set(tex) <= set(label_spec("texture").words)
    for ext in ("png", "svg", "pdf"):
        out = save_figure(tsne_figure(coords, table, "texture"), tmp_path / f"t.{ext}")
        assert out.stat().st_size > 1000
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "t.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(CredannoError, match="format"):
        save_figure(fig, tmp_path / "t.jpeg")
    with pytest.raises(CredannoError, match="unknown --color 'colour'"):
        tsne_figure(coords, table, "colour")


def test_describe_source(tmp_path, tiny_patch_file):
    from credanno.viz import describe_source
    from credanno.viz.source import patch_file_of

    assert describe_source({"source": "phantom"}).text.startswith("PHANTOM")
    assert describe_source({"data": {"source": "lidc", "sha256": "x"}}).is_real
    assert describe_source({"data": '{"source": "phantom"}'}).kind == "phantom"
    # only the patch file's path is known: its `source` attribute is read
    via_file = describe_source({"patch_file": str(tiny_patch_file)})
    assert via_file.kind == "synthetic"
    assert patch_file_of({"data": {"path": str(tiny_patch_file)}}) == tiny_patch_file
    assert describe_source({}).kind == "unknown"
    # a relative patch-file path (as `credanno embed` records it) resolves beside the store
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    shutil.copy(tiny_patch_file, proj / "data" / "p.h5")
    prov = {"patch_file": {"path": "data/p.h5", "sha256": "x"}}
    assert describe_source(prov).kind == "unknown"
    assert describe_source(prov, store=proj / "stores" / "s.h5").kind == "synthetic"
    assert patch_file_of(prov, proj / "stores" / "s.h5") == proj / "data" / "p.h5"


def test_tsne_cli(syn_store, tmp_path, cache, capsys):
    from credanno.cli import main

    out = tmp_path / "fig.png"
    main(["tsne", "--store", str(syn_store), "--color", "all", "--perplexity", "10",
          "--out", str(out)])
    assert out.exists() and "computed" in capsys.readouterr().out
    main(["tsne", "--store", str(syn_store), "--color", "texture", "--perplexity", "10",
          "--out", str(tmp_path / "tex.svg")])
    assert "from cache" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["tsne", "--store", str(syn_store), "--color", "colour"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown --color 'colour'") and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["tsne", "--store", str(tmp_path / "nope.h5")])
    assert "not found" in capsys.readouterr().err
