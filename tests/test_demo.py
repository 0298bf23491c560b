
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
    from credanno.demo import DemoSpec, run_demo

    spec = DemoSpec(seeds=1, device="cpu", data=tiny_patch_file, preset="cpu-tiny",
                    pretrain_overrides=TINY, fracs=(0.1, 1.0), cnn=CNN, probe_epochs=3,
                    perplexity=10)
    lines = []
    res = run_demo(tmp_path / "demo", spec, on_stage=lines.append)
    assert sum(ln.endswith("...") for ln in lines) == 10  # one progress line per stage
    assert set(res.stores) == {"teacher", "random", "pixels"}
    assert all(p.exists() for p in res.stores.values())
    for name in ("tsne", "tsne_compare", "fig2", "fig4", "budget"):
        assert res.figures[name].read_bytes()[:4] == b"\x89PNG", name
    report = res.report.read_text()
    assert "SYNTHETIC" in report and "Nothing in this report is a result on real CT" in report
    for encoder in ("DINO-pretrained teacher", "random weights", "raw pixels"):
        assert encoder in report
    assert "best label-free strategy's malignancy gain over random" in report
    # both probe recipes beside the constant, per label, with the 3-point verdict
    assert "| tuned 10% | paper 10% | const 10% |" in report
    assert "Attributes more than 3 points below the constant" in report
    assert (tmp_path / "demo/tables/probe_recipes.csv").exists()
    assert "real CT (LIDC-IDRI)" in report and (tmp_path / "demo/tables/budget.csv").exists()
    for rel in ("figures/tsne.png", "figures/fig2.png", "figures/fig4.png",
                "figures/budget.png"):
        assert f"]({rel})" in report
    assert "| HSCNN |" in report and "majority baseline" in report
    assert "The pretrained teacher beats same architecture, random weights in " in report
    assert (tmp_path / "demo" / "tables" / "table1_teacher.csv").exists()
    page = (tmp_path / "demo" / "report.html").read_text()  # the same, offline, + explorer
    assert page.count('src="data:image/png;base64,') == 5 and "figure missing" not in page
    assert '<iframe id="explorer"' in page and "credannoExplorer" in page

    # a second call reuses the finished run and the stores
    mtime = res.stores["teacher"].stat().st_mtime_ns
    res2 = run_demo(tmp_path / "demo", spec)
    assert res2.cached["pretrain"] and res2.cached["embed teacher"]
    assert res2.stores["teacher"].stat().st_mtime_ns == mtime
    assert res2.cached["embed random"] and res2.cached["embed pixels"]


def test_comparison_verdict_counts_settings_won():
    import numpy as np
    import pandas as pd

    from credanno.bench.compare import comparison_verdict

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


# -- the freshness rule: content identities, never sizes and mtimes ---------------------------

def _upper_stage(src, dst, calls, **params):
    """A cheap stage: ``dst`` is ``src`` in capitals; ``calls`` counts its runs."""
    from credanno.demo import Stage

    def run():
        calls.append(1)
        dst.write_text(src.read_text().upper())

    return Stage("upper", run=run, inputs=(src,), outputs=(dst,), params=params)


def _same_size_and_mtime_rewrite(path, text):
    """Rewrite ``path`` with other content of the same size, and put its times back."""
    import os

    before = path.stat()
    assert len(text) == before.st_size and text != path.read_text()
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_stage_reruns_when_an_input_changes_content_but_not_size_or_mtime(tmp_path):
    from credanno.demo import Freshness

    src, dst, calls = tmp_path / "in.txt", tmp_path / "out.txt", []
    src.write_text("abcd")
    fresh = Freshness(tmp_path / "stages")
    assert fresh.run(_upper_stage(src, dst, calls)) is False and len(calls) == 1
    # unchanged inputs: skipped
    assert fresh.run(_upper_stage(src, dst, calls)) is True and len(calls) == 1
    _same_size_and_mtime_rewrite(src, "wxyz")
    assert fresh.run(_upper_stage(src, dst, calls)) is False and len(calls) == 2
    assert dst.read_text() == "WXYZ"
    assert fresh.run(_upper_stage(src, dst, calls)) is True and len(calls) == 2


