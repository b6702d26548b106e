"""The HTML/PNG report: contents, escaping, self-containment, safe writes, a real browser."""

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import gradscope
from gradscope.report import html as report_html
from gradscope.store import Store

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory):
    """A small sweep over every comparison: activations, inits, gated cells, trained a bit."""
    folder = tmp_path_factory.mktemp("sweep")
    spec = gradscope.sweep_spec(seeds=2, options={"hidden": [4], "batch": [4], "seq_len": [15],
                                                  "steps": [4], "profile_every": [2]},
                                config_file=_write_toml(folder.parent / "s.toml"))
    gradscope.sweep(spec, folder, workers=1, report=False,
                    command="gradscope sweep <script>alert('x')</script>")
    return folder


def _write_toml(path: Path) -> Path:
    path.write_text("""
[[runs]]
cell = "rnn"
activation = "tanh"
[[runs]]
cell = "rnn"
activation = "sigmoid"
[[runs]]
cell = "rnn"
activation = "tanh"
init = "orthogonal"
[[runs]]
cell = "lstm"
forget-bias = 3.0
[[runs]]
cell = "gru"
""")
    return path


def test_report_has_every_section_and_png_files(sweep_folder):
    index = gradscope.write_report(sweep_folder)
    assert index == sweep_folder / "report" / "index.html"
    page = index.read_text()
    for section in ("activations", "initialisations", "gated", "cell-state", "ranking",
                    "theory", "heatmap", "training-curves", "over-training", "metadata"):
        assert f'id="{section}"' in page, section
    files = {p.name for p in index.parent.iterdir()}
    assert {"compare-activations.png", "compare-gated.png", "heatmap.png",
            "training-curves.png", "over-training.png", "index.html"} <= files
    assert not [f for f in files if f.startswith(".")]  # no temp files left
    # the ranking: best (least vanishing) first, with trained loss against chance
    ranking = page[page.index('id="ranking"'):page.index("</section>", page.index('id="ranking"'))]
    rows = re.findall(r"<tr><td>([^<]+)</td>", ranking)
    assert len(rows) == 5 and rows[0] != "rnn/sigmoid pytorch" and rows[-1] == "rnn/sigmoid pytorch"
    assert "/2</td>" in page  # learned k/2 seeds
    theory = page[page.index('id="theory"'):page.index("</section>", page.index('id="theory"'))]
    for prediction in ("lyapunov", "mean-field", "gate-product"):
        assert f"<td>{prediction}</td>" in theory


def test_report_is_self_contained_and_escapes_user_text(sweep_folder):
    page = gradscope.write_report(sweep_folder).read_text()
    assert "<script" not in page  # the command carried a script tag: escaped
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources)
    assert "http://" not in page and "https://" not in page


def test_a_failed_render_keeps_the_previous_report(sweep_folder, monkeypatch):
    index = gradscope.write_report(sweep_folder)
    before = index.read_bytes()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gradscope.report.render", broken)
    with pytest.raises(OSError):
        gradscope.write_report(sweep_folder)
    # a disk that fills while the file is written: a clear error, the old file stays
    monkeypatch.undo()

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_text", full)
    with pytest.raises(gradscope.GradscopeError, match="No space left on device"):
        gradscope.write_report(sweep_folder)
    assert index.read_bytes() == before
    assert not [p for p in index.parent.iterdir() if p.name.startswith(".")]


