"""``credanno explore``: the page's data checked in Python, and the page itself in headless
Chromium (Selenium + Debian's chromium-driver; skipped, with the reason, only where those
are absent: CI installs them in ``.ci/run``)."""

from __future__ import annotations

import io
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_error

from credanno import stores
from credanno.cli import main
from credanno.data.patchfile import file_sha256, write_patch_file
from credanno.errors import CredannoWarning
from credanno.eval.knn import knn_classify, knn_search
from credanno.labels import LABEL_NAMES
from credanno.synthetic import synthetic_features, synthetic_images, synthetic_table
from credanno.viz.explorer import explorer_page, script_json

HOSTILE = "</script><script>window.pwned=1</script><!-- & \u2028 \"'"
K = 5


def _make_store(folder: Path, n_nodules: int = 30,
                hostile: bool = True) -> tuple[Path, Path]:
    """A synthetic patch file and a store embedded "from" it (features with label signal)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = synthetic_table(n_nodules=n_nodules, per_nodule=3, seed=1)
    if hostile:  # a patient id that would end the page's script if not escaped
        table.loc[table.index[-1], "patient_id"] = HOSTILE
    patch = folder / "patches.h5"
    write_patch_file(patch, synthetic_images(table), table, {"source": "synthetic"})
    prov = {"patch_file": {"path": str(patch), "sha256": file_sha256(patch),
                           "source": "synthetic"}}
    store = folder / "store.h5"
    stores.save(store, features={"cls": synthetic_features(table, dim=24)}, table=table,
                provenance=prov)
    return store, folder / "patches.h5"


def page_data(html_text: str) -> dict:
    """The JSON the page draws from, read back from its script element."""
    m = re.search(r'<script type="application/json" id="credanno-data">(.*?)</script>',
                  html_text, re.S)
    assert m, "no data element"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _make_store(tmp_path_factory.mktemp("explore"))[0]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def page(store, cache_root):
    return explorer_page(store, split="test", color="margin", k=K, perplexity=5,
                         cache_root=cache_root)


def _python_neighbours(store: Path, k: int) -> tuple[list[list[int]], dict]:
    """Neighbour annotation ids and malignancy votes of every test image, from
    :mod:`credanno.eval.knn` directly."""
    with stores.open(store) as s:
        xtr, xte = s.features("train"), s.features("test")
        ttr = s.table("train")
        ytr = s.labels("malignancy", "train")
    _, idx = knn_search(xtr, xte, k)
    ids = ttr["annotation_id"].to_numpy()[idx].tolist()
    votes = knn_classify(xtr, ytr, xte, k, n_classes=2)[k]
    return ids, {"malignancy": votes.tolist()}


# ---------------------------------------------------------------- without a browser


def test_page_data_matches_the_store_and_knn(page, store):
    data = page_data(page.html)
    with stores.open(store) as s:
        test = s.table("test")
    assert page.n_points == len(test) == len(data["points"]["x"]) == data["meta"]["n"]
    rec = data["records"]
    shown = [rec["annotation_id"][r] for r in data["points"]["rec"]]
    assert shown == test["annotation_id"].tolist()
    ids, votes = _python_neighbours(store, K)
    got = [[rec["annotation_id"][r] for r in row] for row in data["neighbours"]["rec"]]
    assert got == ids
    assert data["votes"]["malignancy"]["pred"] == votes["malignancy"]
    assert set(data["votes"]) == set(LABEL_NAMES)
    assert all(s == "train" for row in data["neighbours"]["rec"] for s in
               (rec["split"][r] for r in row))
    assert data["meta"]["color"] == "margin" and data["meta"]["source"].startswith("SYNTHETIC")
    assert data["images"] and page.thumb_note is None
    assert len(data["images"]) * 3 // 4 >= page.n_images * 32 * 32


def test_hostile_strings_are_escaped(page):
    assert "window.pwned" in page.html  # it is in the data ...
    assert "</script><script>window.pwned" not in page.html  # ... but cannot end the script
    assert page.html.count("</script>") == 2  # the data element's and the code's
    assert "\u2028" not in page.html
    data = page_data(page.html)
    assert HOSTILE in data["records"]["patient_id"]  # and reads back exactly
    assert script_json({"s": "</script>&<!--"}) == '{"s":"\\u003c/script\\u003e\\u0026\\u003c!--"}'


def test_train_images_are_not_their_own_neighbours(store, cache_root):
    page = explorer_page(store, split="all", k=3, perplexity=5, cache_root=cache_root)
    data = page_data(page.html)
    pts = data["points"]
    for i, r in enumerate(pts["rec"]):
        nb = data["neighbours"]["rec"][i]
        assert len(nb) == 3 and r not in nb


def test_unknown_color_is_one_line(capsys, store):
    line = cli_error(capsys, ["explore", "--store", str(store), "--color", "colour"])
    assert line == ("error: unknown --color 'colour'; choose one of " + ", ".join(LABEL_NAMES))


def _one_warning(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    ours = [w for w in caught if issubclass(w.category, CredannoWarning)
            and "perplexity" not in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    return result, str(ours[0].message)


def test_missing_patch_file_page_without_thumbnails(tmp_path, cache_root):
    store, patch = _make_store(tmp_path / "gone", hostile=False)
    patch.unlink()
    page, message = _one_warning(lambda: explorer_page(store, perplexity=5,
                                                       cache_root=cache_root))
    assert "not found" in message and "no thumbnails" in message
    data = page_data(page.html)
    assert data["images"] == "" and data["meta"]["thumbNote"] == message
    assert page.n_points == len(data["points"]["x"]) > 0


def test_changed_patch_file_page_without_thumbnails(tmp_path, cache_root, capsys):
    store, patch = _make_store(tmp_path / "changed", hostile=False)
    with stores.open(store) as s:
        table = s.table()
    write_patch_file(patch, synthetic_images(table, seed=9), table, {"source": "synthetic"})
    page, message = _one_warning(lambda: explorer_page(store, perplexity=5,
                                                       cache_root=cache_root))
    assert "sha256 differs" in message and page_data(page.html)["images"] == ""
    out = tmp_path / "x.html"
    main(["explore", "--store", str(store), "--out", str(out), "--perplexity", "5"])
    err = capsys.readouterr().err
    assert err.count("sha256 differs") == 1 and out.exists()


def test_page_size_bound_for_a_lidc_size_store(tmp_path, monkeypatch):
    """2,673 images (LIDC's count), all mapped: far below the 25 MB the issue allows. The
    map itself is not what is measured, so t-SNE is replaced by a fast projection here."""
    from credanno.viz import tsne

    monkeypatch.setattr(tsne, "_fit", lambda x, *a: x[:, :2] * 10.0)
    store, _ = _make_store(tmp_path / "big", n_nodules=891, hostile=False)
    page = explorer_page(store, split="all", k=8, cache=False)
    assert page.n_points == 2673 and page.n_images == 2673
    assert page.size < 12e6  # ~5 MB measured; the bound is 25 MB


# ---------------------------------------------------------------- in headless Chromium


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for exe in ("chromium", "chromedriver"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser(page, tmp_path_factory):
    """One headless Chromium with the page loaded, shared by the browser tests."""
    reason = _browser_missing()
    if reason:
        pytest.skip(f"no browser test: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path_factory.mktemp("page") / "explorer.html"
    out.write_text(page.html, encoding="utf-8")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(out.resolve().as_uri())
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return !!(window.credannoExplorer && window.credannoExplorer.ready)"))
        yield driver
    finally:
        driver.quit()


def _js(driver, code: str, *args):
    return driver.execute_script(code, *args)


def test_page_renders_every_point(browser, page):
    from PIL import Image

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    canvas = browser.find_element("id", "plot")
    assert _js(browser, "return credannoExplorer.pointCount()") == page.n_points
    assert canvas.get_attribute("data-points") == str(page.n_points)
    shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB"))
    coloured = (np.abs(shot.astype(int) - 255).sum(axis=2) > 60).sum()
    assert coloured > 10 * page.n_points  # every point is ~30 pixels
    assert _js(browser, "return window.pwned === undefined")  # the hostile id stayed data
    assert browser.find_element("id", "source").text.startswith("Data: SYNTHETIC")


def _isolated_point(browser, n: int) -> int:
    """The point farthest from any other on the canvas (so the pointer picks it alone)."""
    pos = np.array([[p["x"], p["y"]] for p in _js(
        browser, "return [...Array(arguments[0]).keys()].map(i => "
                 "credannoExplorer.pointPosition(i))", n)])
    d = np.hypot(*(pos[:, None, :] - pos[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    return int(d.min(axis=1).argmax())


def test_pointer_hover_and_click_show_the_point_and_its_neighbours(browser, page, store):
    from selenium.webdriver.common.action_chains import ActionChains

    i = _isolated_point(browser, page.n_points)
    expected = _js(browser, "return credannoExplorer.annotationId(arguments[0])", i)
    canvas = browser.find_element("id", "plot")
    rect = canvas.rect
    pos = _js(browser, "return credannoExplorer.pointPosition(arguments[0])", i)
    dx = round(pos["x"] - (rect["x"] + rect["width"] / 2))
    dy = round(pos["y"] - (rect["y"] + rect["height"] / 2))
    ActionChains(browser).move_to_element_with_offset(canvas, dx, dy).perform()
    hover = browser.find_element("id", "hover-body")
    assert hover.get_attribute("data-annotation-id") == str(expected)
    assert f"annotation {expected} " in hover.text
    assert _js(browser, "return document.querySelectorAll('#hover canvas.thumb').length") == 1
    ActionChains(browser).click().perform()
    assert browser.find_element("id", "selected-body").get_attribute(
        "data-annotation-id") == str(expected)
    ids, _ = _python_neighbours(store, K)
    assert _js(browser, "return credannoExplorer.neighbourIds()") == ids[i]


def test_every_point_lists_the_python_neighbours(browser, page, store):
    ids, _ = _python_neighbours(store, K)
    got = _js(browser, "return [...Array(arguments[0]).keys()].map(i => "
                       "{credannoExplorer.select(i); return credannoExplorer.neighbourIds();})",
              page.n_points)
    assert got == ids
    hostile = page.n_points - 1  # the last test row carries the hostile patient id
    _js(browser, "credannoExplorer.hover(arguments[0])", hostile)
    assert HOSTILE.split("\u2028")[0].strip() in browser.find_element("id", "hover-body").text


def test_colour_selector_and_filters(browser, page, store):
    _js(browser, "credannoExplorer.setColor('malignancy')")
    legend = browser.find_element("id", "legend").text
    assert "benign" in legend and "malignant" in legend
    assert _js(browser, "return credannoExplorer.pointCount()") == page.n_points
    with stores.open(store) as s:
        test = s.table("test")
    box = browser.find_element("id", "dmin")
    box.send_keys("15")
    kept = int((np.round(test["diameter"].to_numpy(np.float64), 1) >= 15).sum())
    assert _js(browser, "return credannoExplorer.pointCount()") == kept
    box.clear()
    box.send_keys("0")
    assert _js(browser, "return credannoExplorer.pointCount()") == page.n_points
    browser.find_element("css selector", "#legend input").click()  # hide "benign"
    benign = int((test["malignancy"] == 0).sum())
    assert _js(browser, "return credannoExplorer.pointCount()") == page.n_points - benign


# ---------------------------------------------------------------- the demo's report.html


def test_report_markdown_becomes_html(tmp_path):
    from credanno.demo.report_html import markdown_html, report_html
    from credanno.outputs import md_code, md_text

    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"\x89PNG fake")
    md = (f"# Title\n\n> **{md_text('PHANTOM <data>')}.** quoted\n\nPatch {md_code('a`<b>.h5')} "
          f"of {md_text('</script>*x*_|')}\nsecond line\n\n| a | b |\n|---|---:|\n"
          "| 1 | 2.50 |\n\n- one\n- two\n\n![fig](figures/a.png)\n\n![gone](figures/b.png)\n")
    body = markdown_html(md)
    assert "<h1>Title</h1>" in body
    assert "<blockquote><p><strong>PHANTOM &lt;data&gt;.</strong> quoted</p></blockquote>" in body
    assert "<code>a`&lt;b&gt;.h5</code>" in body and "</script>" not in body
    assert "&lt;/script&gt;*x*_|" in body and "second line</p>" in body  # escapes kept literal
    assert '<td style="text-align:right">2.50</td>' in body and "<li>two</li>" in body
    page = report_html(md, tmp_path, explorer='<p title="x">&amp;</p>')
    assert 'src="data:image/png;base64,iVBOR' in page and "[figure missing: gone]" in page
    assert 'srcdoc="&lt;p title=&quot;x&quot;&gt;&amp;amp;&lt;/p&gt;"' in page