def test_stage_reruns_when_outputs_params_or_manifest_change(tmp_path):
    from credanno.demo import Freshness

    src, dst, calls = tmp_path / "in.txt", tmp_path / "out.txt", []
    src.write_text("abcd")
    fresh = Freshness(tmp_path / "stages")
    stage = _upper_stage(src, dst, calls)
    fresh.run(stage)
    _same_size_and_mtime_rewrite(dst, "EFGH")  # an output replaced by something else
    assert fresh.run(stage) is False and dst.read_text() == "ABCD" and len(calls) == 2
    assert fresh.run(_upper_stage(src, dst, calls, mode="other")) is False and len(calls) == 3
    fresh.manifest(stage).write_text("{not json")
    assert fresh.run(stage) is False and len(calls) == 4
    dst.unlink()
    assert fresh.run(stage) is False and len(calls) == 5


def test_a_stage_that_fails_leaves_no_manifest(tmp_path):
    from credanno.demo import Freshness, Stage

    src, dst, calls = tmp_path / "in.txt", tmp_path / "out.txt", []
    src.write_text("abcd")
    fresh = Freshness(tmp_path / "stages")
    fresh.run(_upper_stage(src, dst, calls))

    def half_done():
        dst.write_text("ABC")
        raise RuntimeError("killed")

    src.write_text("wxyz")
    with pytest.raises(RuntimeError):
        fresh.run(Stage("upper", run=half_done, inputs=(src,), outputs=(dst,)))
    assert not fresh.manifest(_upper_stage(src, dst, calls)).exists()
    assert fresh.run(_upper_stage(src, dst, calls)) is False and dst.read_text() == "WXYZ"


def test_demo_embed_stages_rerun_only_for_changed_inputs(tmp_path, tiny_patch_file, monkeypatch):
    """The demo's declared embed stages, with a cheap stand-in for ``embed``: a checkpoint
    rewritten with the same size and mtime re-embeds the teacher and the random weights,
    not the raw pixels (which do not read it)."""
    from credanno.demo import DemoSpec, Freshness, StageRunner, declare_stages, pipeline

    made = []

    def fake_embed(d, name):
        made.append(name)
        d.stores[name].parent.mkdir(parents=True, exist_ok=True)
        d.stores[name].write_bytes(name.encode())

    monkeypatch.setattr(pipeline, "_embed", fake_embed)
    d = pipeline._setup(tmp_path / "demo", DemoSpec(seeds=1, device="cpu",
                                                    data=tiny_patch_file, preset="cpu-tiny"),
                        progress=False)
    d.checkpoint.parent.mkdir(parents=True)
    d.checkpoint.write_bytes(b"weights-1")

    def run_embed():
        runner = StageRunner(Freshness(d.path("cache", "stages")))
        stages = {s.name: s for s in declare_stages(d, runner)}
        assert stages["embed"].parts[0].inputs == (tiny_patch_file, d.checkpoint)
        runner.run_all([stages["prepare"], stages["embed"]])
        return runner.reused

    assert run_embed() == {"prepare": True, "embed teacher": False, "embed random": False,
                           "embed pixels": False}
    assert made == ["teacher", "random", "pixels"]
    assert all(run_embed()[f"embed {n}"] for n in ("teacher", "random", "pixels"))
    assert len(made) == 3
    _same_size_and_mtime_rewrite(d.checkpoint, "weights-2")
    reused = run_embed()
    assert made[3:] == ["teacher", "random"]
    assert reused["embed pixels"] and not reused["embed teacher"]


def test_demo_prepare_is_declared_with_its_output_and_source(tmp_path):
    from credanno.demo import DemoSpec, Freshness, StageRunner, declare_stages, pipeline

    d = pipeline._setup(tmp_path / "demo", DemoSpec(seeds=1, device="cpu", preset="cpu-tiny"),
                        progress=False)
    stages = declare_stages(d, StageRunner(Freshness(tmp_path / "stages")))
    prepare = stages[0]
    assert prepare.outputs == (tmp_path / "demo" / "data" / "phantom.h5",)
    assert dict(prepare.params) == {"source": "phantom"}
    assert [s.label for s in stages][-1] == "report" and len(stages) == 10


# -- the report template ----------------------------------------------------------------------

