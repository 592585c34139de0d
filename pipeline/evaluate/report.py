"""``RUN/eval/report.html`` (self-contained, PNGs embedded as base64) and ``report.json``.

The evaluation computes; this module alone presents. The evaluation hands over the report
document (a plain JSON-able dict: what ``report.json`` holds), per section a list of blocks as data
(:class:`Table`, :class:`Heading`, :class:`Paragraph`, :class:`Figure`) and figures as data
(:class:`Histogram`, :class:`Roc`, :class:`Bars`, :class:`Sheet`); :func:`write_report` turns them
into HTML and matplotlib PNGs. No network resources, no scripts: the file opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

from pipeline.storage.atomic import atomic_write

matplotlib.use("Agg")  # headless: the report is written on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SECTIONS = (
    ("identity-curve", "What multi-image fitting buys"),
    ("summary", "Summary"),
    ("encoders", "Trained encoders side by side"),
    ("verification", "Face verification"),
    ("reconstruction", "3D reconstruction accuracy"),
    ("fit-quality", "Fit quality"),
    ("picture-sheet", "Picture sheet"),
    ("provenance", "Provenance"),
    ("notes", "Notes"),
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.muted{color:#777}
img{max-width:100%}nav a{margin-right:1em}code{background:#f4f4f4;padding:0 .2em}
"""


# --- figures ----------------------------------------------------------------------------------
# one colour per method in every figure (matplotlib's tab10 and its light partners), by meaning,
# not by plotting order: a method's identity shape or second feature is its lighter shade
METHOD_COLOURS = {
    "fit": "#1f77b4",
    "mean shape": "#7f7f7f",
    "encoder": "#ff7f0e",
    "fusion": "#2ca02c",
}
SERIES_COLOURS = {
    "fit/identity": "#aec7e8",
    "encoder/identity": "#ffbb78",
    "encoder α_id": "#ffbb78",
}


def colour_for(name: str) -> str | None:
    """The colour of a series: its own (``fit/identity``), else its method's (the name's start)."""
    name = name.replace(", identity shape", "/identity").replace(", full shape", "/full")
    low = name.lower()
    if name in SERIES_COLOURS:
        return SERIES_COLOURS[name]
    if "(fused)" in low:
        return METHOD_COLOURS["fusion"]
    for method in METHOD_COLOURS:
        if low.startswith(method):
            return METHOD_COLOURS[method]
    return None


def readable(name: str) -> str:
    """``fit/full`` -> ``fit, full shape`` (a prediction source and its target, for people)."""
    source, _, target = name.partition("/")
    return f"{source}, {target} shape" if target in ("full", "identity") else name


def _style(name: str) -> dict:
    """Colour by method; a second metric or target of the same method is dashed."""
    style: dict = {}
    c = colour_for(name)
    if c is not None:
        style["color"] = c
    if "liu" in name.lower():
        style["linestyle"] = "--"
    return style


