"""`dvc plots show` draws offline: the page `make setup` writes (Vega, Vega-Lite and vega-embed
inlined from checked npm tarballs) filled by real `dvc` on a temporary git copy of the repository,
then opened by a real headless Chromium with every host name unresolvable."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile

import pytest

from conftest import BIN, REPO
from covidxray import CovidXrayError
from covidxray.tools import plots_page
from test_dvc_outputs import _write_outputs
from test_pipeline import _sh, repo_copy  # noqa: F401 - the fixture, used by name

PAGE = REPO / ".venv" / "share" / "dvc-plots.html"  # .dvc/config: plots.html_template
BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def _tarball(path, script: bytes) -> None:
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(f"package/build/{path.name.rsplit('-', 1)[0]}.min.js")
        info.size = len(script)
        archive.addfile(info, io.BytesIO(script))


def test_page_inlines_checked_scripts_and_refuses_a_different_tarball(tmp_path):
    _tarball(tmp_path / "vega-lite-5.2.0.tgz", b"var x = '</script>';")
    digest = plots_page.hashlib.sha256((tmp_path / "vega-lite-5.2.0.tgz").read_bytes()).hexdigest()
    manifest = tmp_path / "vega.sha256"
    manifest.write_text(f"# comment\n{digest}  vega-lite-5.2.0.tgz\n")
    assert plots_page.npm_specs(manifest) == ["vega-lite@5.2.0"]
    page = plots_page.write_page(manifest, tmp_path, tmp_path / "out" / "page.html").read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC adds no CDN tags
    assert "var x = '<\\/script>';" in page and page.count("</script>") == 1  # the inline script stays whole

    manifest.write_text(f"{'0' * 64}  vega-lite-5.2.0.tgz\n")
    with pytest.raises(CovidXrayError, match="sha256 differs"):
        plots_page.write_page(manifest, tmp_path, tmp_path / "other.html")
    assert not (tmp_path / "other.html").exists()


def test_the_shipped_page_bundles_vega_and_loads_nothing(repo_root):
    html = PAGE.read_text()
    assert "<script src" not in html and "{plot_divs}" in html
    for name in ("vega", "vega-lite", "vega-embed"):
        assert f"{name}-" in (repo_root / "manifests" / "vega.sha256").read_text()
    assert "vegaEmbed" in html and "vega-lite" in html


@pytest.mark.skipif(BROWSER is None, reason="no headless browser installed (apt-get install chromium)")
def test_dvc_plots_show_draws_every_plot_offline_in_a_browser(repo_copy, tmp_path):  # noqa: F811
    _write_outputs(repo_copy, cv_auc=0.8)
    (repo_copy / PAGE.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(PAGE, repo_copy / PAGE.relative_to(REPO))
    _sh([str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "plots")], repo_copy)
    index = tmp_path / "plots" / "index.html"
    assert "cdn.jsdelivr" not in index.read_text()

    browser = [
        BROWSER,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: no host name resolves
        "--virtual-time-budget=20000",
        "--window-size=1400,2600",
    ]
    done = subprocess.run(
        [*browser, "--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=120, check=True
    )
    # vega-embed draws each plot into a canvas under its div; without Vega the divs stay empty
    plots = done.stdout.count('class="vega-embed')  # one per plot of dvc.yaml (7 with the study's forest)
    assert plots >= 7 and done.stdout.count('class="marks"') == plots, done.stdout[-2000:]  # every one drawn
    shot = tmp_path / "plots.png"
    subprocess.run([*browser, f"--screenshot={shot}", index.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    if keep := os.environ.get("COVIDXRAY_KEEP_SCREENSHOT"):  # to look at it
        shutil.copy2(shot, keep)