def _fake_report_inputs(tmp_path):
    """ReportInputs from stand-ins with the attributes the report reads (no evaluation)."""
    from types import SimpleNamespace

    import pandas as pd

    from credanno.demo.report import ReportInputs

    data = SimpleNamespace(text="SYNTHETIC test data (not CT)", is_real=False)

    def table1(acc):
        rows = pd.DataFrame({"source": ["ours", "ours", "baseline"],
                             "label": ["malignancy"] * 3, "setting": ["50-NN", "trained", "-"],
                             "acc_mean": [acc, acc + 0.1, 0.4], "acc_sd": [0.01, 0.02, 0.0],
                             "n_seeds": [2, 2, 2]})
        return SimpleNamespace(rows=rows, data=data, n_nodules=40, n_test_images=33,
                               markdown=lambda: "TABLE1-MD", exact_markdown=lambda: "EXACT-MD")

    fig = SimpleNamespace(markdown=lambda: "FIG-MD", caption=lambda markdown: "FIG4-CAPTION")
    out = tmp_path / "demo"
    return ReportInputs(
        out=out, t1={"teacher": table1(0.7), "random": table1(0.5), "pixels": table1(0.6)},
        f2=fig, f4=fig, figures={k: out / "figures" / f"{k}.png"
                                 for k in ("tsne", "tsne_compare", "fig2", "fig4")},
        cfg=SimpleNamespace(preset="cpu-tiny", arch="vit_tiny", model_kwargs={}, epochs=1),
        run=SimpleNamespace(run_dir=out / "runs" / "demo",
                            metrics=[{"loss": 5.0, "epoch": 1}, {"loss": 4.0, "epoch": 2}]),
        patch=tmp_path / "p.h5", seeds=[0, 1], timings={"prepare (phantom)": 1.0},
        reused={"prepare": True}, notes=["fig4: k clamped"])


def test_report_template_renders_every_placeholder(tmp_path):
    import re

    from credanno.demo.report import report_fields, report_template, report_text

    template = report_template()
    names = {m.group("named") or m.group("braced")
             for m in template.pattern.finditer(template.template)} - {None}
    fields = report_fields(_fake_report_inputs(tmp_path))
    assert names == set(fields)  # no placeholder without a value, no value without a place
    text = report_text(_fake_report_inputs(tmp_path))
    assert not re.search(r"\$\{?[A-Za-z_]", text)
    for value in fields.values():
        assert value in text
    assert text.startswith("# credanno demo report\n\n> **SYNTHETIC test data (not CT).**")
    assert "Seeds: [0, 1]." in text and "DINO loss 5.000 (epoch 1) -> 4.000 (epoch 2)." in text
    assert "| 50-NN | 70.00 ± 1.00 | 50.00 ± 1.00 | 60.00 ± 1.00 |" in text
    assert "beats same architecture, random weights in 2 of 2 and raw pixels in 2 of 2" in text
    assert "](figures/tsne_compare.png)" in text and "| prepare (phantom) | 1.0 | yes |" in text
    assert "- fig4: k clamped\n\nTables as CSV" in text and text.endswith("the stores.\n")


def test_demo_adopts_a_patch_file_of_its_source_left_without_a_manifest(tmp_path, tiny_table,
                                                                         monkeypatch):
    """A demo folder of an older version has no manifests: its patch file is kept when it
    is of the demo's source (its finished pretraining run is tied to the file's bytes)."""
    from credanno.data.patchfile import write_patch_file
    from credanno.demo import DemoSpec, Freshness, StageRunner, declare_stages, pipeline
    from credanno.synthetic import synthetic_images

    prepared = []
    monkeypatch.setattr(pipeline, "_prepare", lambda d: prepared.append(d.spec.source))

    def run_prepare(source):
        d = pipeline._setup(tmp_path / "demo", DemoSpec(seeds=1, device="cpu",
                                                        source=source, preset="cpu-tiny"),
                            progress=False)
        runner = StageRunner(Freshness(d.path("cache", "stages")))
        runner.run_all(declare_stages(d, runner)[:1])
        return d, runner.reused["prepare"]

    path = tmp_path / "demo" / "data" / "synthetic.h5"
    path.parent.mkdir(parents=True)
    write_patch_file(path, synthetic_images(tiny_table), tiny_table, {"source": "other"})
    d, reused = run_prepare("synthetic")
    assert not reused and prepared == ["synthetic"]  # another source: made again
    write_patch_file(path, synthetic_images(tiny_table), tiny_table, {"source": "synthetic"})
    Freshness(d.path("cache", "stages")).manifest(declare_stages(d, None)[0]).unlink()
    assert run_prepare("synthetic")[1] and prepared == ["synthetic"]  # adopted
    assert run_prepare("synthetic")[1] and prepared == ["synthetic"]  # now by its manifest
