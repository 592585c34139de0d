"""Realism of `morphset synth` renders, painted and textured side by side, measured with the
project's detectors.

For each |yaw| bin, renders images (the sign of yaw alternating; identities, expressions, lights
and backgrounds random, seed fixed), once with painted albedo and once with textures from real
photos (`--textures`, default the builtin wheel photos), encodes them as the synth JPEGs, and
measures
- MTCNN detection rate (the default torch detector on the mtcnn 1.0.0 weights, min_face_size 20):
  found = a box with score >= 0.9 containing the true nose tip (landmark 30) or the top of the
  nose bridge (27: turned 45 degrees 0.4 m from a phone's camera, the tip sticks out of the box);
- dlib's 68 points on that box against the iBUG-convention truth (jaw on the rendered outline):
  NME of the inner points 17-67 and the error per landmark group, as a fraction of the true
  outer-eye-corner distance (36-45);
- identity correlation: per image, the identity's own displacement of the inner landmarks
  (the true shape's projection minus the projection of the mean identity with the same
  expression and camera) against what dlib reports beyond that mean-identity projection, with
  each yaw bin's mean (the detector's systematic bias) removed; Pearson r over all coordinates.
  Both at |yaw| <= 30 degrees, where dlib works at all.
  r = 0: the detector's points carry no identity; r = 1: all of it.
With ``--ablation`` (textured renders only): the same measures with every realism effect off
(the fit's own image model, ``NO_EFFECTS``), with each effect alone on, and with all on (the
defaults) -- the detector's error per effect (docs/synth.md).
Prints JSON. Usage: python benchmarks/synth_realism.py [--per-bin 24] [--seed 0] [--textures DIR]
[--ablation] [--save PREFIX]
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
from pipeline.detect.stage import detect_images, get_detector  # noqa: E402
from pipeline.fit.calibration import LANDMARK_GROUPS  # noqa: E402
from pipeline.landmarks.scheme import IBUG68  # noqa: E402
from pipeline.models.assets import resolve_morphable_model  # noqa: E402
from pipeline.synthetic.effects import NO_EFFECTS  # noqa: E402
from pipeline.synthetic.render import Camera  # noqa: E402
from pipeline.synthetic.synth import SynthParams, model_face_triangles, model_regions, render_sample  # noqa: E402
from pipeline.synthetic.texture import load_textures  # noqa: E402

BINS = (0, 15, 30, 45, 60)


def render_set(model, regions, base, per_bin, textures):
    images, rows, yaws = [], [], []
    for b in BINS:
        for k in range(per_bin):
            yaw = float(b if k % 2 == 0 else -b)
            p = dataclasses.replace(base, yaw_range=(yaw, yaw))
            jpeg, row = render_sample(model, regions, p, 1000 + b * 100 + k, 0, textures=textures)
            img = cv2.cvtColor(
                cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
            )
            images.append(img)
            rows.append(row)
            yaws.append(b)
    return images, rows, yaws


def mean_identity_points(model, row):
    """The 68 landmark vertices of the mean identity with this image's expression, projected."""
    lm = model.landmarks_of(IBUG68).locate(model.shape(None, np.asarray(row["alpha_exp"])))
    cam = Camera(
        np.asarray(row["rotation"]).reshape(3, 3),
        row["scale"],
        np.asarray(row["translation"]),
        row.get("camera_distance_mm"),
    )
    return cam.project(lm)


