"""The documentation site as a browser shows it: headless Chromium renders the index, a user-guide
page, an API page and a gallery page, and nothing on them is broken (every image loads, no raw
reStructuredText or Markdown, no docutils error boxes).

The site is the one ``PYRO_ELBO_DOCS_HTML`` points to (CI builds it, gallery included, before
the tests, and then this test fails rather than skips when Chromium is missing). Without it the
test builds the site itself without running the gallery, or skips when Sphinx or Chromium is not
installed (``pip install -e ".[docs]"``; Debian's ``chromium``). Screenshots are written next to
the site, in ``screenshots/``.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILT = os.environ.get("PYRO_ELBO_DOCS_HTML")

PAGES = {
    "index": "index.html",
    "guide": "guide/kl_gap.html",
    "api": "generated/pyro_elbo.kl_gap.html",
    "gallery": "auto_examples/quickstart.html",
}

#: what a page must not show as text: reST roles, directives and literals, MyST roles and fences,
#: Markdown links, TeX that MathJax did not typeset, and docutils' system messages
RAW_MARKUP = re.compile(
    r":(?:func|class|meth|attr|mod|doc|ref|math|data|exc):`|^\.\. [a-z-]+::|``|\{(?:func|class|doc|ref)\}`"
    r"|\\\(|\\\[|\\(?:log|mathrm|mid|frac)\b"
    r"|^```|\]\((?:\.\./|https?:|[\w/]+\.md)|System Message|\((?:ERROR|WARNING|SEVERE)/\d\)",
    re.MULTILINE,
)

#: loads a page in a frame, waits for every image (lazy ones made eager), and writes what it found
#: into the harness's DOM, which ``--dump-dom`` prints
HARNESS = """<!DOCTYPE html><html><body><iframe id="page" width="1280" height="30000"></iframe><script>
const frame = document.getElementById("page");
frame.onload = async () => {
  const doc = frame.contentDocument;
  const images = [...doc.images];
  for (const img of images) {
    img.loading = "eager";
    if (!img.complete) {
      await new Promise((done) => { img.onload = img.onerror = done; setTimeout(done, 5000); });
    }
  }
  const broken = images.filter((img) => !(img.complete && img.naturalWidth > 0)).map((img) => img.getAttribute("src"));
  const body = doc.body.cloneNode(true);
  body.querySelectorAll("pre, script, style").forEach((e) => e.remove());
  const result = {title: doc.title, images: images.length, broken: broken, text: body.innerText,
                  errors: doc.querySelectorAll(".system-message, .problematic").length};
  const out = document.createElement("pre");
  out.id = "result";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
};
frame.src = PAGE_URL;
</script></body></html>"""


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)


def _browser_flags(profile: Path) -> list[str]:
    """Chromium without a display, a sandbox, a GPU or network chatter, with ``profile`` as a new empty
    profile (a profile in use by another Chromium would hand the page to that process)."""
    assert not profile.exists(), profile
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if BUILT:
        path = Path(BUILT)
        assert (path / "index.html").is_file(), f"PYRO_ELBO_DOCS_HTML={BUILT} holds no built site"
        return path
    pytest.importorskip("sphinx", reason='the docs extra is not installed (pip install -e ".[docs]")')
    pytest.importorskip("sphinx_gallery", reason='the docs extra is not installed (pip install -e ".[docs]")')
    if _chromium() is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    out = tmp_path_factory.mktemp("site") / "html"
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-D", "plot_gallery=0"]
        + ["-d", str(out.parent / "doctrees"), str(ROOT / "docs"), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert build.returncode == 0, build.stderr[-4000:]
    return out


def _render(browser: str, page: Path, screenshot: Path, work: Path) -> dict:
    """Screenshot ``page`` and report its images and text as the browser shows them."""
    url = page.resolve().as_uri()
    shot = subprocess.run(
        [
            browser,
            *_browser_flags(work / f"profile-shot-{screenshot.stem}"),
            "--hide-scrollbars",
            "--window-size=1280,1600",
        ]
        + [f"--screenshot={screenshot}", "--virtual-time-budget=30000", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    harness = work / f"harness_{screenshot.stem}.html"
    harness.write_text(HARNESS.replace("PAGE_URL", json.dumps(url)), encoding="utf-8")
    dump = subprocess.run(
        [browser, *_browser_flags(work / f"profile-dom-{screenshot.stem}"), "--allow-file-access-from-files"]
        + ["--virtual-time-budget=30000", "--dump-dom", harness.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="result">(.*?)</pre>', dump.stdout, re.DOTALL)
    assert found is not None, f"the harness reported nothing for {page}: {dump.stderr[-2000:]}"
    result: dict = json.loads(html.unescape(found.group(1)))
    return result


def test_the_site_renders_without_broken_parts(site: Path, tmp_path: Path) -> None:
    browser = _chromium()
    assert browser is not None, "no chromium on PATH (Debian: apt-get install chromium)"
    shots = site.parent / "screenshots" if BUILT else tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    executed = BUILT is not None  # CI's site ran the gallery: its pages show the examples' figures
    texts = {}
    for name, relative in PAGES.items():
        page = site / relative
        assert page.is_file(), f"{relative} was not built"
        result = _render(browser, page, shots / f"{name}.png", tmp_path)
        assert not result["broken"], f"{relative}: images that did not load: {result['broken']}"
        assert result["errors"] == 0, f"{relative}: {result['errors']} docutils error(s) shown"
        raw = RAW_MARKUP.findall(result["text"])
        assert not raw, f"{relative} shows raw markup: {raw[:10]}"
        assert "pyro_elbo" in result["title"], result["title"]
        if name in ("index", "guide") or (name == "gallery" and executed):
            assert result["images"] >= 1, f"{relative} shows no image"
        texts[name] = result["text"]
    # the API page: the docstring's parameters with their type hints, the return type linked by name
    assert re.search(r"num_particles \(int\)", texts["api"]), texts["api"][:3000]
    assert "KLGapReport" in texts["api"]
    if executed:  # the gallery page shows the example's real output
        assert "KL-gap report" in texts["gallery"] and "verdict" in texts["gallery"]
