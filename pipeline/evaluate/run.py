"""``morphset evaluate``: measure a run's fits (and optionally a trained encoder) and write the report.

Orchestration only: reading inputs (:mod:`.inputs`), measures (:mod:`.verification`,
:mod:`.reconstruction`, :mod:`.fit_quality`), aggregation (:mod:`.summary`) and the page
(:mod:`.report`). Outputs in ``RUN/eval/``: ``report.html``, ``report.json``, ``samples.parquet``
(schema ``evaluation``), ``pairs.csv`` when pairs were generated, and the figures as PNG files.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline import __version__
from pipeline.config.manifest import Manifest
from pipeline.config.schemas import from_rows, load_schema
from pipeline.errors import MorphsetError
from pipeline.evaluate import report as rp
from pipeline.evaluate.fit_quality import (
    fit_quality,
    fitted_mask,
    identity_consistency,
    identity_vertices,
    vertex_subset,
)
from pipeline.evaluate.frame import Frame
from pipeline.evaluate.inputs import (
    ScanTruth,
    SyntheticTruth,
    fits_model_sha256,
    load_export_crops,
    load_fits,
    load_index_uris,
    load_thumbnail,
    load_truth,
)
from pipeline.evaluate.meshes import ShapeBuilder
from pipeline.evaluate.pairs import PairList, generate_pairs, read_pairs, write_csv_pairs
from pipeline.evaluate.samples import Predictors, Sample, measure, scan_samples, synthetic_samples
from pipeline.evaluate.shading import render_shaded
from pipeline.evaluate.summary import summarise_errors
from pipeline.evaluate.verification import cosine_scores, fuse_scores, item_features, verification_report
from pipeline.models.morphable_model import MorphableModel
from pipeline.storage.atomic import atomic_write

log = logging.getLogger(__name__)
ENCODER_BATCH = 32


@dataclass
class Context:
    run_root: str
    params: dict
    fits: Frame
    model: MorphableModel | None
    encoder: object | None  # pipeline.train.inference.TrainedEncoder
    storage_options: dict | None = None
    notes: list[str] = field(default_factory=list)
    figures: dict[str, rp.FigureData] = field(default_factory=dict)  # data; rendered by report.py
    blocks: dict[str, list[rp.Block]] = field(default_factory=dict)  # data; rendered by report.py
    crops: dict[str, np.ndarray] = field(default_factory=dict)  # image_id -> uint8 crop
    shape: ShapeBuilder | None = None  # vertices from coefficients of ``model``

    def __post_init__(self) -> None:
        if self.model is not None and self.shape is None:
            self.shape = ShapeBuilder(self.model)

    @property
    def fitted(self) -> Frame:
        return self.fits.take(fitted_mask(self.fits))

    def add(self, section: str, *blocks: rp.Block) -> None:
        self.blocks.setdefault(section, []).extend(blocks)

    def figure(self, section: str, name: str, spec: rp.FigureData) -> None:
        self.figures[name] = spec
        self.add(section, rp.Figure(name))


def load_model(manifest: Manifest) -> tuple[MorphableModel | None, str | None]:
    """The manifest's morphable model, or (None, why not) when it cannot be resolved here."""
    try:
        from pipeline.models.assets import resolve_morphable_model
    except ImportError as exc:
        return None, f"morphable model resolver unavailable ({exc})"
    try:
        return resolve_morphable_model(manifest), None
    except (FileNotFoundError, ValueError) as exc:
        return None, f"morphable model not available: {exc}"