def test_failed_runs_are_listed(tmp_path, sweep_folder):
    shutil.copytree(sweep_folder, tmp_path / "copy")
    with Store(tmp_path / "copy") as store:
        store.add(gradscope.RunConfig(cell="gru", seed=9), None,
                  error="RuntimeError: <b>exploded</b>")
    page = gradscope.write_report(tmp_path / "copy").read_text()
    assert 'id="failed"' in page and "&lt;b&gt;exploded&lt;/b&gt;" in page


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if not (chromium and driver and webdriver):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium, chromium-driver and selenium (.ci/run does)")
        pytest.skip("needs Debian's chromium and chromium-driver, and selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_report_in_a_real_browser_loads_every_image_without_errors(sweep_folder, tmp_path):
    index = gradscope.write_report(sweep_folder)
    browser = _browser()
    try:
        browser.set_window_size(1100, 2400)
        browser.get(index.as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        browser.save_screenshot(str(tmp_path / "report.png"))
    finally:
        browser.quit()
    assert len(images) >= 5
    assert all(complete and width > 0 for complete, width in images), images
    assert errors == []


def test_render_escapes_every_label():
    from gradscope.report.data import ReportData, Row
    data = ReportData("grad_h0", [], [], None, [Row("<i>x</i>", 1, -0.1, 3.0, 5.0, "vanishing",
                                                    None, None, "-", None)], [], {},
                      [("<u>y</u>", "<err>")], meta={"command": "<b>"})
    page = report_html.render(data, {}, "<title>")
    assert "<i>" not in page and "<u>" not in page and "<err>" not in page and "<b>" not in page


def test_a_probe_no_run_measured_is_refused_and_the_report_kept(sweep_folder):
    """A typo in --probe used to replace the report by one with empty figures."""
    index = gradscope.write_report(sweep_folder)
    before = index.read_bytes()
    for call in (gradscope.write_report, gradscope.ranking):
        with pytest.raises(gradscope.ConfigError, match="measured probe 'grad_h1' for --probe; "
                                                        "choose from: adjoint, .*grad_h0"):
            call(sweep_folder, probe="grad_h1")
    assert index.read_bytes() == before
    assert [r.label for r in gradscope.ranking(sweep_folder, probe="jacobian")]


def test_a_sweep_without_grad_h0_reports_the_probe_it_measured(tmp_path, capsys):
    """A sweep of probes = ["adjoint"] ran every run, then ended in 'no run measured probe
    grad_h0' (exit 2) instead of its report."""
    from gradscope.cli import main
    config = tmp_path / "s.toml"
    config.write_text('seeds = 2\n[base]\nseq-len = 12\nhidden = 3\nbatch = 2\n'
                      'probes = ["adjoint", "jacobian"]\n[grid]\ncell = ["rnn", "gru"]\n')
    out = tmp_path / "sw"
    with pytest.raises(SystemExit) as info:
        main(["sweep", "--config", str(config), "--out", str(out), "--workers", "1"])
    text = capsys.readouterr().out
    assert info.value.code == 0, text
    assert "ranking by the median slope of adjoint" in text
    assert gradscope.report_probe(out) == "adjoint"
    assert gradscope.report_probe(out, "jacobian") == "jacobian"
    rows = gradscope.ranking(out)
    assert {r.label for r in rows} == {"gru pytorch", "rnn/tanh pytorch"}
    assert [r.slope for r in rows] == [r.slope for r in gradscope.ranking(out, "adjoint")]
    page = (out / "report" / "index.html").read_text()
    assert "adjoint" in page


def test_the_ranking_alone_is_the_reports_ranking(sweep_folder):
    from gradscope.report.data import build
    from gradscope.store import Store

    with Store(sweep_folder, create=False) as store:
        for probe in ("grad_h0", "adjoint"):
            assert gradscope.ranking(sweep_folder, probe) == build(store, probe).ranking


def test_comparisons_say_which_configurations_lack_the_probe():
    """--probe grad_c0 drew the gated cells "against the rnn/tanh pytorch baseline" with no
    baseline in sight (a vanilla RNN has no c), and dropped the activation and initialisation
    comparisons without a word."""
    from gradscope.report.data import Line, _comparisons
    labels = {"rnn/tanh pytorch": ("rnn", "tanh", "pytorch"),
              "rnn/relu pytorch": ("rnn", "relu", "pytorch"),
              "rnn/tanh orthogonal": ("rnn", "tanh", "orthogonal"),
              "lstm pytorch": ("lstm", None, "pytorch"),
              "lstm pytorch forget-bias 3": ("lstm", None, "pytorch"),
              "gru pytorch": ("gru", None, "pytorch")}
    ok = pd.DataFrame([{"label": k, "cell": c, "activation": a, "init": i}
                       for k, (c, a, i) in labels.items()])

    def line(label, probe):
        if probe in ("grad_c0", "jacobian_c") and not label.startswith("lstm"):
            return None
        return Line(label, np.arange(1, 4), np.zeros(3), np.zeros(3), np.zeros(3), 1)

    by_key = {c.key: c for c in _comparisons(ok, "grad_c0", line)}
    assert not by_key["activations"].shown() and not by_key["initialisations"].shown()
    assert by_key["activations"].missing == ["rnn/tanh pytorch", "rnn/relu pytorch"]
    gated = by_key["gated"]
    assert gated.shown() and [x.label for x in gated.lines] == [
        "lstm pytorch", "lstm pytorch forget-bias 3"]
    assert gated.missing == ["rnn/tanh pytorch", "gru pytorch"]
    assert "baseline" not in gated.fixed and "no grad_c0" in gated.fixed
    # with the probe every cell has, the baseline is drawn and named, nothing missing
    gated = {c.key: c for c in _comparisons(ok, "grad_h0", line)}["gated"]
    assert gated.fixed == "against the rnn/tanh pytorch baseline" and gated.missing == []
    assert len(gated.lines) == 4


def test_a_report_on_a_probe_some_cells_lack_says_what_it_left_out(sweep_folder):
    page = gradscope.write_report(sweep_folder, probe="grad_c0").read_text()
    assert 'id="activations"' not in page and 'id="cell-state"' in page
    note = page[page.index("Not drawn: "):]
    note = note[:note.index("</p>")]
    for title in ("Activation functions", "Initialisations", "Gated cells"):
        assert title in note
    assert "rnn/tanh pytorch" in note and "gru pytorch" in note
    gradscope.write_report(sweep_folder)  # as the other tests expect it
    assert "Not drawn" not in (sweep_folder / "report" / "index.html").read_text()


def test_a_report_on_the_adjoint_draws_it_from_k_0(sweep_folder):
    """The report drew every probe from step 1: the adjoint, whose k starts at 0 (the loss's
    own step), sat one step to the right of where it was measured, in its lines, its
    Lyapunov line and its heatmap."""
    from gradscope.report.data import build
    with Store(sweep_folder) as store:
        adjoint, grad = build(store, "adjoint"), build(store, "grad_h0")
    for c in adjoint.comparisons:
        if c.probe == "adjoint":
            assert all(line.steps[0] == 0 for line in c.lines), c.key
    assert adjoint.heatmap_first == 0 and grad.heatmap_first == 1
    assert all(line.steps[0] == 1 for c in grad.comparisons for line in c.lines)
