"""Realism of `morphset synth` renders, measured with the project's detectors.

For each |yaw| bin, renders images (alternating the sign of yaw; identities, expressions, lights
and backgrounds random, seed fixed), encodes them as the synth JPEGs, and measures
- MTCNN (mtcnn 1.0.0, default min_face_size=20) detection rate: a face counts as found if a box
  contains the true nose tip (landmark 30) and its score >= 0.9;
- dlib 68-point landmarks run on that MTCNN box: mean distance to the true projected inner
  landmarks (17-67) divided by the true outer-eye-corner distance (36-45), i.e. NME.
Prints JSON. Usage: python benchmarks/synth_realism.py [--per-bin 24] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.config.manifest import load_manifest  # noqa: E402
from pipeline.models.assets import resolve_morphable_model  # noqa: E402
from pipeline.synthetic.synth import SynthParams, model_regions, render_sample  # noqa: E402

BINS = (0, 15, 30, 45, 60)


def dlib_predictor():
    import importlib.util

    import dlib

    # the package's __init__ needs pkg_resources (absent on new setuptools): locate it without importing
    spec = importlib.util.find_spec("face_recognition_models")
    path = Path(spec.origin).parent / "models" / "shape_predictor_68_face_landmarks.dat"
    return dlib, dlib.shape_predictor(str(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-bin", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="write a contact sheet of the renders with dlib points here")
    args = ap.parse_args()
    manifest = load_manifest()
    model = resolve_morphable_model(manifest)
    regions = model_regions(model)
    base = SynthParams.from_stage(manifest.stage_params("synth") | {"seed": args.seed})
    images, truths, yaws = [], [], []
    t0 = time.perf_counter()
    for b in BINS:
        for k in range(args.per_bin):
            yaw = float(b if k % 2 == 0 else -b)
            p = dataclasses.replace(base, yaw_range=(yaw, yaw))
            jpeg, row = render_sample(model, regions, p, 1000 + b * 100 + k, 0)
            img = cv2.cvtColor(
                cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
            )
            images.append(img)
            truths.append(np.asarray(row["landmarks_2d"]).reshape(68, 2))
            yaws.append(b)
    render_s = time.perf_counter() - t0

    from mtcnn import MTCNN

    detector = MTCNN()
    t0 = time.perf_counter()
    dets = detector.detect_faces(images)
    detect_s = time.perf_counter() - t0
    dlib, predictor = dlib_predictor()
    per_bin: dict[int, dict] = {b: {"n": 0, "found": 0, "nme": []} for b in BINS}
    sheet = []
    for img, truth, b, faces in zip(images, truths, yaws, dets, strict=True):
        per_bin[b]["n"] += 1
        nose = truth[30]
        hit = None
        for f in faces or []:
            x, y, w, h = f["box"]
            if f["confidence"] >= 0.9 and x <= nose[0] <= x + w and y <= nose[1] <= y + h:
                hit = f
                break
        vis = img.copy()
        if hit is None:
            sheet.append(vis)
            continue
        per_bin[b]["found"] += 1
        x, y, w, h = hit["box"]
        cv2.rectangle(vis, (int(x), int(y)), (int(x + w), int(y + h)), (255, 255, 0), 1)
        shape = predictor(img, dlib.rectangle(int(x), int(y), int(x + w), int(y + h)))
        pred = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float64)
        iod = np.linalg.norm(truth[36] - truth[45])
        per_bin[b]["nme"].append(float(np.mean(np.linalg.norm(pred[17:] - truth[17:], axis=1)) / iod))
        cv2.putText(
            vis, f"{per_bin[b]['nme'][-1]:.3f}", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1
        )
        for (px, py), (tx, ty) in zip(pred, truth, strict=True):
            cv2.circle(vis, (int(px), int(py)), 1, (255, 0, 0), -1)
            cv2.circle(vis, (int(round(tx)), int(round(ty))), 1, (0, 255, 0), -1)
        sheet.append(vis)
    out = {"per_bin": {}, "render_seconds_per_image": round(render_s / len(images), 3)}
    out["mtcnn_seconds_per_image"] = round(detect_s / len(images), 3)
    for b, d in per_bin.items():
        nme = d["nme"]
        out["per_bin"][str(b)] = {
            "images": d["n"],
            "mtcnn_found": d["found"],
            "mtcnn_rate": round(d["found"] / d["n"], 3),
            "dlib_nme_mean": round(float(np.mean(nme)), 4) if nme else None,
            "dlib_nme_median": round(float(np.median(nme)), 4) if nme else None,
        }
    le45 = [per_bin[b] for b in BINS if b <= 45]
    le30 = [x for b in BINS if b <= 30 for x in per_bin[b]["nme"]]
    out["mtcnn_rate_abs_yaw_le_45"] = round(sum(d["found"] for d in le45) / sum(d["n"] for d in le45), 3)
    out["dlib_nme_abs_yaw_le_30"] = round(float(np.mean(le30)), 4) if le30 else None
    out["targets"] = {"mtcnn_rate_abs_yaw_le_45": ">= 0.95", "dlib_nme_abs_yaw_le_30": "<= 0.05"}
    if args.save:
        from pipeline.synthetic.synth import contact_sheet

        cv2.imwrite(
            args.save, cv2.cvtColor(contact_sheet(sheet, columns=args.per_bin, thumb=200), cv2.COLOR_RGB2BGR)
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