# --- fit quality -----------------------------------------------------------------------------------
def fit_quality_section(ctx: Context) -> dict:
    fq = fit_quality(ctx.fits)
    sec = "fit-quality"
    ctx.add(
        sec,
        rp.Table(
            [
                {"": "images", "value": fq["images"]},
                {"": "fitted", "value": fq["fitted"]},
                {"": "subjects (fitted)", "value": f"{fq['subjects']} ({fq['subjects_fitted']})"},
                {"": "subjects converged (fraction)", "value": fq.get("convergence_rate")},
                {"": "reprojection RMSE, median px", "value": fq["reproj_rmse_px"].get("median")},
                {"": "reprojection NME, median", "value": fq["reproj_nme"].get("median")},
                {"": "iterations, median", "value": fq.get("iterations", {}).get("median")},
            ]
        ),
        rp.Heading("Rejected images by reason"),
        rp.Table([{"reason": k, "images": v} for k, v in fq["rejected_by_reason"].items()]),
        rp.Heading("Distributions"),
        rp.Table(
            [{"quantity": k, **fq[k]} for k in ("reproj_rmse_px", "reproj_nme", "iterations") if k in fq],
            ["quantity", "n", "mean", "std", "min", "p10", "median", "p90", "max"],
        ),
    )
    good = ctx.fitted
    if len(good):
        ctx.figure(
            sec,
            "reprojection_error",
            rp.Histogram({"fit": good["reproj_rmse_px"]}, "Landmark reprojection error", "RMSE (px)"),
        )
        if "iterations" in good:
            ctx.figure(
                sec,
                "iterations",
                rp.Histogram(
                    {"fit": np.asarray(good["iterations"], float)}, "Fit iterations per image", "iterations"
                ),
            )
    if ctx.model is not None and len(good):
        verts = vertex_subset(ctx.model)
        shapes = identity_vertices(ctx.model, good["alpha_id"], verts)
        ic = identity_consistency(good["subject"].astype(str), shapes)
        fq["identity_consistency"] = ic
        ctx.add(
            sec,
            rp.Heading("Identity consistency across a subject's images"),
            rp.Table([{"source": "fit α_id", **ic}]),
            rp.Paragraph(
                "within: mean per-vertex distance (mm) of an image's identity shape to its subject's mean; "
                "between: of subject means to the overall mean. The multi-image fit shares one α_id per "
                "subject, so its within-subject spread is zero by construction unless a subject was split."
            ),
        )
    return fq


# --- verification ----------------------------------------------------------------------------------
# above this fraction of same-subject pairs with identical features, a source's verification
# figures are decided by how features were assigned, not by recognition: withheld
IDENTICAL_BY_CONSTRUCTION = 0.5


class NoPairsInRun(MorphsetError):
    """A pairs file none of whose images is in the run (another dataset, other naming)."""


def _pairs(ctx: Context) -> tuple[PairList, bool]:
    if ctx.params.get("pairs"):
        pairs = read_pairs(ctx.params["pairs"], ctx.params["n_folds"])
        named = set(pairs.a) | set(pairs.b)
        known = {str(i) for i in ctx.fits["image_id"]} if len(ctx.fits) else set()
        missing = sorted(named - known)
        if named and len(missing) == len(named):
            raise NoPairsInRun(
                f"{ctx.params['pairs']}: none of its {len(named)} image names is in {ctx.run_root} "
                f"({len(missing)} missing, e.g. {missing[0]!r}; the run's images are named like "
                f"{next(iter(sorted(known)), 'nothing')!r})"
            )
        return pairs, False
    good = ctx.fitted
    items: dict[str, list[str]] = {}
    for subject, image_id in zip(good["subject"], good["image_id"], strict=True):
        items.setdefault(str(subject), []).append(str(image_id))
    items = {k: sorted(v) for k, v in items.items()}
    pairs = generate_pairs(items, ctx.params["n_folds"], ctx.params["pairs_per_fold"], ctx.params["seed"])
    return pairs, True


def feature_sources(ctx: Context, encoder_feats: dict[str, np.ndarray], encoder_ids: list[str]) -> dict:
    good = ctx.fitted
    sources: dict[str, tuple[list[str], np.ndarray]] = {}
    if len(good):
        a = good["alpha_id"]
        if ctx.model is not None and a.shape[1] == ctx.model.k_id:
            a = a / ctx.model.id_std.astype(np.float64)  # whiten: every component weighs by its prior
        sources["fit α_id"] = (list(good["image_id"]), a)
    if encoder_ids:
        sources["encoder c_id"] = (encoder_ids, encoder_feats["c_id"])
        sources["encoder α_id"] = (encoder_ids, encoder_feats["alpha_id"])
    return sources


