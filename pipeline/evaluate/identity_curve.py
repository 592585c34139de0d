"""What multi-image fitting buys: identity error against the number of images per subject.

Each subject with at least M usable landmark sets is refitted on random subsets of M of its images
(``repeats`` draws; one when M is all of them), with the run's own fit parameters and landmark
error model; every draw is fitted as its own subject in one batched call. Its identity is compared
with the true one (synthetic ground truth), in two metrics:

- all vertices: RMS distance after a similarity alignment of all vertices (``docs/fit.md``);
- Liu et al.'s: 68-landmark similarity alignment, mean distance within 95 mm of the nose tip.

The baseline is the model's mean shape on the same subjects: a fit whose ratio to it is >= 1
gives labels no better than a constant. Multi-image fitting's whole case is that this ratio falls
as M grows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.evaluate.bootstrap import ci95_ratio
from pipeline.evaluate.reconstruction import liu_error, similarity_transform
from pipeline.landmarks.scheme import IBUG68
from pipeline.models.morphable_model import MorphableModel

M_VALUES = (1, 2, 4, 8)


@dataclass(frozen=True)
class CurvePoint:
    m: int
    subjects: int  # subjects with at least m usable images
    draws: int  # fits measured (subjects x repeats)
    fit_all_mm: float
    mean_all_mm: float
    fit_liu_mm: float
    mean_liu_mm: float
    ci95_all: list[float] | None = None  # of ratio_all, subjects drawn with replacement
    ci95_liu: list[float] | None = None

    @property
    def ratio_all(self) -> float:
        return self.fit_all_mm / self.mean_all_mm if self.mean_all_mm > 0 else float("nan")

    @property
    def ratio_liu(self) -> float:
        return self.fit_liu_mm / self.mean_liu_mm if self.mean_liu_mm > 0 else float("nan")

    def as_dict(self) -> dict:
        return {
            "m": self.m,
            "subjects": self.subjects,
            "draws": self.draws,
            "fit_all_vertices_mm": round(self.fit_all_mm, 4),
            "mean_shape_all_vertices_mm": round(self.mean_all_mm, 4),
            "ratio_all_vertices": round(self.ratio_all, 4),
            "fit_liu_mm": round(self.fit_liu_mm, 4),
            "mean_shape_liu_mm": round(self.mean_liu_mm, 4),
            "ratio_liu": round(self.ratio_liu, 4),
            "ratio_all_vertices_ci95": _rounded(self.ci95_all),
            "ratio_liu_ci95": _rounded(self.ci95_liu),
        }


def _rounded(ci: list[float] | None) -> list[float] | None:
    return None if ci is None else [round(ci[0], 4), round(ci[1], 4)]


def subset_draws(
    subjects: np.ndarray, usable: np.ndarray, m: int, repeats: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """(row indices, draw name per row, (draw name, subject) per draw): ``repeats`` random
    m-subsets of each subject's usable rows (one when m is all of them), named ``<subject>#<k>``."""
    rows: list[int] = []
    names: list[str] = []
    draws: list[tuple[str, str]] = []
    for s in sorted(set(subjects[usable].tolist())):
        idx = np.flatnonzero((subjects == s) & usable)
        if len(idx) < m:
            continue
        for k in range(1 if len(idx) == m else repeats):
            pick = np.sort(rng.choice(idx, size=m, replace=False))
            rows.extend(pick.tolist())
            names.extend([f"{s}#{k}"] * m)
            draws.append((f"{s}#{k}", str(s)))
    return np.asarray(rows, np.int64), names, draws


def drawn_rows(table: pa.Table, rows: np.ndarray, names: list[str]) -> pa.Table:
    """The rows of :func:`subset_draws`' draws, each draw a subject of its own (its name)."""
    field = table.schema.get_field_index("subject")
    return table.take(pa.array(rows)).set_column(field, "subject", pa.array(names, pa.string()))


def identity_shape(model: MorphableModel, alpha: np.ndarray) -> np.ndarray:
    """(n, 3) mm: the identity shape of ``alpha`` (float32 bases, as the fit and the renderer)."""
    a = np.asarray(alpha, np.float32)
    return (model.mean + model.id_basis @ a).reshape(-1, 3).astype(np.float64)


