"""``trainfluence demo --quick``: every link and image resolves; the report renders in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from PIL import Image

from trainfluence.cli import main

PAGES = ["index.html", "explain/index.html", "audit/index.html", "saliency/index.html"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--quick", "--out", str(out / "report"), "--cache-dir", str(out / "cache")])
    assert code == 0
    return {"out": out / "report", "stdout": buf.getvalue()}


def test_every_link_and_image_resolves(demo):
    out = demo["out"]
    for page in PAGES:
        path = out / page
        assert path.is_file(), page
        text = path.read_text()
        links = re.findall(r'(?:src|href)="([^"]+)"', text)
        assert links, page
        for link in links:
            assert not link.startswith(("http:", "https:", "/")), link  # self-contained, relative
            assert (path.parent / link).is_file(), f"{page}: {link}"
    images = re.findall(r'src="([^"]+)"', (out / "index.html").read_text())
    assert sum(1 for i in images if i.endswith(".png")) >= 5


def test_summary_printed(demo):
    text = demo["stdout"]
    for needle in ("test accuracy", "flipped labels in top 10%", "pointing accuracy", "time per stage", "index.html"):
        assert needle in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
def test_report_renders_in_headless_chromium(demo):
    shot = demo["out"] / "screenshot.png"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1280,2000",
                               f"--screenshot={shot}", (demo["out"] / "index.html").resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # the report has no scripts: any console message is an error
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 20  # not a blank page
    assert (pixels < 200).mean() > 0.05  # a real amount of drawn content (text, pictures)
