"""Report page pieces: escaping, NaN handling in report.json, embedded figures, the shaded render."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np

from pipeline.evaluate import report as rp
from pipeline.evaluate.shading import render_shaded


class Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells, self.sections, self.imgs = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.sections.append(dict(attrs)["id"])
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.cells.append(data)


def test_write_report_is_valid_and_self_contained(tmp_path):
    doc = {"run": "r<1>", "value": float("nan"), "nested": [1.0, float("inf")]}
    png = rp.roc_figure({"a": ([0.0, 0.5, 1.0], [0.0, 0.9, 1.0])})
    blocks = {
        "summary": [rp.html_table([{"name": "<script>", "acc": {"mean": 99.5, "std": 0.25}}])],
        "verification": ["figure:roc"],
    }
    page = rp.write_report(tmp_path, doc, {"roc": png}, blocks)
    text = page.read_text(encoding="utf-8")
    p = Collect()
    p.feed(text)
    assert p.sections == [s for s, _ in rp.SECTIONS]
    assert "<script>" not in text  # table content is escaped
    assert "99.5 ± 0.25" in p.cells
    assert len(p.imgs) == 1 and p.imgs[0].startswith("data:image/png;base64,iVBOR")
    j = json.loads((tmp_path / "report.json").read_text())
    assert j["value"] is None and j["nested"] == [1.0, None]
    assert (tmp_path / "roc.png").read_bytes() == png
    # sections without content say so instead of vanishing
    assert "not evaluated in this run" in text


def test_render_shades_a_surface_facing_the_viewer():
    n = 30
    xs = np.linspace(-50, 50, n)
    x, y = np.meshgrid(xs, xs)
    z = 30 * np.exp(-(x**2 + y**2) / 800)
    v = np.stack([x.ravel(), y.ravel(), z.ravel()], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tri = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    img = render_shaded(v, tri, size=64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    covered = (img < 255).any(axis=2)
    assert covered[6:58, 6:58].all()  # rasterised triangles: a closed surface, no gaps between vertices
    # the light comes from the upper right (+x, +y): slopes facing it are brighter
    g = img[..., 0].astype(float)
    upper_right, lower_left = g[8:28, 36:56], g[36:56, 8:28]
    assert upper_right.mean() > lower_left.mean() + 20
    # a rotation is applied before viewing: seen from the side the dome covers fewer pixels
    side = render_shaded(v, tri, size=64, rotation=np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]]))
    assert (side < 255).any(axis=2).mean() < covered.mean()
