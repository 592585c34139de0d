"""The evaluation report opened in a real (headless) browser: it renders, logs no console error and
shows every section. Skipped where no Chromium is installed (`.ci/run` installs Debian's)."""

from __future__ import annotations

import re
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
        self.tables: dict[str, list[list[list[str]]]] = {}  # section -> tables -> rows -> cells
        self.text: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._current = a.get("id")
            self.sections[self._current] = 0
        elif self._current and tag in ("table", "img", "p"):
            self.sections[self._current] += 1
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "table" and self._current:
            self.tables.setdefault(self._current, []).append([])
        elif tag == "tr" and self._current in self.tables:
            self.tables[self._current][-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._current in self.tables:
            self.tables[self._current][-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def test_report_renders_in_a_browser_without_console_errors(tmp_path, monkeypatch, capsys):
    model = toy_model()
    monkeypatch.setattr(evrun, "load_model", lambda manifest: (model, None))
    run, gt = make_run(tmp_path, model, per_image_identity=True)  # per-image α_id: a verification row
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

    # no degenerate figure: every verification row has both classes, an AUC and an interval; no
    # number printed in rounding-noise notation (8.6e-15 for a zero)
    (header, *rows), *_ = parsed.tables["verification"]
    assert rows, "no verification row"
    for row in rows:
        cell = dict(zip(header, row, strict=True))
        same, different = (int(x) for x in cell["pairs (same / different)"].split(" / "))
        assert same > 0 and different > 0, cell
        assert cell["AUC"] != "–" and cell["accuracy 95% CI"].startswith("["), cell
    assert not re.search(r"\d\.?\d*e[-+]\d", " ".join(parsed.text)), "a number in e-notation"
    (header, *rows), *_ = parsed.tables["summary"]
    for row in rows:
        cell = dict(zip(header, row, strict=True))
        assert cell["value"] not in ("–", "nan"), cell