def measure(model, images, rows, yaws, detector, params, predictor, dlib):
    dets = detect_images(detector, images, params)
    per_bin = {b: {"n": 0, "found": 0, "nme": []} for b in BINS}
    group_err = {g: [] for g in LANDMARK_GROUPS}
    signal = {b: ([], []) for b in BINS}  # per bin: (true identity displacement, detector's)
    sheet = []
    for img, row, b, faces in zip(images, rows, yaws, dets, strict=True):
        per_bin[b]["n"] += 1
        fixed = np.asarray(row["landmarks_2d"]).reshape(IBUG68.points, 2)
        truth = np.asarray(row["landmarks_2d_ibug"]).reshape(IBUG68.points, 2)
        nose = fixed[[30, 27]]
        hit = None
        if not isinstance(faces, str):
            for box, score in zip(faces.boxes, faces.scores, strict=True):
                inside = (
                    (box[0] <= nose[:, 0])
                    & (nose[:, 0] <= box[2])
                    & (box[1] <= nose[:, 1])
                    & (nose[:, 1] <= box[3])
                )
                if score >= 0.9 and inside.any():
                    hit = box
                    break
        vis = img.copy()
        if hit is None:
            sheet.append(vis)
            continue
        per_bin[b]["found"] += 1
        x0, y0, x1, y1 = (int(round(v)) for v in hit)
        shape = predictor(img, dlib.rectangle(x0, y0, x1, y1))
        pred = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float64)
        iod = np.linalg.norm(fixed[36] - fixed[45])
        err = np.linalg.norm(pred - truth, axis=1) / iod
        per_bin[b]["nme"].append(float(np.mean(err[17:])))
        if b <= 30:
            for g, ix in LANDMARK_GROUPS.items():
                group_err[g].append(float(np.mean(err[list(ix)])))
        base_pts = mean_identity_points(model, row)
        signal[b][0].append(((fixed - base_pts)[17:] / iod).reshape(-1))
        signal[b][1].append(((pred - base_pts)[17:] / iod).reshape(-1))
        cv2.rectangle(vis, (x0, y0), (x1, y1), (255, 255, 0), 1)
        for (px, py), (tx, ty) in zip(pred, truth, strict=True):
            cv2.circle(vis, (int(px), int(py)), 1, (255, 0, 0), -1)
            cv2.circle(vis, (int(round(tx)), int(round(ty))), 1, (0, 255, 0), -1)
        sheet.append(vis)
    true_d, det_d = [], []
    for b in BINS:
        if b <= 30 and len(signal[b][0]) >= 2:
            t, d = np.array(signal[b][0]), np.array(signal[b][1])
            true_d.append(t)
            det_d.append(d - d.mean(axis=0))  # the detector's mean offset at this pose is bias
    r = float(np.corrcoef(np.concatenate(true_d).ravel(), np.concatenate(det_d).ravel())[0, 1])
    out = {"per_bin": {}}
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
    out["dlib_error_by_group_abs_yaw_le_30"] = {g: round(float(np.mean(v)), 4) for g, v in group_err.items()}
    out["identity_correlation_abs_yaw_le_30"] = round(r, 3)
    return out, sheet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-bin", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--textures", default="builtin", help="'builtin' or a folder of face photos")
    ap.add_argument(
        "--save", default=None, help="write contact sheets (PREFIX-painted.png, PREFIX-textured.png)"
    )
    ap.add_argument("--ablation", action="store_true", help="textured renders per realism effect")
    ap.add_argument(
        "--sheet",
        default=None,
        help="write an image (PNG or JPEG by its name) of 8 renders with every effect off (top row) and on (bottom row), then stop",
    )
    args = ap.parse_args()
    manifest = load_manifest()
    model = resolve_morphable_model(manifest)
    regions = model_regions(model)
    stage = manifest.stage_params("synth") | {"seed": args.seed}
    base = SynthParams.from_stage(stage)
    t0 = time.perf_counter()
    textures, failures = load_textures(
        args.textures, model, manifest, model_face_triangles(model), cache_dir=manifest.cache_dir
    )
    texture_s = time.perf_counter() - t0
    if args.sheet:
        from pipeline.synthetic.synth import contact_sheet

        tiles = []
        for over in (dict(NO_EFFECTS), {}):
            p = SynthParams.from_stage(stage | over)
            for k in range(8):
                jpeg, _ = render_sample(model, regions, p, k, k % 3, textures=textures)
                tiles.append(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
        cv2.imwrite(args.sheet, contact_sheet(tiles, columns=8, thumb=125), [cv2.IMWRITE_JPEG_QUALITY, 88])
        print(json.dumps({"sheet": args.sheet}))
        return
    params = manifest.stage_params("detect")
    detector = get_detector(params)
    import dlib

    from pipeline.landmarks.dlib_backend import resolve_model

    predictor = dlib.shape_predictor(str(resolve_model(manifest.get("models.dlib_landmarks") or {})[0]))
    result = {
        "textures": args.textures,
        "texture_photos": [t.name for t in textures],
        "texture_failures": failures,
        "texture_seconds": round(texture_s, 2),
        "per_bin_images": args.per_bin,
        "seed": args.seed,
    }
    if args.ablation:
        # the effect alone on top of none: (name, the settings it changes from NO_EFFECTS)
        effect_keys = {
            "perspective": ["camera", "camera_distance_mm"],
            "cast_shadows": ["cast_shadows"],
            "light_colours": ["light_colours"],
            "white_balance": ["white_balance_std"],
            "skin_change": ["skin_change_std"],
            "noise": ["noise_std"],
            "blur": ["blur"],
            "jpeg": ["jpeg_quality"],
        }
        configs = [("none", dict(NO_EFFECTS))]
        configs += [(name, NO_EFFECTS | {k: stage[k] for k in keys}) for name, keys in effect_keys.items()]
        configs.append(("all", {}))
        modes = [(name, textures, SynthParams.from_stage(stage | over)) for name, over in configs]
    else:
        modes = [("painted", None, base), ("textured", textures, base)]
    for mode, tex, params_mode in modes:
        t0 = time.perf_counter()
        images, rows, yaws = render_set(model, regions, params_mode, args.per_bin, tex)
        render_s = time.perf_counter() - t0
        out, sheet = measure(model, images, rows, yaws, detector, params, predictor, dlib)
        out["render_seconds_per_image"] = round(render_s / len(images), 3)
        result[mode] = out
        if args.save:
            from pipeline.synthetic.synth import contact_sheet

            cv2.imwrite(
                f"{args.save}-{mode}.png",
                cv2.cvtColor(contact_sheet(sheet, columns=args.per_bin, thumb=200), cv2.COLOR_RGB2BGR),
            )
    result["targets"] = {"mtcnn_rate_abs_yaw_le_45": ">= 0.95 (issue 16, textured)"}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
