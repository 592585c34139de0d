"""The evaluation report opened in a real (headless) browser: it renders, logs no console error and
shows every section. Skipped where no Chromium is installed (`.ci/run` installs Debian's)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_evaluate_run import make_run, toy_model

from pipeline.cli import main
from pipeline.evaluate import run as evrun
from pipeline.evaluate.report import SECTIONS

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


pytestmark = pytest.mark.skipif(browser() is None, reason="no Chromium installed (apt install chromium)")


def headless(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [
        browser(),
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


class Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, int] = {}  # id -> blocks inside (tables, images, paragraphs)
        self._current: str | None = None
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._current = a.get("id")
            self.sections[self._current] = 0
        elif self._current and tag in ("table", "img", "p"):
            self.sections[self._current] += 1
        if tag == "img":
            self.images.append(a.get("src", ""))


def test_report_renders_in_a_browser_without_console_errors(tmp_path, monkeypatch, capsys):
    model = toy_model()
    monkeypatch.setattr(evrun, "load_model", lambda manifest: (model, None))
    run, gt = make_run(tmp_path, model)
    assert main(["evaluate", str(run), "--ground-truth", str(gt), "--no-genova"]) == 0
    page = Path(capsys.readouterr().out.strip().splitlines()[-1])
    url = page.resolve().as_uri()

    shot = tmp_path / "page.png"
    res = headless([f"--screenshot={shot}", "--window-size=1200,4000", "--hide-scrollbars", url], tmp_path)
    assert shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), float)
    assert pixels.std() > 10, "the screenshot is blank"
    # console messages reach stderr as "...:CONSOLE(line)] message"; any error is a failure
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln]
    assert not [ln for ln in console if "error" in ln.lower()], console

    dom = headless(["--dump-dom", url], tmp_path)
    parsed = Dom()
    parsed.feed(dom.stdout)
    assert list(parsed.sections) == [sid for sid, _ in SECTIONS]
    empty = [sid for sid, n in parsed.sections.items() if n == 0]
    assert not empty, f"sections with nothing in them: {empty}"
    assert len(parsed.images) >= 4 and all(s.startswith("data:image/png;base64,") for s in parsed.images)
