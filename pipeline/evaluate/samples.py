"""Prediction/ground-truth pairs for the reconstruction measures, and measuring one of them.

:class:`Sample` pairs one prediction (fit or encoder; full or identity shape) with its ground truth;
the generators stream them (two 53k-vertex shapes each: never all in memory) and build shapes in
batches. :func:`measure` turns one into a row of the ``evaluation`` schema, recording errors as a
failure_reason instead of raising.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluate.fit_quality import fitted_mask
from pipeline.evaluate.frame import Frame
from pipeline.evaluate.inputs import ScanTruth, SyntheticTruth, read_landmarks_3d
from pipeline.evaluate.meshes import ShapeBuilder, read_mesh
from pipeline.evaluate.reconstruction import genova_error, liu_error, yaw_bin
from pipeline.landmarks.scheme import IBUG68
from pipeline.models.morphable_model import MorphableModel

BATCH = 32


@dataclass
class Predictors:
    """Where predictions come from: the run's fits (+ model) and any trained encoders."""

    fits: Frame
    model: MorphableModel
    shape: ShapeBuilder
    # per encoder (its source name: "encoder", or "encoder <objective>" beside others): image ids ->
    # (image_id, identity shape, full shape) for the ids that have a crop
    encoder_shapes: dict[str, Callable[[list[str]], Iterator[tuple[str, np.ndarray, np.ndarray]]]] = field(
        default_factory=dict
    )


@dataclass
class Sample:
    """One prediction against one ground truth."""

    subject: str
    source: str
    target: str
    image_id: str | None
    pred: np.ndarray | None
    pred_triangles: np.ndarray | None
    pred_landmarks: np.ndarray | None
    gt: np.ndarray
    gt_triangles: np.ndarray
    gt_landmarks: np.ndarray
    yaw: float | None = None
    expression_level_mm: float | None = None
    failure_reason: str | None = None


def measure(sample: Sample, params: dict, with_genova: bool, seed: int) -> dict:
    """One evaluation row (schema ``evaluation``); errors become a failure_reason, never an exception."""
    row = {
        "image_id": sample.image_id,
        "subject": sample.subject,
        "source": sample.source,
        "target": sample.target,
        "yaw": None if sample.yaw is None else float(sample.yaw),
        "yaw_bin": None if sample.yaw is None else yaw_bin(sample.yaw),
        "expression_level_mm": sample.expression_level_mm,
        "failure_reason": sample.failure_reason,
    }
    if sample.failure_reason or sample.pred is None:
        row["failure_reason"] = row["failure_reason"] or "no_prediction"
        return row
    try:
        le = liu_error(
            sample.pred, sample.gt, sample.pred_landmarks, sample.gt_landmarks, params["crop_radius_mm"]
        )
        row.update(liu_mean_mm=le.mean_mm, liu_rms_mm=le.rms_mm, liu_vertices=le.n_vertices)
        if with_genova:
            ge = genova_error(
                sample.pred,
                sample.pred_triangles,
                sample.gt,
                sample.gt_triangles,
                sample.pred_landmarks,
                sample.gt_landmarks,
                radius_mm=params["crop_radius_mm"],
                max_points=params["genova_max_points"],
                max_pair_mm=params["icp_max_pair_mm"],
                max_iterations=params["icp_max_iterations"],
                seed=seed,
            )
            row.update(genova_mm=ge.mean_mm, genova_overlap=ge.overlap)
    except (ValueError, np.linalg.LinAlgError) as exc:
        row["failure_reason"] = f"error: {exc}"
    return row


def _fitted_by(fits: Frame, column: str) -> dict[str, int]:
    """value of ``column`` -> first fitted row."""
    ok = fitted_mask(fits)
    out: dict[str, int] = {}
    for i in np.flatnonzero(ok):
        out.setdefault(str(fits[column][i]), int(i))
    return out


def _no_pred(reason: str) -> dict:
    return {"pred": None, "pred_triangles": None, "pred_landmarks": None, "failure_reason": reason}


def _chunks(items: list, size: int = BATCH) -> Iterator[list]:
    for k in range(0, len(items), size):
        yield items[k : k + size]


