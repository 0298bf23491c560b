import time

import pytest

from credanno.errors import CredannoWarning

pytestmark = pytest.mark.usefixtures("one_torch_thread")


#: a 2-block tiny ViT for 1 epoch: the pipeline's plumbing, not its accuracy
TINY = {"epochs": 1, "model_kwargs": {"depth": 2}, "out_dim": 128, "head_hidden_dim": 64,
        "head_bottleneck_dim": 32, "batch_size": 32, "local_crops": 2, "warmup_epochs": 0}
#: timm's own test-sized ResNet for the end-to-end baseline
CNN = {"arch": "test_resnet", "epochs": 1, "min_steps": 2}


@pytest.mark.filterwarnings("ignore", category=CredannoWarning)
def test_demo_end_to_end_tiny(tmp_path, tiny_patch_file):
    from credanno.demo import run_demo

    lines = []
    t0 = time.perf_counter()
    res = run_demo(out=tmp_path / "demo", seeds=1, device="cpu", data=tiny_patch_file,
                   preset="cpu-tiny", pretrain_overrides=TINY, fracs=(0.1, 1.0),
                   cnn=CNN, probe_epochs=3, perplexity=10,
                   on_stage=lines.append)
    first = time.perf_counter() - t0
    assert sum(ln.endswith("...") for ln in lines) == 8  # one progress line per stage
    assert set(res.stores) == {"teacher", "random", "pixels"}
    assert all(p.exists() for p in res.stores.values())
    for name in ("tsne", "tsne_compare", "fig2", "fig4"):
        assert res.figures[name].read_bytes()[:4] == b"\x89PNG", name
    report = res.report.read_text()
    assert "SYNTHETIC" in report and "Nothing in this report is a result on real CT" in report
    for encoder in ("DINO-pretrained teacher", "random weights", "raw pixels"):
        assert encoder in report
    for rel in ("figures/tsne.png", "figures/fig2.png", "figures/fig4.png"):
        assert f"]({rel})" in report
    assert "| HSCNN |" in report and "majority baseline" in report
    assert "The pretrained teacher beats same architecture, random weights in " in report
    assert (tmp_path / "demo" / "tables" / "table1_teacher.csv").exists()

    # a second call reuses the finished run and the stores
    mtime = res.stores["teacher"].stat().st_mtime_ns
    res2 = run_demo(out=tmp_path / "demo", seeds=1, device="cpu", data=tiny_patch_file,
                    preset="cpu-tiny", pretrain_overrides=TINY, fracs=(0.1, 1.0),
                    cnn=CNN, probe_epochs=3, perplexity=10)
    assert res2.cached["pretrain"] and res2.cached["embed teacher"]
    assert res2.stores["teacher"].stat().st_mtime_ns == mtime
    assert first < 60
    assert all(isinstance(w, str) for w in res.warnings)


def test_comparison_verdict_counts_settings_won():
    import numpy as np
    import pandas as pd

    from credanno.demo import comparison_verdict

    comp = pd.DataFrame({"teacher": [0.8, 0.7, 0.9], "random": [0.7, 0.75, 0.6],
                         "pixels": [0.85, 0.6, 0.9], "teacher_sd": [np.nan] * 3},
                        index=["50-NN", "250-NN", "trained"])
    assert comparison_verdict(comp) == ("The pretrained teacher beats same architecture, "
                                        "random weights in 2 of 3 and raw pixels in 1 of 3 "
                                        "settings.")


def test_demo_bad_inputs(tmp_path, capsys):
    from credanno.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path / "d"), "--data", str(tmp_path / "missing.h5")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: patch file") and "not found" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit):
        main(["demo", "--n-seeds", "0"])
    assert "--n-seeds 0" in capsys.readouterr().err
