"""``morphset export-mesh``: a subject's identity shape or an image's full shape as .obj / .ply."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a subject's identity shape or an image's full fitted shape as .obj or .ply"
DESCRIPTION = (
    "Export a mesh from a run's fit shards (RUN/fit): --subject NAME writes the subject's neutral identity "
    "shape (mean + identity basis @ alpha_id), --image IMAGE_ID the full shape fitted to one image "
    "(identity + that image's expression), both in model coordinates (mm, y up, z towards the camera) with "
    "the morphable model's triangles. The format follows the output suffix (.obj or .ply). Only vertices "
    "some triangle uses are written (every reader then keeps them all, in order); OUT's "
    "<stem>.vertex_ids.txt lists the model vertex index of each."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory with committed fit shards")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--subject", help="subject name: export its identity shape")
    which.add_argument("--image", help="image_id (path relative to the dataset root): export its full shape")
    p.add_argument("-o", "--out", required=True, help="output file, .obj or .ply")
    p.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout (logs go to stderr)"
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.config.resolve import resolve
    from pipeline.core.tables import RunTables
    from pipeline.evaluate.inputs import load_fits
    from pipeline.evaluate.meshes import (
        MESH_SUFFIXES,
        image_full_shape,
        subject_identity_shape,
        write_model_mesh,
    )
    from pipeline.evaluate.run import load_model
    from pipeline.storage.run import Run, require_local

    out = Path(require_local(args.out, "morphset export-mesh --out"))
    if out.suffix.lower() not in MESH_SUFFIXES:
        raise ValueError(f"--out {out}: the file name must end in .obj or .ply")
    run = Run(args.run)
    from pipeline.core.registry import BUILD_ORDER

    run.migrate_layout(BUILD_ORDER)
    m = resolve(run, args.manifest, args.overrides).manifest
    model, why = load_model(m)
    if model is None:
        raise FileNotFoundError(why)
    fits = load_fits(RunTables(run, m))
    if args.subject is not None:
        verts = subject_identity_shape(fits, model, args.subject)
    else:
        verts = image_full_shape(fits, model, args.image)
    path, ids, written = write_model_mesh(verts, model.triangles, out)
    if args.json:
        import json

        doc = {
            "path": str(path),
            "vertex_ids": str(ids),
            "vertices": written,
            "model_vertices": int(len(verts)),
            "triangles": int(len(model.triangles)),
        }
        print(json.dumps(doc))
    else:
        print(path)
    return 0