def verification_section(ctx: Context, pairs: PairList, generated: bool, sources: dict) -> dict:
    sec = "verification"
    out: dict = {
        "pairs": {
            "source": "generated (pairs.csv)" if generated else pairs.source,
            "n_pairs": len(pairs),
            "n_same": int(pairs.same.sum()),
            "n_folds": pairs.n_folds,
        },
        "results": {},
    }
    ctx.add(
        sec,
        rp.Paragraph(
            f"{len(pairs)} pairs ({int(pairs.same.sum())} same) in {pairs.n_folds} folds from "
            f"{out['pairs']['source']}. Cosine similarity; accuracy with the threshold chosen on the other "
            "folds; mean ± std over folds."
        ),
    )
    scores_by: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    withheld: dict[str, float] = {}
    for name, (ids, feats) in sources.items():
        fa, ok_a = item_features(pairs.a, ids, feats)
        fb, ok_b = item_features(pairs.b, ids, feats)
        valid = ok_a & ok_b
        s = np.full(len(pairs), np.nan)
        s[valid] = cosine_scores(fa[valid], fb[valid])
        same_v = pairs.same[valid]
        identical = float(np.mean(s[valid][same_v] > 1 - 1e-9)) if same_v.any() else 0.0
        if identical > IDENTICAL_BY_CONSTRUCTION:
            # a feature shared by all images of a subject (the multi-image fit's α_id) makes same
            # pairs identical: its scores measure the labels, not recognition
            withheld[name] = identical
            out["results"][name] = {
                "withheld": "identical by construction",
                "identical_feature_same_pairs": identical,
                "pairs_used": int(valid.sum()),
                "pairs_missing_features": int((~valid).sum()),
            }
            ctx.notes.append(
                f"verification with {name} not shown: {100 * identical:.0f}% of same-subject pairs have "
                "identical features (the multi-image fit shares α_id within a subject), so its scores are "
                "not a measure of recognition; build with --set stages.fit.identity=image for per-image "
                "α_id, or use the encoder's c_id."
            )
            continue
        scores_by[name] = (s, valid)
    fusion = list(ctx.params["fusion"])
    missing = [n for n in fusion if n not in scores_by]
    if missing and len(missing) < len(fusion):  # all missing = no encoder, already noted
        ctx.notes.append(f"score fusion of {fusion} skipped: no usable features for {missing}")
    if len(fusion) == 2 and not missing:
        valid = scores_by[fusion[0]][1] & scores_by[fusion[1]][1]
        fused = np.full(len(pairs), np.nan)
        fused[valid] = fuse_scores([scores_by[n][0][valid] for n in fusion], pairs.fold[valid])
        scores_by[" + ".join(fusion) + " (fused)"] = (fused, valid)
    rows, curves = [], {}
    for name, (s, valid) in scores_by.items():
        res: dict = {"pairs_used": int(valid.sum()), "pairs_missing_features": int((~valid).sum())}
        same_v = pairs.same[valid]
        if same_v.any() and name in sources:  # cosine sources only (fused scores are z-scores)
            res["identical_feature_same_pairs"] = float(np.mean(s[valid][same_v] > 1 - 1e-9))
        try:
            rep = verification_report(s[valid], same_v, pairs.fold[valid])
        except ValueError as exc:
            res["error"] = str(exc)
            out["results"][name] = res
            ctx.notes.append(f"verification with {name}: {exc}")
            continue
        res.update(rep)
        curves[name] = (rep["roc"]["fpr"], rep["roc"]["tpr"])
        out["results"][name] = res
        sm = rep["summary"]
        rows.append(
            {
                "features": name,
                "pairs": int(valid.sum()),
                "accuracy %": sm["accuracy_pct"],
                "100 − EER %": sm["100_minus_eer_pct"],
                "AUC": sm["auc"],
                "TAR@FAR=10% (%)": sm["tar_at_far_0.1_pct"],
                "TAR@FAR=1% (%)": sm["tar_at_far_0.01_pct"],
            }
        )
    if withheld:
        ctx.add(
            sec,
            rp.Paragraph(
                "Not shown, identical by construction: "
                + "; ".join(f"{n} ({100 * v:.0f}% of same pairs identical)" for n, v in withheld.items())
                + ". The multi-image fit gives every image of a subject the same α_id."
            ),
        )
    ctx.add(sec, rp.Table(rows))
    if curves:
        ctx.figure(sec, "roc", rp.Roc(curves))
    return out


# --- reconstruction --------------------------------------------------------------------------------
def _even(n: int, k: int) -> set[int]:
    """k evenly spaced indices of range(n) (all when k >= n)."""
    if k <= 0:
        return set()
    if k >= n:
        return set(range(n))
    return set(np.linspace(0, n - 1, k).round().astype(int).tolist())


