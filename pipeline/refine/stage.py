"""The refine stage: index + fits of one shard -> refined fits (``schemas/refined_fits.yaml``).

I/O edges only: decode each fitted image (``ctx.images``), cut its face window
(:mod:`pipeline.refine.windows`), group the shard's subjects into padded batches of similar
image counts, run the batched refinement (:mod:`pipeline.refine.solve`) on the stage's torch
device and lay the results out one row per fits row, in image pixels again. A subject with fewer
than ``min_images`` fitted images keeps its landmark fit (``refined`` false). Switched off
(``stages.refine.enabled: false``, the default) the stage copies the fits and marks its shards
off; the export then reads the fit itself (:func:`pipeline.core.registry.standing_in`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.config.manifest import Manifest
from pipeline.config.schemas import conform, load_schema
from pipeline.core import workercache
from pipeline.core.devices import torch_device
from pipeline.core.stage import STAGE_OFF_KEY, Asset, ConfigView, Stage, StageContext, check_same_rows
from pipeline.fit.camera import euler_deg
from pipeline.fit.stage import load_stage_model, plan_batches
from pipeline.imaging.decode import dataset_root, max_pixels_from
from pipeline.landmarks.scheme import IBUG68
from pipeline.models.morphable_model import MorphableModel
from pipeline.refine.region import region_model
from pipeline.refine.solve import RefineBatch, RefineResult, RefineSettings, refine
from pipeline.refine.windows import FaceWindow, face_window

IDENTITY_KEY = b"morphset.fit.identity"  # the fits' metadata: subject | image
WINDOW_MARGIN = 0.1  # the window's side is (1 + 2 × this) × the projected face region's extent


class RefineStage(Stage):
    name = "refine"
    inputs = ("index", "fit")
    schema = "refined_fits"
    reads_pixels = True
    stands_in_for = "fit"
    depends_on = ("models.morphable_model", "stages.decode")
    runtime = ("cache_dir",)
    doc = "photometric refinement of the landmark fit (off by default)"

    def enabled(self, manifest: Manifest) -> bool:
        return bool(manifest.stage_params("refine")["enabled"])

    def resources_for(self, config: ConfigView) -> dict[str, float]:
        p = config.stage_params("refine")
        return {"GPU": 1} if p["enabled"] and p["device"] != "cpu" else {}

    def resolve_assets(self, config: ConfigView) -> dict[str, Asset]:
        if not config.stage_params("refine")["enabled"]:
            return {}
        from pipeline.models.assets import morphable_model_asset

        return {"morphable_model": morphable_model_asset(config)}

    def run(self, inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
        return run_shard(inputs, ctx)


def settings_from_params(p: dict) -> RefineSettings:
    return RefineSettings(
        blur_px=tuple(float(b) for b in p["blur_px"]),
        steps=int(p["steps"]),
        learning_rate=float(p["learning_rate"]),
        translation_step_px=float(p["translation_step_px"]),
        photo_weight=float(p["photo_weight"]),
        landmark_sigma_mm=float(p["landmark_sigma_mm"]),
        identity_prior_weight=float(p["identity_prior_weight"]),
        expression_prior_weight=float(p["expression_prior_weight"]),
        identity_from_level=int(p["identity_from_level"]),
        fit_distance=p["start_distance_mm"] is not None,
        colour_field_order=int(p["colour_field_order"]),
        albedo_symmetry=bool(p["albedo_symmetry"]),
    )


def carried_metadata(fits: pa.Table) -> dict[str, str]:
    """The fit's key-value metadata the refined table carries on (the model's name and sha256,
    the identity mode): readers of either table find them under the same keys."""
    return {
        k.decode(): v.decode()
        for k, v in (fits.schema.metadata or {}).items()
        if k.startswith((b"morphset.model.", b"morphset.fit."))
    }


def _copy(fits: pa.Table, off: bool = False) -> pa.Table:
    n = fits.num_rows
    table = fits.append_column("refined", pa.array(np.zeros(n, bool)))
    for col, typ in (
        ("photo_samples", pa.int32()),
        ("photo_residual_start", pa.float32()),
        ("photo_residual", pa.float32()),
    ):
        table = table.append_column(col, pa.nulls(n, typ))
    extra = {**carried_metadata(fits), **({STAGE_OFF_KEY.decode(): "true"} if off else {})}
    return conform(table, load_schema("refined_fits"), extra)


def run_shard(inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
    """index + fits -> refined fits (one row per fits row, same order)."""
    params = ctx.params.as_dict()
    index, fits = inputs["index"], inputs["fit"]
    check_same_rows(ctx, ("index", index), ("fits", fits), "the fit")
    if not params["enabled"]:
        return _copy(fits, off=True)
    model = load_stage_model(ctx)
    device = torch.device(torch_device(str(params["device"])))
    spacing, forehead = float(params["sample_spacing_mm"]), float(params["forehead_mm"])
    region, ids = workercache.get_or_create(
        ("refine.region", model.sha256, spacing, forehead, str(device)),
        lambda: region_model(model, IBUG68, spacing, device, forehead),
    )
    rows = fits.to_pylist()
    records = index.to_pylist()
    usable = [
        i
        for i, r in enumerate(rows)
        if r["failure_reason"] is None and r["used"] and r["alpha_id"] is not None
    ]
    # the images that share an identity: a subject's, or each image alone (stages.fit.identity: image)
    per_image = (fits.schema.metadata or {}).get(IDENTITY_KEY) == b"image"
    by_subject: dict[str, list[int]] = {}
    for i in usable:
        by_subject.setdefault(rows[i]["image_id" if per_image else "subject"], []).append(i)
    subjects = [s for s, idx in by_subject.items() if len(idx) >= int(params["min_images"])]
    out = _copy(fits).to_pylist()
    windows = _windows(subjects, by_subject, rows, records, index, model, ids, params, ctx, out)
    settings = settings_from_params(params)
    subjects = [s for s in subjects if len(windows.get(s, {})) >= int(params["min_images"])]
    counts = np.array([len(windows[s]) for s in subjects], np.int64)
    for chosen in plan_batches(counts, int(params["batch_images"])):
        names = [subjects[k] for k in chosen]
        batch, slots = _batch(names, windows, rows, model, params, region.mean.device)
        result = refine(region, batch, settings)
        _write_back(result, batch, slots, windows, model, out)
        ctx.progress(sum(len(slots[n]) for n in names))
    schema = load_schema("refined_fits")
    return conform(pa.Table.from_pylist(out, schema=schema.arrow), schema, carried_metadata(fits))


def _windows(
    subjects: list[str],
    by_subject: dict[str, list[int]],
    rows: list[dict],
    records: list[dict],
    index: pa.Table,
    model: MorphableModel,
    ids: np.ndarray,
    params: dict,
    ctx: StageContext,
    out: list[dict],
) -> dict[str, dict[int, FaceWindow]]:
    """subject -> {row: its face window (pixels, which of them show the photo, the transform)} for
    every image decoded."""
    mean = model.mean.reshape(-1, 3)[ids].astype(np.float64)
    root = dataset_root(index)
    max_pixels = max_pixels_from(ctx.config)
    size = int(params["window_px"])
    found: dict[str, dict[int, FaceWindow]] = {}
    for s in subjects:
        for i in by_subject[s]:
            r = rows[i]
            decoded = ctx.images.read(
                records[i]["uri"], max_pixels, ctx.storage_options, root, read_before=True
            )
            if not decoded.ok:
                out[i]["failure_reason"] = decoded.reason  # not the image the fit saw
                continue
            R = np.asarray(r["rotation"], np.float64).reshape(3, 3)
            cam = mean @ R.T
            t = np.asarray(r["translation"], np.float64)
            pts = np.stack([t[0] + r["scale"] * cam[:, 0], t[1] - r["scale"] * cam[:, 1]], axis=1)
            found.setdefault(s, {})[i] = face_window(decoded.unwrap(), pts, size, WINDOW_MARGIN)
    return found


def _batch(
    names: list[str],
    windows: dict[str, dict[int, FaceWindow]],
    rows: list[dict],
    model: MorphableModel,
    params: dict,
    device: torch.device,
) -> tuple[RefineBatch, dict[str, list[int]]]:
    s, m = len(names), max(len(windows[n]) for n in names)
    p = int(params["window_px"])
    start = params["start_distance_mm"]
    win = np.zeros((s, m, p, p, 3), np.float32)
    inside = np.zeros((s, m, p, p), bool)
    valid = np.zeros((s, m), bool)
    a_id = np.zeros((s, model.k_id))
    a_exp = np.zeros((s, m, model.k_exp))
    rot = np.tile(np.eye(3), (s, m, 1, 1))
    scale = np.ones((s, m))
    trans = np.zeros((s, m, 2))
    rho = np.zeros((s, m))
    slots: dict[str, list[int]] = {}
    for a, n in enumerate(names):
        slots[n] = sorted(windows[n])
        a_id[a] = np.asarray(rows[slots[n][0]]["alpha_id"], np.float64) / model.id_std
        for b, i in enumerate(slots[n]):
            r, fw = rows[i], windows[n][i]
            w = fw.window
            win[a, b], inside[a, b], valid[a, b] = fw.pixels, fw.inside, True
            a_exp[a, b] = np.asarray(r["alpha_exp"], np.float64) / model.exp_std
            rot[a, b] = np.asarray(r["rotation"], np.float64).reshape(3, 3)
            scale[a, b], trans[a, b] = w.to_window(float(r["scale"]), np.asarray(r["translation"]))
            distance = r["camera_distance_mm"] or start
            rho[a, b] = 0.0 if distance is None else 1.0 / float(distance)

    def t(x: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.as_tensor(x, dtype=dtype, device=device)

    batch = RefineBatch(
        windows=t(win),
        inside=t(inside, torch.bool),
        valid=t(valid, torch.bool),
        alpha_id=t(a_id),
        alpha_exp=t(a_exp),
        rotation=t(rot),
        scale=t(scale),
        translation=t(trans),
        inv_distance=t(rho),
    )
    return batch, slots


def _write_back(
    result: RefineResult,
    batch: RefineBatch,
    slots: dict[str, list[int]],
    windows: dict[str, dict[int, FaceWindow]],
    model: MorphableModel,
    out: list[dict],
) -> None:
    res = {k: v.detach().cpu().double().numpy() for k, v in vars(result).items()}
    a_id = (res["alpha_id"] * model.id_std).astype(np.float32)
    yaw, pitch, roll = euler_deg(res["rotation"].reshape(-1, 3, 3))
    m = batch.valid.shape[1]
    for a, (n, rows) in enumerate(slots.items()):
        for b, i in enumerate(rows):
            f, t = windows[n][i].window.to_image(float(res["scale"][a, b]), res["translation"][a, b])
            rho = float(res["inv_distance"][a, b])
            k = a * m + b
            out[i].update(
                alpha_id=a_id[a].tolist(),
                alpha_exp=(res["alpha_exp"][a, b] * model.exp_std).astype(np.float32).tolist(),
                scale=float(f),
                rotation=res["rotation"][a, b].reshape(-1).astype(np.float32).tolist(),
                yaw=float(yaw[k]),
                pitch=float(pitch[k]),
                roll=float(roll[k]),
                translation=np.asarray(t, np.float32).tolist(),
                camera_distance_mm=(1.0 / rho) if rho > 0 else None,
                refined=True,
                photo_samples=int(res["seen"][a, b]),
                photo_residual_start=float(res["residual_before"][a, b]),
                photo_residual=float(res["residual_after"][a, b]),
            )
