"""``morphset synth``: render a synthetic, person-labelled face dataset with known 3D ground truth."""

from __future__ import annotations

import argparse

from pipeline.commands._common import print_json
from pipeline.config.manifest import manifest_json_schema


def _default(key: str) -> str:
    """The schema default of stages.synth.<key>, for the help text (one source of truth)."""
    value = manifest_json_schema()["properties"]["stages"]["properties"]["synth"]["properties"][key][
        "default"
    ]
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


HELP = "render faces from the morphable model (CASIA layout JPEGs + ground_truth.parquet); no download"
DESCRIPTION = (
    "Render SUBJECTS x IMAGES-PER-SUBJECT face images from the manifest's morphable model: per subject a "
    "random identity (alpha_id ~ N(0, id_std^2)) and a face texture from a real photo (or painted colours); per image a random "
    "expression, yaw (uniform in --yaw-range), small pitch/roll, two point lights and a background, framed like "
    "CASIA-WebFace crops, with what photos have and the fit's image model lacks (stages.synth: a perspective "
    "camera from phone to portrait distance, cast shadows, coloured lights and white balance, a per-image "
    "change of skin colour, sensor noise, blur, JPEG; docs/synth.md). Writes OUT/s0000/000.jpg ... and "
    "OUT/ground_truth.parquet (schemas/ground_truth.yaml: coefficients, pose, camera, projected 2D and "
    "3D landmarks with visibility, model name and sha256). The same seed gives byte-identical output. "
    "Each flag overrides stages.synth.<key> of the manifest; the defaults shown are the schema's."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--subjects",
        type=int,
        default=None,
        help=f"number of subjects (stages.synth.subjects; default {_default('subjects')})",
    )
    p.add_argument(
        "--images-per-subject",
        type=int,
        default=None,
        help=f"images per subject (stages.synth.images_per_subject; default {_default('images_per_subject')})",
    )
    p.add_argument(
        "--seed", type=int, default=None, help=f"random seed (stages.synth.seed; default {_default('seed')})"
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory (stages.synth.out; default: datasets.synthetic.root, runs/synthetic)",
    )
    p.add_argument(
        "--yaw-range",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=None,
        help="yaw range in degrees, positive = nose towards image right "
        f"(stages.synth.yaw_range; default {_default('yaw_range')})",
    )
    p.add_argument(
        "--expression-scale",
        type=float,
        default=None,
        help="expression std as a multiple of the model's "
        f"(stages.synth.expression_scale; default {_default('expression_scale')})",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"image side in pixels (stages.synth.size; default {_default('size')})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="rendering processes (stages.synth.workers; default one per core; output does not depend on it)",
    )
    p.add_argument(
        "--textures",
        default=None,
        metavar="builtin|painted|DIR",
        help="face textures: 'builtin' (the real photos inside the scikit-image and matplotlib wheels), a "
        "folder of face photos (any layout; each is fitted alone and its pixels, hair and neck reused), or "
        f"'painted' albedo (stages.synth.textures; default {_default('textures')}; docs/synth.md)",
    )
    p.add_argument(
        "--no-effects",
        action="store_true",
        help="render with the fit's own image model: orthographic camera, no cast shadows, one light colour, "
        "no skin change, no blur, JPEG 92 (the renders made before the realism effects; docs/synth.md). "
        "Each effect is also its own stages.synth setting",
    )
    p.add_argument(
        "--preview",
        action="store_true",
        default=None,
        help="also write OUT/preview.png, a contact sheet of the first 32 images (stages.synth.preview)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="the summary is always one JSON document on stdout (accepted for symmetry)",
    )


def run(args: argparse.Namespace) -> int:
    from pipeline import api  # rendering imports stay off the CLI's start-up path

    params = {}
    for flag in ("subjects", "images_per_subject", "seed", "expression_scale", "size", "workers"):
        value = getattr(args, flag)
        if value is not None:
            params[flag] = value
    if args.textures is not None:
        params["textures"] = args.textures
    if args.yaw_range is not None:
        params["yaw_range"] = list(args.yaw_range)
    if args.preview:
        params["preview"] = True
    if args.no_effects:
        from pipeline.synthetic.effects import NO_EFFECTS

        params = {**NO_EFFECTS, **params}
    print_json(api.synth(args.out, overrides=args.overrides, manifest=args.manifest, **params))
    return 0