def _encoder_shapes(ctx: Context, image_ids: list[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(image_id, identity shape, full shape) from the encoder, in batches (bounded memory)."""
    have = [i for i in image_ids if i in ctx.crops]
    for k in range(0, len(have), ENCODER_BATCH):
        batch = have[k : k + ENCODER_BATCH]
        ident, full = ctx.encoder.reconstruct(np.stack([ctx.crops[i] for i in batch]))
        yield from zip(batch, ident, full, strict=True)


def reconstruction_section(
    ctx: Context, truth: SyntheticTruth | ScanTruth, progress: Callable[[str], None]
) -> tuple[dict, list[dict]]:
    sec = "reconstruction"

    pred = Predictors(
        ctx.fits,
        ctx.model,
        ctx.shape,
        (lambda ids: _encoder_shapes(ctx, ids)) if ctx.encoder is not None else None,
    )

    def samples() -> Iterator[Sample]:
        return (
            synthetic_samples(pred, truth) if isinstance(truth, SyntheticTruth) else scan_samples(pred, truth)
        )

    # Genova's ICP is the slow part: an evenly spaced subset per source/target. Counting needs a
    # first pass; samples are streamed (never all in memory: each holds two 53k-vertex shapes).
    groups: dict[tuple[str, str], int] = {}
    order: list[tuple[str, str] | None] = []
    for s in samples():
        key = (s.source, s.target) if s.pred is not None else None
        if key:
            groups[key] = groups.get(key, 0) + 1
        order.append(key)
    chosen = {key: _even(n, ctx.params["genova_max_samples"]) for key, n in groups.items()}
    seen: dict[tuple[str, str], int] = {}
    rows = []
    for i, s in enumerate(samples()):
        key = order[i]
        with_genova = False
        if key is not None and ctx.params["genova"]:
            with_genova = seen.get(key, 0) in chosen[key]
            seen[key] = seen.get(key, 0) + 1
        rows.append(measure(s, ctx.params, with_genova, ctx.params["seed"] + i))
        if (i + 1) % 50 == 0:
            progress(f"reconstruction: {i + 1}/{len(order)} samples")
    rows = from_rows(rows, load_schema("evaluation")).to_pylist()  # validated and typed
    summary = summarise_errors(rows, ctx.params["expression_bins_mm"])
    kind = "synthetic" if isinstance(truth, SyntheticTruth) else "scans"
    ctx.add(
        sec,
        rp.Paragraph(
            f"Ground truth: {truth.path} ({kind}). Liu et al.: 68-landmark similarity alignment, crop "
            f"{ctx.params['crop_radius_mm']:g} mm around the nose tip, mean per-vertex distance (mm). "
            "Genova et al.: symmetric point-to-plane distance after ICP with isotropic scale in the region "
            f"of intersection (on up to {ctx.params['genova_max_samples']} samples per row)."
        ),
        rp.Table(
            [
                {
                    "prediction": rp.readable(name),
                    "samples": e["samples"],
                    "measured": e["measured"],
                    "Liu mean (mm)": _ms(e["overall"].get("liu_mean_mm")),
                    "Liu RMS (mm)": _ms(e["overall"].get("liu_rms_mm")),
                    "Genova (mm)": _ms(e["overall"].get("genova_mm")),
                    "Genova n": e["overall"].get("genova_mm", {}).get("n"),
                }
                for name, e in summary.items()
            ]
        ),
    )
    yaw_rows = []
    counts: list[dict] = []
    for name, e in summary.items():
        if "per_yaw" in e:
            yaw_rows.append(
                {
                    "prediction": rp.readable(name),
                    **{r["yaw"]: r["liu_mean_mm"]["mean"] for r in e["per_yaw"]},
                }
            )
    if yaw_rows:
        counts = next(e for e in summary.values() if "per_yaw" in e)["per_yaw"]
        # no empty bins: a yaw bin no sample fell in is left out
        counts = [r for r in counts if r["liu_mean_mm"]["n"]]
        labels = [r["yaw"] for r in counts]
        count_row = {"prediction": "samples (first row)", **{r["yaw"]: r["liu_mean_mm"]["n"] for r in counts}}
        ctx.add(
            sec,
            rp.Heading("Liu et al. error (mm) per yaw (Table 1 layout)"),
            rp.Table([*yaw_rows, count_row], ["prediction", *labels]),
        )
    expr_rows = []
    for name, e in summary.items():
        for r in e.get("per_expression", []):
            if not r["liu_mean_mm"]["n"]:
                continue  # no empty bins
            expr_rows.append(
                {
                    "prediction": rp.readable(name),
                    "expression level": r["expression"],
                    "n": r["liu_mean_mm"]["n"],
                    "Liu mean (mm)": _ms(r["liu_mean_mm"]),
                    "Genova (mm)": _ms(r.get("genova_mm")),
                }
            )
    if expr_rows:
        ctx.add(
            sec,
            rp.Heading("Per expression level (mean per-vertex expression displacement)"),
            rp.Table(expr_rows),
        )
    series: dict[str, list[float]] = {}
    for r in rows:
        if r["failure_reason"] is None:
            series.setdefault(f"{r['source']}/{r['target']}", []).append(r["liu_mean_mm"])
    if series:
        series = {k: np.asarray(v, float) for k, v in sorted(series.items())}
        ctx.figure(
            sec,
            "reconstruction_error",
            rp.Histogram(series, "Liu et al. error per sample", "mean per-vertex distance (mm)"),
        )
        if yaw_rows:
            labels = [r["yaw"] for r in counts]
            ctx.figure(
                sec,
                "error_per_yaw",
                rp.Bars(
                    labels,
                    {r["prediction"]: [r.get(lab) for lab in labels] for r in yaw_rows},
                    "Error per yaw bin",
                    "Liu et al. error (mm)",
                ),
            )
    return {"ground_truth": truth.path, "kind": kind, "results": summary}, rows


def _ms(stats: dict | None) -> dict | None:
    if not stats or not stats.get("n"):
        return None
    return {"mean": stats["mean"], "std": stats["std"]}


# --- picture sheet -----------------------------------------------------------------------------------
def sheet_images(fits: Frame, n: int) -> list[int]:
    """Rows for the picture sheet: one fitted image per subject first (sorted), then further images."""
    ok = np.flatnonzero(fitted_mask(fits))
    order = sorted(ok, key=lambda i: (str(fits["subject"][i]), str(fits["image_id"][i])))
    seen: set[str] = set()
    firsts, rest = [], []
    for i in order:
        (rest if fits["subject"][i] in seen else firsts).append(int(i))
        seen.add(fits["subject"][i])
    return (firsts + rest)[:n]


def sheet_section(ctx: Context, truth: SyntheticTruth | ScanTruth | None) -> dict:
    sec = "picture-sheet"
    n = ctx.params["sheet_rows"]
    f = ctx.fits
    chosen = sheet_images(f, n)
    if not chosen or ctx.model is None:
        if ctx.model is None:
            ctx.notes.append("picture sheet skipped: no morphable model to build shapes from")
        return {}
    ids = [str(f["image_id"][i]) for i in chosen]
    missing = {i for i in ids if i not in ctx.crops}
    uris = load_index_uris(ctx.run_root, missing, ctx.storage_options) if missing else {}
    gt = truth.table if isinstance(truth, SyntheticTruth) else None
    gt_row = gt.index_of("image_id") if gt is not None else {}
    columns = ["input", "fit: full (pose)", "fit: identity"]
    if gt is not None:
        columns.append("ground truth: full")
    if ctx.encoder is not None:
        columns += ["encoder: full", "encoder: identity"]
    enc = (
        {i: (ident, full) for i, ident, full in _encoder_shapes(ctx, ids)} if ctx.encoder is not None else {}
    )
    size, tri = ctx.params["render_size"], ctx.model.triangles
    rows = []
    for i, image_id in zip(chosen, ids, strict=True):
        a_id, a_exp = f["alpha_id"][i], f["alpha_exp"][i]
        rot = (
            f["rotation"][i].reshape(3, 3)
            if "rotation" in f and np.all(np.isfinite(f["rotation"][i]))
            else None
        )
        img = ctx.crops.get(image_id)
        if img is None and image_id in uris:
            img = load_thumbnail(uris[image_id], size)
        cells = [
            img,
            render_shaded(ctx.shape(a_id, a_exp), tri, size, rot),
            render_shaded(ctx.shape(a_id), tri, size),
        ]
        if gt is not None:
            j = gt_row.get(image_id)
            cells.append(
                None
                if j is None
                else render_shaded(ctx.shape(gt["alpha_id"][j], gt["alpha_exp"][j]), tri, size)
            )
        if ctx.encoder is not None:
            e = enc.get(image_id)
            cells += [render_shaded(e[1], tri, size), render_shaded(e[0], tri, size)] if e else [None, None]
        rows.append((f"{f['subject'][i]}\n{Path(image_id).name}", cells))
    ctx.figure(sec, "picture_sheet", rp.Sheet(rows, columns))
    ctx.add(
        sec,
        rp.Paragraph(
            "Input images beside renders of their reconstructed full shape (in the fitted pose) and the "
            "subject's identity shape (frontal, neutral), as in Liu et al. Fig. 5/8."
        ),
    )
    return {"images": ids, "columns": columns}


def needed_images(ctx: Context, pairs: PairList | None, truth: SyntheticTruth | ScanTruth | None) -> set[str]:
    """The run's images the encoder must see: pair items (a directory item covers its images), ground
    truth images or scanned subjects' images, and the picture sheet. Decoding only these keeps memory
    bounded on a CASIA-sized export."""
    ids = sorted(str(i) for i in ctx.fits["image_id"])
    subjects = np.asarray(ctx.fits["subject"]).astype(str)
    exact = set(ids)
    need: set[str] = set()
    if pairs is not None:
        for item in {*pairs.a, *pairs.b}:
            if item in exact:
                need.add(item)
            else:
                prefix = item.rstrip("/") + "/"
                lo = bisect.bisect_left(ids, prefix)
                hi = bisect.bisect_left(ids, prefix + "\U0010ffff")
                need.update(ids[lo:hi])
    if isinstance(truth, SyntheticTruth):
        need.update(str(i) for i in truth.table["image_id"])
    elif isinstance(truth, ScanTruth):
        for r in truth.rows:
            if r["kind"] == "image_id":
                need.add(r["key"])
            else:
                need.update(
                    str(i) for i, s in zip(ctx.fits["image_id"], subjects, strict=True) if s == r["key"]
                )
    need.update(str(ctx.fits["image_id"][i]) for i in sheet_images(ctx.fits, ctx.params["sheet_rows"]))
    return need


# --- identity error against images per subject ----------------------------------------------------------
def _run_fit(model: MorphableModel, manifest: Manifest) -> Callable:
    """The run's own fit (its parameters and landmark error model) as a function of a landmarks table."""
    import array_api_compat.numpy as anp

    from pipeline.fit.loop import prepare_model
    from pipeline.fit.noise import load_error_model, prepare_noise, uniform
    from pipeline.fit.stage import error_model_file, fit_landmark_table, options_from_params

    params = manifest.stage_params("fit")
    path, _ = error_model_file(manifest)
    em = load_error_model(path) if path is not None else uniform(float(params["landmark_sigma_mm"]))
    opt = options_from_params(params, em)
    lm = prepare_model(model, anp, contour=opt.contour, dtype=np.float32)
    noise = prepare_noise(em, lm.order, anp, np.float32)
    return lambda table: fit_landmark_table(table, model, opt, lm=lm, noise=noise)


def identity_curve_section(ctx: Context, truth: SyntheticTruth, manifest: Manifest) -> dict:
    """The report's first table: refits on random M-subsets of each subject's images against the
    mean shape (:mod:`.identity_curve`)."""
    from pipeline.evaluate.identity_curve import identity_curve, verdict
    from pipeline.storage.run import Run

    sec = "identity-curve"
    try:
        landmarks = Run(ctx.run_root, ctx.storage_options).table("landmarks")
    except (FileNotFoundError, ValueError) as exc:
        ctx.add(sec, rp.Paragraph(f"not measured: the run's landmarks cannot be read ({exc})"))
        return {"verdict": None, "points": [], "split": "all subjects"}
    gt = truth.table
    true_alpha = {}
    for s, a in zip(gt["subject"], gt["alpha_id"], strict=True):
        true_alpha.setdefault(str(s), np.asarray(a, np.float64))
    points = identity_curve(
        landmarks,
        true_alpha,
        ctx.model,
        _run_fit(ctx.model, manifest),
        tuple(int(m) for m in ctx.params["curve_images"]),
        int(ctx.params["curve_repeats"]),
        int(ctx.params["seed"]),
        float(ctx.params["crop_radius_mm"]),
    )
    text = verdict(points)
    ctx.add(
        sec,
        rp.Paragraph(text),
        rp.Table(
            [
                {
                    "m": p.m,
                    "subjects": p.subjects,
                    "fits": p.draws,
                    "ratio_all": p.ratio_all,
                    "ratio_liu": p.ratio_liu,
                    "fit_all": p.fit_all_mm,
                    "mean_all": p.mean_all_mm,
                    "fit_liu": p.fit_liu_mm,
                    "mean_liu": p.mean_liu_mm,
                }
                for p in points
            ],
            ["m", "subjects", "fits", "ratio_all", "ratio_liu", "fit_all", "mean_all", "fit_liu", "mean_liu"],
            [
                "images per subject (M)",
                "subjects",
                "fits",
                "fit ÷ mean shape, all vertices",
                "fit ÷ mean shape, Liu 95 mm",
                "fit, all vertices (mm)",
                "mean shape, all vertices (mm)",
                "fit, Liu 95 mm (mm)",
                "mean shape, Liu 95 mm (mm)",
            ],
        ),
        rp.Paragraph(
            "Measured on every subject of the run (the fit has no training split): each subject with at "
            f"least M usable landmark sets is refitted {ctx.params['curve_repeats']} times on random M of "
            "its images (once when M is all of them) with the run's fit parameters and landmark error "
            "model, and its identity shape compared with the true one: RMS over all vertices after a "
            "similarity alignment, and Liu et al.'s mean distance within "
            f"{ctx.params['crop_radius_mm']:g} mm of the nose tip after the 68-landmark alignment. Below 1 "
            "the fit beats the model's mean shape on the same subjects.",
            muted=True,
        ),
    )
    if points:
        ctx.figure(
            sec,
            "identity_error_vs_m",
            rp.Lines(
                [p.m for p in points],
                {
                    "fit, all vertices": [p.ratio_all for p in points],
                    "fit, Liu 95 mm": [p.ratio_liu for p in points],
                },
                "Fitted identity error over the mean shape's",
                "images per subject (M)",
                "fit ÷ mean shape",
                reference=1.0,
            ),
        )
    return {"verdict": text, "points": [p.as_dict() for p in points], "split": "all subjects"}


# --- the whole evaluation ------------------------------------------------------------------------------
def summary_section(ctx: Context, doc: dict) -> None:
    rows = [
        {"": "run", "value": doc["run"]},
        {"": "images fitted", "value": f"{doc['fit_quality']['fitted']} / {doc['fit_quality']['images']}"},
    ]
    reasons = doc["fit_quality"].get("rejected_by_reason", {})
    if any(k.startswith("identity_") for k in reasons):
        rows.append(
            {
                "": "identity screening: outliers / ambiguous images",
                "value": f"{reasons.get('identity_outlier', 0)} / {reasons.get('identity_ambiguous', 0)}",
            }
        )
    if doc.get("identity_curve", {}).get("points"):
        last = doc["identity_curve"]["points"][-1]
        rows.append(
            {
                "": f"fit identity ÷ mean shape at M = {last['m']} (all vertices / Liu 95 mm)",
                "value": f"{last['ratio_all_vertices']:.3g} / {last['ratio_liu']:.3g}",
            }
        )
    if "encoder_split" in doc:
        es = doc["encoder_split"]
        rows.append(
            {
                "": "encoder measured on",
                "value": f"{es['split']} split: {es['images']} images of {es['subjects']} subjects",
            }
        )
    for name, res in doc.get("verification", {}).get("results", {}).items():
        sm = res.get("summary")
        if sm:
            rows.append({"": f"verification accuracy % ({name})", "value": sm["accuracy_pct"]})
    for name, e in doc.get("reconstruction", {}).get("results", {}).items():
        if e["overall"].get("liu_mean_mm", {}).get("n"):
            rows.append({"": f"Liu error mm ({name})", "value": _ms(e["overall"]["liu_mean_mm"])})
        if e["overall"].get("genova_mm", {}).get("n"):
            rows.append({"": f"Genova error mm ({name})", "value": _ms(e["overall"]["genova_mm"])})
    ctx.add("summary", rp.Table(rows))


@dataclass
class Evaluation:
    """Everything measured, as data: the report document, per-section blocks and figures (rendered
    by :mod:`.report`), the per-sample rows and the generated pairs."""

    doc: dict
    blocks: dict[str, list[rp.Block]]
    figures: dict[str, rp.FigureData]
    samples: list[dict] | None = None
    generated_pairs: PairList | None = None


def evaluate_run(
    run_root: str,
    manifest: Manifest,
    params: dict,
    storage_options: dict | None = None,
    progress: Callable[[str], None] = log.info,
) -> Path:
    """Evaluate a run and write ``RUN/eval/``; returns the path of ``report.html``. The output
    directory must be local."""
    fs, root = fsspec.core.url_to_fs(run_root, **(storage_options or {}))
    if not isinstance(fs, LocalFileSystem):
        raise ValueError(f"{run_root}: evaluate writes its report to a local run directory")
    out_dir = Path(root) / "eval"
    ev = compute_evaluation(run_root, manifest, params, storage_options, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ev.generated_pairs is not None:
        write_csv_pairs(ev.generated_pairs, out_dir / "pairs.csv")
    if ev.samples is not None:
        buf = io.BytesIO()
        pq.write_table(from_rows(ev.samples, load_schema("evaluation")), buf)
        atomic_write(out_dir / "samples.parquet", buf.getvalue())
    return rp.write_report(out_dir, ev.doc, ev.figures, ev.blocks)


def compute_evaluation(
    run_root: str,
    manifest: Manifest,
    params: dict,
    storage_options: dict | None = None,
    progress: Callable[[str], None] = log.info,
) -> Evaluation:
    """Measure a run (no files written): fit quality, verification, reconstruction, picture sheet."""
    fits = load_fits(run_root, storage_options)
    model, why = load_model(manifest)
    ctx = Context(run_root, params, fits, model, None, storage_options)
    if why:
        ctx.notes.append(why)
    fit_sha = fits_model_sha256(run_root, storage_options)
    if model is not None and fit_sha and fit_sha != model.sha256:
        raise ValueError(
            f"{run_root}/fit was fitted with morphable model sha256 {fit_sha[:12]}…, the manifest resolves "
            f"{model.name} ({model.sha256[:12]}…); evaluate with the run's manifest"
        )
    doc: dict = {
        "run": str(run_root),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "morphset_version": __version__,
        "params": params,
        "model": {"name": model.name, "sha256": model.sha256} if model else None,
    }
    progress("fit quality")
    doc["fit_quality"] = fit_quality_section(ctx)

    truth = load_truth(params["ground_truth"]) if params.get("ground_truth") else None
    if truth is not None and model is None:
        raise FileNotFoundError(f"reconstruction accuracy needs the morphable model: {why}")
    try:
        pairs, generated = _pairs(ctx)
    except ValueError as exc:
        if params.get("pairs"):
            raise  # a pairs file the user named is malformed: say so
        pairs, generated = None, True  # too few subjects to generate pairs: note it, evaluate the rest
        ctx.notes.append(f"verification skipped: {exc}")

    encoder_feats: dict[str, np.ndarray] = {}
    encoder_ids: list[str] = []
    if params.get("encoder"):
        from pipeline.train.inference import load_encoder

        encoder = load_encoder(params["encoder"])
        if model is not None and encoder.model_sha256 != model.sha256:
            raise ValueError(
                f"{params['encoder']}: encoder was trained with morphable model {encoder.model_sha256[:12]}…, "
                f"this run uses {model.sha256[:12]}…"
            )
        encoder.batch_size = params["batch_size"]
        ctx.encoder = encoder
        progress("encoder: decoding crops")
        needed = needed_images(ctx, pairs, truth)
        split = ctx.params.get("encoder_split", "val")
        ids, subj, crops = load_export_crops(
            run_root, needed, storage_options, {"val"} if split == "val" else None
        )
        if split == "val" and not ids:
            ctx.notes.append(
                "the export has no validation split: the encoder is evaluated on the subjects it was trained on"
            )
            split = "all"
            ids, subj, crops = load_export_crops(run_root, needed, storage_options)
        doc["encoder_split"] = {
            "split": split,
            "images": len(ids),
            "subjects": len(set(subj)),
            "note": "encoder figures: "
            + (
                "validation subjects only (held out of training)"
                if split == "val"
                else "every exported image"
            )
            + "; fit figures: every subject of the run",
        }
        ctx.notes.append(
            f"encoder figures are measured on {len(ids)} images of {len(set(subj))} subjects "
            f"({'the validation split, subjects the encoder was not trained on' if split == 'val' else 'all exported images'}); "
            "fit figures on every subject of the run"
        )
        if not ids:
            ctx.notes.append(f"{run_root}/export has no committed shards: encoder predictions skipped")
            ctx.encoder = None
        else:
            ctx.crops = dict(zip(ids, crops, strict=True))
            progress(f"encoder: embedding {len(ids)} crops")
            encoder_feats = encoder.embed(crops)
            encoder_ids = ids
            if model is not None:
                shapes = identity_vertices(model, encoder_feats["alpha_id"], vertex_subset(model))
                row_of = ctx.fits.index_of("image_id")
                subj = np.array([str(ctx.fits["subject"][row_of[i]]) if i in row_of else i for i in ids])
                ic = identity_consistency(subj, shapes)
                doc["fit_quality"]["identity_consistency_encoder"] = ic
                ctx.add("fit-quality", rp.Table([{"source": "encoder α_id", **ic}]))
    else:
        ctx.notes.append(
            "no trained encoder given (--encoder): encoder predictions and c_id verification skipped"
        )

    progress("verification")
    if pairs is not None:
        doc["verification"] = verification_section(
            ctx, pairs, generated, feature_sources(ctx, encoder_feats, encoder_ids)
        )

    if truth is not None and model is not None:
        if isinstance(truth, SyntheticTruth) and truth.model_sha256 and truth.model_sha256 != model.sha256:
            raise ValueError(
                f"{truth.path}: rendered from morphable model {truth.model_sha256[:12]}…, this run uses "
                f"{model.name} ({model.sha256[:12]}…)"
            )
        if isinstance(truth, SyntheticTruth):
            progress("identity error against images per subject")
            doc["identity_curve"] = identity_curve_section(ctx, truth, manifest)
        progress("reconstruction accuracy")
        doc["reconstruction"], samples = reconstruction_section(ctx, truth, progress)
    else:
        samples = None
        ctx.notes.append("no ground truth given (--ground-truth): reconstruction accuracy not measured")

    progress("picture sheet")
    doc["picture_sheet"] = sheet_section(ctx, truth)
    summary_section(ctx, doc)
    doc["notes"] = ctx.notes
    ctx.add("notes", *([rp.Paragraph(n) for n in ctx.notes] or [rp.Paragraph("none")]))
    return Evaluation(
        doc, ctx.blocks, ctx.figures, samples, pairs if pairs is not None and generated else None
    )