def synthetic_samples(p: Predictors, truth: SyntheticTruth) -> Iterator[Sample]:
    """Fit (and encoder) predictions, and the mean shape as a baseline, against shapes rebuilt from
    the synthetic coefficients. Shapes are built in batches (see :class:`ShapeBuilder`)."""
    f, gt, shape = p.fits, truth.table, p.shape
    at, tri = p.model.landmarks_of(IBUG68).locate, p.model.triangles
    row_of = f.index_of("image_id")
    fitted_subject = _fitted_by(p.fits, "subject")
    gt_first = gt.index_of("image_id")
    mean = shape()
    for js in _chunks(sorted(gt_first.values())):
        full_gt = shape.many(gt["alpha_id"][js], gt["alpha_exp"][js])
        levels = shape.expression_levels(gt["alpha_exp"][js])
        rows = [row_of.get(str(gt["image_id"][j])) for j in js]
        ok = [i for i in rows if i is not None and f["failure_reason"][i] is None]
        preds = dict(zip(ok, shape.many(f["alpha_id"][ok], f["alpha_exp"][ok]), strict=True)) if ok else {}
        for k, (j, i) in enumerate(zip(js, rows, strict=True)):
            base = {
                "subject": str(gt["subject"][j]),
                "image_id": str(gt["image_id"][j]),
                "gt": full_gt[k],
                "gt_triangles": tri,
                "gt_landmarks": at(full_gt[k]),
                "yaw": float(gt["yaw"][j]),
                "expression_level_mm": float(levels[k]),
                "source": "fit",
                "target": "full",
            }
            if i is None:
                yield Sample(**base, **_no_pred("not_in_run"))
            elif i not in preds:
                yield Sample(**base, **_no_pred("fit_failed"))
            else:
                yield Sample(**base, pred=preds[i], pred_triangles=tri, pred_landmarks=at(preds[i]))
            # baseline: the model's mean shape for every image (what a fit must beat)
            yield Sample(
                **{**base, "source": "mean shape"}, pred=mean, pred_triangles=tri, pred_landmarks=at(mean)
            )
    for subjects in _chunks(sorted(gt.index_of("subject").items())):
        ident_gt = shape.many(gt["alpha_id"][[j for _, j in subjects]], None)
        rows = [fitted_subject.get(str(s)) for s, _ in subjects]
        ok = [i for i in rows if i is not None]
        preds = dict(zip(ok, shape.many(f["alpha_id"][ok], None), strict=True)) if ok else {}
        for k, ((subject, _), i) in enumerate(zip(subjects, rows, strict=True)):
            base = {
                "subject": str(subject),
                "image_id": None,
                "gt": ident_gt[k],
                "gt_triangles": tri,
                "gt_landmarks": at(ident_gt[k]),
                "source": "fit",
                "target": "identity",
            }
            if i is None:
                yield Sample(**base, **_no_pred("fit_failed"))
            else:
                yield Sample(**base, pred=preds[i], pred_triangles=tri, pred_landmarks=at(preds[i]))
    for source, encoder_shapes in p.encoder_shapes.items():
        for ids in _chunks(sorted(gt_first)):
            batch = list(encoder_shapes(ids))
            js = [gt_first[image_id] for image_id, _, _ in batch]
            full_gt = shape.many(gt["alpha_id"][js], gt["alpha_exp"][js])
            ident_gt = shape.many(gt["alpha_id"][js], None)
            levels = shape.expression_levels(gt["alpha_exp"][js])
            for k, (j, (image_id, ident, full)) in enumerate(zip(js, batch, strict=True)):
                common = {
                    "subject": str(gt["subject"][j]),
                    "image_id": image_id,
                    "gt_triangles": tri,
                    "pred_triangles": tri,
                    "source": source,
                }
                yield Sample(
                    target="full",
                    pred=full,
                    pred_landmarks=at(full),
                    gt=full_gt[k],
                    gt_landmarks=at(full_gt[k]),
                    yaw=float(gt["yaw"][j]),
                    expression_level_mm=float(levels[k]),
                    **common,
                )
                yield Sample(
                    target="identity",
                    pred=ident,
                    pred_landmarks=at(ident),
                    gt=ident_gt[k],
                    gt_landmarks=at(ident_gt[k]),
                    **common,
                )


def scan_samples(p: Predictors, truth: ScanTruth) -> Iterator[Sample]:
    """Fit (and encoder) predictions against user-supplied scans (different topology)."""
    model, f = p.model, p.fits
    at, tri = model.landmarks_of(IBUG68).locate, model.triangles
    by_image, by_subject = _fitted_by(p.fits, "image_id"), _fitted_by(p.fits, "subject")
    row_of = p.fits.index_of("image_id")
    for r in truth.rows:
        verts, faces = read_mesh(r["mesh"])
        gl = read_landmarks_3d(r["landmarks"])
        key = r["key"]
        if r["kind"] == "image_id":
            i = row_of.get(key)
            subject = str(f["subject"][i]) if i is not None else key.split("/")[0]
            base = {
                "subject": subject,
                "image_id": key,
                "gt": verts,
                "gt_triangles": faces,
                "gt_landmarks": gl,
                "yaw": r["yaw"],
                "expression_level_mm": r["expression_level_mm"],
                "target": "full",
            }
            i = by_image.get(key)
            if i is None:
                yield Sample(source="fit", **base, **_no_pred("fit_failed"))
            else:
                pred = p.shape(f["alpha_id"][i], f["alpha_exp"][i])
                yield Sample(source="fit", pred=pred, pred_triangles=tri, pred_landmarks=at(pred), **base)
            for source, encoder_shapes in p.encoder_shapes.items():
                for _, _, full in encoder_shapes([key]):
                    yield Sample(
                        source=source, pred=full, pred_triangles=tri, pred_landmarks=at(full), **base
                    )
        else:
            base = {
                "subject": key,
                "gt": verts,
                "gt_triangles": faces,
                "gt_landmarks": gl,
                "target": "identity",
            }
            i = by_subject.get(key)
            if i is None:
                yield Sample(source="fit", image_id=None, **base, **_no_pred("fit_failed"))
            else:
                pred = p.shape(f["alpha_id"][i])
                yield Sample(
                    source="fit",
                    image_id=None,
                    pred=pred,
                    pred_triangles=tri,
                    pred_landmarks=at(pred),
                    **base,
                )
            ids = sorted(str(x) for x, s in zip(f["image_id"], f["subject"], strict=True) if s == key)
            for source, encoder_shapes in p.encoder_shapes.items():
                for image_id, ident, _ in encoder_shapes(ids):
                    yield Sample(
                        source=source,
                        image_id=image_id,
                        pred=ident,
                        pred_triangles=tri,
                        pred_landmarks=at(ident),
                        **base,
                    )
