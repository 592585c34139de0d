"""``morphset calibrate``: measure a landmark backend's error model on rendered faces with truth."""

from __future__ import annotations

import argparse

from pipeline.commands._common import print_json

HELP = "measure a landmark backend's error model (bias by yaw, noise per landmark) on a morphset synth folder"
DESCRIPTION = (
    "Build a `morphset synth` folder up to the landmarks stage with --landmarks BACKEND (in a work run, "
    "OUT with the suffix .run unless --work-run), compare the detector's points with the true landmark "
    "projections and cameras in DIR/ground_truth.parquet, and write the error model the fit subtracts and "
    "weights by (JSON, atomically) to --out. Name it in the manifest as models.landmark_error.BACKEND "
    "with the sha256 this command prints. Calibrate on another seed than the faces you evaluate on."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "synth_dir",
        metavar="DIR",
        help="a folder written by `morphset synth` (images + ground_truth.parquet), or with --annotations "
        "photos with iBUG .pts files of the same name beside them",
    )
    p.add_argument(
        "--annotations",
        action="store_true",
        help="DIR holds annotated photos (image + same-stem .pts, any layout): an ibug-convention model, pose "
        "and scale from fitting each annotation (no identity prior weight: there is no 3D truth)",
    )
    p.add_argument(
        "--landmarks", required=True, choices=["dlib", "fan"], help="the landmark backend to calibrate"
    )
    p.add_argument("-o", "--out", required=True, help="the error model file to write (.json)")
    p.add_argument(
        "--convention",
        choices=["fixed_vertex", "ibug"],
        default="fixed_vertex",
        help="compare with the model's fixed landmark vertices (the jaw's offset from them by pose is then "
        "part of the bias), or with iBUG-convention truth (jaw on the face outline; the fit then marches "
        "the jaw along the outline: stages.fit.contour auto)",
    )
    p.add_argument(
        "--real-photos",
        default=None,
        metavar="PHOTOS",
        help="real photographs in subject folders, several per person: the identity prior weight is then "
        "chosen only among weights whose fits tell these people apart at least as well as weight 1 "
        "(per-image and split-half identity AUC; `make calibration` uses ../shared/fixtures/faces when present)",
    )
    p.add_argument("--work-run", default=None, help="run directory for the landmark build (default: OUT.run)")
    p.add_argument(
        "--ground-truth", default=None, help="ground truth file (default: SYNTH_DIR/ground_truth.parquet)"
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout (logs go to stderr)"
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.fit.calibrate import calibrate, calibrate_from_annotations
    from pipeline.storage.run import require_local

    # renders, photos, the work run and the error model are files read and written locally
    for what, value in (
        ("SYNTH_DIR", args.synth_dir),
        ("--out", args.out),
        ("--work-run", args.work_run),
        ("--real-photos", args.real_photos),
        ("--ground-truth", args.ground_truth),
    ):
        if value is not None:
            require_local(value, f"morphset calibrate {what}")
    common = {
        "work_run": args.work_run,
        "manifest": args.manifest,
        "overrides": args.overrides,
    }
    if args.annotations:
        summary = calibrate_from_annotations(args.synth_dir, args.landmarks, args.out, **common)
    else:
        summary = calibrate(
            args.synth_dir,
            args.landmarks,
            args.out,
            ground_truth=args.ground_truth,
            convention=args.convention,
            real_photos=args.real_photos,
            **common,
        )
    if args.json:
        print_json(summary)
        return 0
    print(f"{summary['path']}  sha256 {summary['sha256']}")
    print(f"  {summary['images']} images ({summary['convention']} convention)")
    if "error_by_group_iod" in summary:
        print(f"  detector error / outer-eye distance by group: {summary['error_by_group_iod']}")
    print(f"  noise sigma (mm) by group: {summary['sigma_mm_by_group']}")
    if "subject_common_share_by_group" in summary:
        print(
            "  share of that noise all images of a subject have in common (no number of images "
            f"averages it away): {summary['subject_common_share_by_group']}"
        )
    if summary["identity_prior_weight"] is not None:
        print(
            f"  identity prior weight {summary['identity_prior_weight']:g} (identity error mm by weight "
            f"{summary['identity_error_mm_by_prior_weight']}, mean shape {summary['mean_shape_error_mm']})"
        )
    if summary.get("identity_shrinkage"):
        print(
            f"  identity shrinkage {summary['identity_shrinkage']} (1 / (1 + common + per_image / M); "
            f"best factor per M: { ({m: d['factor'] for m, d in summary['identity_shrinkage_by_images'].items()}) })"
        )
    if "real_photo_auc_by_prior_weight" in summary:
        print(
            f"  on the real photos (per-image / split-half identity AUC by weight): "
            f"{summary['real_photo_auc_by_prior_weight']}; weights they allow: {summary['weights_real_photos_allow']}"
        )
    print(
        f"manifest: models.landmark_error.{summary['backend']}: "
        f"{{source: {summary['path']}, sha256: {summary['sha256']}}}"
    )
    return 0
