"""Landmark accuracy against known truth: faces rendered from the morphable model.

Used by ``benchmarks/detect_landmarks.py`` and the tests. Renders come from :mod:`pipeline.synthetic.render`
(the ``morphset synth`` renderer) with the true projected 68 landmark vertices and their
visibility; detection + a landmark backend are then scored in pixels. Note that the model's
landmark vertices and the iBUG annotation convention are not identical (jaw line and brows
differ most), so part of the error is definitional.
"""

from __future__ import annotations

import numpy as np

from pipeline.detect.stage import detect_images, detection_row
from pipeline.landmarks.base import LandmarkBackend
from pipeline.landmarks.scheme import IBUG68


def synthetic_renders(manifest: object, n: int, seed: int = 0) -> tuple[list, list, list]:
    """Faces rendered from the manifest's morphable model (pipeline.synthetic.render), 250x250, with the
    true projected landmarks and their visibility. Yaw within 30, pitch and roll within 10 degrees."""
    from pipeline.fit.camera import rotation_from_euler_deg
    from pipeline.models.assets import resolve_morphable_model
    from pipeline.synthetic import render as R

    mm = resolve_morphable_model(manifest)
    rng = np.random.default_rng(seed)
    regions = R.face_regions(mm.shape(), mm.landmarks_of(IBUG68))
    images, truth, visible = [], [], []
    for _ in range(n):
        verts = mm.shape(rng.normal(size=mm.k_id) * mm.id_std, rng.normal(size=mm.k_exp) * mm.exp_std * 0.5)
        rot = rotation_from_euler_deg(rng.uniform(-30, 30), rng.uniform(-10, 10), rng.uniform(-10, 10))
        cam = R.Camera(rot, float(rng.uniform(0.75, 0.95)), np.array([125.0, 130.0]) + rng.uniform(-8, 8, 2))
        res = R.render_face(
            verts,
            mm.triangles,
            R.paint_albedo(regions, R.sample_appearance(rng)),
            mm.landmarks_of(IBUG68),
            cam,
            R.sample_lighting(rng),
            R.sample_background(rng, 250, 250),
        )
        images.append(res.image)
        truth.append(res.landmarks_2d)
        visible.append(res.visible)
    return images, truth, visible


def landmark_errors(
    images: list, truth: list, visible: list, detector: object, params: dict, backend: LandmarkBackend
) -> dict:
    """Detect + landmark the renders; pixel error against the true projected landmarks."""
    found = detect_images(detector, images, params)
    errs, inner, nme, missed = [], [], [], 0
    for im, f, gt, vis in zip(images, found, truth, visible, strict=True):
        row = detection_row({}, im.shape[1], im.shape[0], f, params) if not isinstance(f, str) else None
        if row is None or row["failure_reason"]:
            missed += 1
            continue
        res = backend.predict([(im, np.asarray(row["primary_box"]))])[0]
        if isinstance(res, str):
            missed += 1
            continue
        e = np.linalg.norm(res[0] - gt, axis=1)
        errs.append(e[vis].mean())
        inner_ids = IBUG68.inner
        inner.append(e[inner_ids][vis[inner_ids]].mean())
        eyes = [gt[IBUG68.group(part)].mean(0) for part in ("right_eye", "left_eye")]
        nme.append(e[vis].mean() / np.linalg.norm(eyes[0] - eyes[1]))
    return {
        "renders": len(images),
        "detected": len(images) - missed,
        "mean_error_px_visible68": round(float(np.mean(errs)), 2) if errs else None,
        "mean_error_px_inner51": round(float(np.mean(inner)), 2) if inner else None,
        "median_error_px_visible68": round(float(np.median(errs)), 2) if errs else None,
        "nme_interocular": round(float(np.mean(nme)), 4) if nme else None,
    }