def save_figure(fig: plt.Figure, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    fig.savefig(
        buf, format=fmt, dpi=100, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None
    )
    plt.close(fig)
    return buf.getvalue()


def lines_figure(
    x: list[float],
    series: dict[str, list[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    reference: float | None = None,
    fmt: str = "png",
) -> bytes:
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, ys in series.items():
        ax.plot(x, [np.nan if v is None else v for v in ys], marker="o", lw=1.8, label=name, **_style(name))
    if reference is not None:
        ax.axhline(reference, color=METHOD_COLOURS["mean shape"], lw=1.0, ls=":", label="mean shape")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, fmt)


def roc_figure(curves: dict[str, tuple[list[float], list[float]]], fmt: str = "png") -> bytes:
    """ROC curves (log-scaled false-accept axis, as face-verification papers plot them)."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for name, (fpr, tpr) in curves.items():
        f = np.clip(np.asarray(fpr, float), 1e-4, 1.0)
        ax.plot(f, tpr, label=name, lw=1.6, **_style(name))
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1.0)
    ax.set_ylim(0, 1.01)
    for far in (0.01, 0.1):
        ax.axvline(far, color="#bbb", lw=0.8, ls="--")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title("ROC")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, fmt)


def histogram_figure(
    series: dict[str, np.ndarray], title: str, xlabel: str, bins: int = 30, fmt: str = "png"
) -> bytes:
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    finite = [np.asarray(v, float)[np.isfinite(np.asarray(v, float))] for v in series.values()]
    allv = np.concatenate(finite) if finite else np.array([])
    edges = np.histogram_bin_edges(allv, bins=bins) if len(allv) else bins
    for (name, _), v in zip(series.items(), finite, strict=True):
        ax.hist(v, bins=edges, alpha=0.6, label=f"{readable(name)} (n={len(v)})", color=colour_for(name))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    if len(series) > 1 or series:
        ax.legend(fontsize=8)
    return save_figure(fig, fmt)


def bar_figure(
    labels: list[str], series: dict[str, list[float]], title: str, ylabel: str, fmt: str = "png"
) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for k, (name, vals) in enumerate(series.items()):
        ax.bar(
            x + k * width - 0.4 + width / 2,
            [v if v is not None else np.nan for v in vals],
            width,
            label=readable(name),
            color=colour_for(name),
        )
    ax.set_xticks(x, labels)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, fmt)


def sheet_figure(
    rows: list[tuple[str, list[np.ndarray | None]]], columns: list[str], fmt: str = "png"
) -> bytes:
    """A grid: one row per image, columns = input beside its renders (the papers' Fig. 5/8 layout)."""
    nr, nc = len(rows), len(columns)
    fig, axes = plt.subplots(nr, nc, figsize=(1.9 * nc, 1.9 * nr), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(nc):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            img = images[c] if c < len(images) else None
            if img is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", color="#999", transform=ax.transAxes)
            else:
                ax.imshow(img)
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return save_figure(fig, fmt)


# --- what the evaluation hands over (data, no markup) ------------------------------------------------
@dataclass(frozen=True)
class Table:
    rows: list[dict]
    columns: list[str] | None = None
    headers: list[str] | None = None


@dataclass(frozen=True)
class Heading:
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str
    muted: bool = False


@dataclass(frozen=True)
class Figure:
    """A reference to a figure of the ``figures`` mapping, shown where the block stands."""

    name: str


@dataclass(frozen=True)
class Histogram:
    series: dict[str, np.ndarray]
    title: str
    xlabel: str
    bins: int = 30


@dataclass(frozen=True)
class Roc:
    curves: dict[str, tuple[list[float], list[float]]]


@dataclass(frozen=True)
class Bars:
    labels: list[str]
    series: dict[str, list[float]]
    title: str
    ylabel: str


@dataclass(frozen=True)
class Lines:
    x: list[float]
    series: dict[str, list[float]]
    title: str
    xlabel: str
    ylabel: str
    reference: float | None = None  # a horizontal reference line (the baseline)


@dataclass(frozen=True)
class Sheet:
    rows: list[tuple[str, list[np.ndarray | None]]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)


Block = Table | Heading | Paragraph | Figure | str  # str: ready HTML (callers of render_html)
FigureData = Histogram | Roc | Bars | Lines | Sheet | bytes  # bytes: a ready PNG


def figure_bytes(spec: FigureData, fmt: str = "png") -> bytes | None:
    """Render a figure's data as ``png`` or ``svg`` (None: a ready PNG has no SVG)."""
    if isinstance(spec, bytes):
        return spec if fmt == "png" else None
    if isinstance(spec, Histogram):
        return histogram_figure(spec.series, spec.title, spec.xlabel, spec.bins, fmt)
    if isinstance(spec, Roc):
        return roc_figure(spec.curves, fmt)
    if isinstance(spec, Bars):
        return bar_figure(spec.labels, spec.series, spec.title, spec.ylabel, fmt)
    if isinstance(spec, Lines):
        return lines_figure(spec.x, spec.series, spec.title, spec.xlabel, spec.ylabel, spec.reference, fmt)
    if isinstance(spec, Sheet):
        return sheet_figure(spec.rows, spec.columns, fmt)
    raise TypeError(f"not a figure: {type(spec).__name__}")


# --- HTML -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A 95 % interval as a table cell: ``[lo, hi]``; ``None`` (not measurable) shows as a dash."""

    bounds: list[float] | tuple[float, float] | None


# below this magnitude a float is rounding noise of a zero (a spread that is zero by construction)
ZERO = 1e-9


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, Interval):
        return "–" if v.bounds is None else f"[{_fmt(float(v.bounds[0]))}, {_fmt(float(v.bounds[1]))}]"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        if math.isfinite(float(v)) and abs(float(v)) < ZERO:
            return "0"
        return (
            "–"
            if not math.isfinite(float(v))
            else f"{float(v):.4g}"
            if abs(float(v)) < 1e4
            else f"{float(v):.0f}"
        )
    if isinstance(v, dict) and {"mean", "std"} <= set(v):
        return f"{_fmt(v['mean'])} ± {_fmt(v['std'])}"
    return str(v)


def html_table(rows: list[dict], columns: list[str] | None = None, headers: list[str] | None = None) -> str:
    if not rows:
        return '<p class="muted">no data</p>'
    columns = columns or list(rows[0])
    headers = headers or columns
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _p(text: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f"<p{c}>{html.escape(text)}</p>"


def render_block(block: Block, figures: dict[str, bytes]) -> str:
    if isinstance(block, Table):
        return html_table(block.rows, block.columns, block.headers)
    if isinstance(block, Heading):
        return f"<h3>{html.escape(block.text)}</h3>"
    if isinstance(block, Paragraph):
        return _p(block.text, "muted" if block.muted else "")
    if isinstance(block, Figure):
        return html_image(figures[block.name], block.name) if block.name in figures else ""
    if block.startswith("figure:"):
        key = block[len("figure:") :]
        return html_image(figures[key], key) if key in figures else ""
    return block


def render_html(doc: dict, figures: dict[str, bytes], blocks: dict[str, list[Block]]) -> str:
    """The whole page. ``blocks`` maps a section id to its blocks; ``figures`` (PNG bytes) are
    embedded where a :class:`Figure` block names them."""
    title = f"morphset evaluation — {doc.get('run', '')}"
    nav = "".join(f'<a href="#{sid}">{html.escape(name)}</a>' for sid, name in SECTIONS)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _p(f"written {doc.get('created_at', '')} by morphset {doc.get('morphset_version', '')}", "muted"),
        f"<nav>{nav}</nav>",
    ]
    for sid, name in SECTIONS:
        parts.append(f'<section id="{sid}"><h2>{html.escape(name)}</h2>')
        for block in blocks.get(sid, []) or [Paragraph("not evaluated in this run", muted=True)]:
            parts.append(render_block(block, figures))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _finite(o: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    if isinstance(o, float | np.floating) and not math.isfinite(float(o)):
        return None
    return o


def write_report(
    out_dir: str | Path, doc: dict, figures: dict[str, FigureData], blocks: dict[str, list[Block]]
) -> Path:
    """Write report.json and report.html (and the figures as PNG and SVG files beside them; the
    picture sheet, a grid of photos, as PNG only); returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in figures.items():
        if not isinstance(spec, Sheet | bytes):
            atomic_write(out / f"{name}.svg", figure_bytes(spec, "svg"))
    figures = {name: figure_bytes(spec) for name, spec in figures.items()}
    for name, png in figures.items():
        atomic_write(out / f"{name}.png", png)
    atomic_write(
        out / "report.json", json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False)
    )
    page = out / "report.html"
    atomic_write(page, render_html(doc, figures, blocks))
    return page