def all_vertex_error(pred: np.ndarray, gt: np.ndarray) -> float:
    """RMS distance (mm) over all vertices after a similarity alignment of ``pred`` onto ``gt``."""
    sim = similarity_transform(pred, gt)
    return float(np.sqrt(np.mean(np.sum((sim.apply(pred) - gt) ** 2, axis=1))))


def identity_curve(
    landmarks: pa.Table,
    true_alpha: dict[str, np.ndarray],
    model: MorphableModel,
    fit: Callable[[pa.Table], pa.Table],
    ms: tuple[int, ...] = M_VALUES,
    repeats: int = 3,
    seed: int = 0,
    crop_radius_mm: float = 95.0,
) -> list[CurvePoint]:
    """The curve over ``ms`` (points with no subject left out). ``fit`` maps a landmarks table to
    its ``fits`` table (the run's fit, see :func:`pipeline.fit.stage.fit_landmark_table`)."""
    subjects = np.asarray(landmarks.column("subject").to_pylist(), dtype=object)
    usable = np.array([r is None for r in landmarks.column("failure_reason").to_pylist()], bool) & np.array(
        [s in true_alpha for s in subjects], bool
    )
    rng = np.random.default_rng(seed)
    mean = identity_shape(model, np.zeros(model.k_id))
    at = model.landmarks_of(IBUG68).locate
    truth = {s: identity_shape(model, a) for s, a in true_alpha.items()}
    baseline = {
        s: (all_vertex_error(mean, g), liu_error(mean, g, at(mean), at(g), crop_radius_mm).mean_mm)
        for s, g in truth.items()
    }
    points = []
    for m in ms:
        rows, names, draws = subset_draws(subjects, usable, m, repeats, rng)
        if not len(rows):
            continue
        fits = fit(drawn_rows(landmarks, rows, names))
        alpha_of: dict[str, np.ndarray] = {}
        for r in fits.select(["subject", "alpha_id"]).to_pylist():
            if r["alpha_id"] is not None:
                alpha_of.setdefault(r["subject"], np.asarray(r["alpha_id"]))
        fit_all, fit_liu, base_all, base_liu, people = [], [], [], [], []
        for name, s in draws:
            people.append(s)
            a = alpha_of.get(name)
            if a is None:  # the fit failed on this draw: it counts as the mean shape
                a = np.zeros(model.k_id)
            pred, g = identity_shape(model, a), truth[s]
            fit_all.append(all_vertex_error(pred, g))
            fit_liu.append(liu_error(pred, g, at(pred), at(g), crop_radius_mm).mean_mm)
            base_all.append(baseline[s][0])
            base_liu.append(baseline[s][1])
        points.append(
            CurvePoint(
                m=m,
                subjects=len({s for _, s in draws}),
                draws=len(draws),
                fit_all_mm=float(np.mean(fit_all)),
                mean_all_mm=float(np.mean(base_all)),
                fit_liu_mm=float(np.mean(fit_liu)),
                mean_liu_mm=float(np.mean(base_liu)),
                ci95_all=ci95_ratio(np.array(fit_all), np.array(base_all), np.array(people), seed),
                ci95_liu=ci95_ratio(np.array(fit_liu), np.array(base_liu), np.array(people), seed),
            )
        )
    return points


def verdict(points: list[CurvePoint]) -> str:
    """One plain sentence on what the curve says."""
    if not points:
        return "No subject had enough usable images to refit: the curve was not measured."
    last = points[-1]
    first = points[0]
    falls = len(points) > 1 and last.ratio_all < first.ratio_all and last.ratio_liu < first.ratio_liu
    trend = (
        f"it falls from {first.ratio_all:.2f}x at M = {first.m}"
        if falls
        else f"it does not fall with M ({first.ratio_all:.2f}x at M = {first.m})"
    )
    if last.ratio_all >= 1.0 or last.ratio_liu >= 1.0:
        return (
            f"The fitted identities lose to the mean shape: at M = {last.m} their error is "
            f"{last.ratio_all:.2f}x the mean shape's over all vertices and {last.ratio_liu:.2f}x in Liu's "
            f"95 mm metric; {trend}. These shape labels are no better than a constant."
        )
    return (
        f"At M = {last.m} the fitted identities are {last.ratio_all:.2f}x the mean shape's error over all "
        f"vertices and {last.ratio_liu:.2f}x in Liu's 95 mm metric; {trend}."
    )
