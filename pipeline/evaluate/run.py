"""``morphset evaluate``: measure a run's fits (and optionally a trained encoder) and write the report.

Orchestration only: reading inputs (:mod:`.inputs`), measures (:mod:`.verification`,
:mod:`.reconstruction`, :mod:`.fit_quality`), aggregation (:mod:`.summary`) and the page
(:mod:`.report`). Outputs in ``RUN/eval/``: ``report.html``, ``report.json``, ``samples.parquet``
(schema ``evaluation``), ``pairs.csv`` when pairs were generated, and the figures as PNG files.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import functools
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline import __version__
from pipeline.config.manifest import Manifest
from pipeline.config.schemas import from_rows, load_schema
from pipeline.core.tables import RunTables
from pipeline.errors import MorphsetError
from pipeline.evaluate import report as rp
from pipeline.evaluate.bootstrap import ci95_ratio
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
    load_export_items,
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
    # source name ("encoder", or "encoder <objective>" beside others) -> TrainedEncoder
    encoders: dict[str, Any]
    storage_options: dict | None = None
    tables: RunTables | None = None  # the run's tables by role, under the evaluation's manifest
    notes: list[str] = field(default_factory=list)
    figures: dict[str, rp.FigureData] = field(default_factory=dict)  # data; rendered by report.py
    blocks: dict[str, list[rp.Block]] = field(default_factory=dict)  # data; rendered by report.py
    crops: dict[str, np.ndarray] = field(default_factory=dict)  # image_id -> uint8 crop
    shape: ShapeBuilder | None = None  # vertices from coefficients of ``model``

    def __post_init__(self) -> None:
        if self.model is not None and self.shape is None:
            self.shape = ShapeBuilder(self.model)
        if self.tables is None:
            self.tables = RunTables(self.run_root, None, self.storage_options)

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


@dataclass
class PairSet:
    """Pairs and the feature sources measured on them. Generated pairs are drawn within the
    subjects a source has features for (every fitted subject for the fit; the encoder's split for
    the encoder), so both classes are there; a pairs file serves every source."""

    key: str  # "fit" | "encoder" | "file"
    pairs: PairList
    generated: bool
    measured_on: str  # the set, in words
    sources: list[str]  # feature sources reported on these pairs
    file: str | None = None  # RUN/eval/<file> for generated pairs


def read_pair_file(ctx: Context) -> PairList:
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
    return pairs


def generated_pairs(ctx: Context, image_ids: list[str], subjects: list[str], what: str) -> PairList | None:
    """Pairs drawn within these images' subjects; None (with a note) where they cannot be drawn."""
    items: dict[str, list[str]] = {}
    for subject, image_id in zip(subjects, image_ids, strict=True):
        items.setdefault(str(subject), []).append(str(image_id))
    items = {k: sorted(v) for k, v in items.items()}
    try:
        return generate_pairs(items, ctx.params["n_folds"], ctx.params["pairs_per_fold"], ctx.params["seed"])
    except ValueError as exc:
        ctx.notes.append(f"verification on {what} skipped: {exc}")
        return None


def feature_sources(ctx: Context, encoder_feats: dict[str, tuple[list[str], dict[str, np.ndarray]]]) -> dict:
    """Verification features by source name: the fit's whitened α_id, and each encoder's c_id and
    α_id (``encoder_feats``: source -> (image ids, features))."""
    good = ctx.fitted
    sources: dict[str, tuple[list[str], np.ndarray]] = {}
    if len(good):
        a = good["alpha_id"]
        if ctx.model is not None and a.shape[1] == ctx.model.k_id:
            a = a / ctx.model.id_std.astype(np.float64)  # whiten: every component weighs by its prior
        sources["fit α_id"] = (list(good["image_id"]), a)
    for name, (ids, feats) in encoder_feats.items():
        sources[f"{name} c_id"] = (ids, feats["c_id"])
        sources[f"{name} α_id"] = (ids, feats["alpha_id"])
    return sources


def _subject_of(ctx: Context) -> Callable[[str], str]:
    """The subject of a pair item: the fits' subject of an image id, else the item's first folder
    (a YouTube Faces video ``name/number``)."""
    by_id = {str(i): str(s) for i, s in zip(ctx.fits["image_id"], ctx.fits["subject"], strict=True)}
    return lambda item: by_id.get(item) or item.strip("/").split("/")[0]


def _scores(pairs: PairList, ids: list[str], feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fa, ok_a = item_features(pairs.a, ids, feats)
    fb, ok_b = item_features(pairs.b, ids, feats)
    valid = ok_a & ok_b
    s = np.full(len(pairs), np.nan)
    s[valid] = cosine_scores(fa[valid], fb[valid])
    return s, valid


def verification_section(ctx: Context, pair_sets: list[PairSet], sources: dict) -> dict:
    """Verification of each source on its pair set. A row is a result only where its pairs hold
    both classes with at least ``min_pairs_per_class`` each; otherwise the page says why."""
    sec = "verification"
    minimum = int(ctx.params["min_pairs_per_class"])
    subject_of = _subject_of(ctx)
    out: dict = {"pair_sets": {}, "results": {}, "min_pairs_per_class": minimum}
    rows, curves, not_shown = [], {}, []
    for ps in pair_sets:
        pairs = ps.pairs
        out["pair_sets"][ps.key] = {
            "source": f"generated ({ps.file})" if ps.generated else pairs.source,
            "measured_on": ps.measured_on,
            "n_pairs": len(pairs),
            "n_same": int(pairs.same.sum()),
            "n_folds": pairs.n_folds,
            "features": list(ps.sources),
        }
        ctx.add(
            sec,
            rp.Paragraph(
                f"{', '.join(ps.sources)}: {len(pairs)} pairs ({int(pairs.same.sum())} same, "
                f"{int((~pairs.same).sum())} different) in {pairs.n_folds} folds, "
                f"{'generated within' if ps.generated else 'from ' + pairs.source + ', on'} {ps.measured_on}."
            ),
        )
        scores_by: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in ps.sources:
            if name not in sources:
                continue
            s, valid = _scores(pairs, *sources[name])
            same_v = pairs.same[valid]
            identical = float(np.mean(s[valid][same_v] > 1 - 1e-9)) if same_v.any() else 0.0
            if identical > IDENTICAL_BY_CONSTRUCTION:
                # a feature shared by all images of a subject (the multi-image fit's α_id) makes same
                # pairs identical: its scores measure the labels, not recognition
                out["results"][name] = {
                    "pair_set": ps.key,
                    "withheld": "identical by construction",
                    "identical_feature_same_pairs": identical,
                    "pairs_used": int(valid.sum()),
                    "pairs_missing_features": int((~valid).sum()),
                }
                not_shown.append(
                    f"{name}: identical by construction ({100 * identical:.0f}% of same pairs identical; "
                    "the multi-image fit gives every image of a subject the same α_id)"
                )
                ctx.notes.append(
                    f"verification with {name} not shown: {100 * identical:.0f}% of same-subject pairs have "
                    "identical features (the multi-image fit shares α_id within a subject), so its scores are "
                    "not a measure of recognition; build with --set stages.fit.identity=image for per-image "
                    "α_id, or use the encoder's c_id."
                )
                continue
            scores_by[name] = (s, valid)
        # "encoder ..." in the fusion setting means each encoder's own features
        for fusion in dict.fromkeys(
            tuple(
                n.replace("encoder", name, 1) if n.startswith("encoder ") else n for n in ctx.params["fusion"]
            )
            for name in (ctx.encoders or ["encoder"])
        ):
            if len(fusion) == 2 and all(n in scores_by for n in fusion):
                valid = scores_by[fusion[0]][1] & scores_by[fusion[1]][1]
                fused = np.full(len(pairs), np.nan)
                fused[valid] = fuse_scores([scores_by[n][0][valid] for n in fusion], pairs.fold[valid])
                scores_by[" + ".join(fusion) + " (fused)"] = (fused, valid)
            elif len(fusion) == 2 and any(n in scores_by for n in fusion):
                ctx.notes.append(
                    f"score fusion of {list(fusion)} skipped: not both measured on {ps.measured_on}"
                )
        for name, (s, valid) in scores_by.items():
            res: dict = {
                "pair_set": ps.key,
                "pairs_used": int(valid.sum()),
                "pairs_missing_features": int((~valid).sum()),
            }
            same_v = pairs.same[valid]
            n_same, n_diff = int(same_v.sum()), int((~same_v).sum())
            if same_v.any() and name in sources:  # cosine sources only (fused scores are z-scores)
                res["identical_feature_same_pairs"] = float(np.mean(s[valid][same_v] > 1 - 1e-9))
            if min(n_same, n_diff) < minimum:
                why = (
                    f"{n_same} same-person and {n_diff} different-person pairs have features, fewer than "
                    f"{minimum} of each (stages.evaluate.min_pairs_per_class)"
                )
                res["not_shown"] = why
                out["results"][name] = res
                not_shown.append(f"{name}: {why}")
                continue
            items_a = [subject_of(x) for x, ok in zip(pairs.a, valid, strict=True) if ok]
            items_b = [subject_of(x) for x, ok in zip(pairs.b, valid, strict=True) if ok]
            try:
                rep = verification_report(
                    s[valid],
                    same_v,
                    pairs.fold[valid],
                    np.array(items_a),
                    np.array(items_b),
                    ctx.params["seed"],
                )
            except ValueError as exc:
                res["not_shown"] = str(exc)
                out["results"][name] = res
                not_shown.append(f"{name}: {exc}")
                continue
            res.update(rep)
            res["measured_on"] = ps.measured_on
            curves[name] = (rep["roc"]["fpr"], rep["roc"]["tpr"])
            out["results"][name] = res
            sm = rep["summary"]
            rows.append(
                {
                    "features": name,
                    "measured on": ps.measured_on,
                    "pairs (same / different)": f"{n_same} / {n_diff}",
                    "accuracy %": sm["accuracy_pct"],
                    "accuracy 95% CI": rp.Interval(sm["accuracy_pct"].get("ci95")),
                    "AUC": sm["auc"],
                    "AUC 95% CI": rp.Interval(sm["auc"].get("ci95")),
                    "100 − EER %": sm["100_minus_eer_pct"],
                    "TAR@FAR=10% (%)": sm["tar_at_far_0.1_pct"],
                    "TAR@FAR=1% (%)": sm["tar_at_far_0.01_pct"],
                }
            )
    ctx.add(
        sec,
        rp.Paragraph(
            "Cosine similarity; accuracy with the threshold chosen on the other folds; mean ± std over "
            "folds; 95% intervals by drawing subjects with replacement (1,000 draws)."
        ),
    )
    if not_shown:
        ctx.add(sec, rp.Paragraph("Not shown: " + "; ".join(not_shown) + "."))
    if rows:
        ctx.add(sec, rp.Table(rows))
        ctx.figure(sec, "roc", rp.Roc(curves))
    else:
        ctx.add(sec, rp.Paragraph("No feature source has pairs enough to measure verification."))
    return out


# --- reconstruction --------------------------------------------------------------------------------
def _even(n: int, k: int) -> set[int]:
    """k evenly spaced indices of range(n) (all when k >= n)."""
    if k <= 0:
        return set()
    if k >= n:
        return set(range(n))
    return set(np.linspace(0, n - 1, k).round().astype(int).tolist())


def _encoder_shapes(
    ctx: Context, name: str, image_ids: list[str]
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(image_id, identity shape, full shape) from encoder ``name``, in batches (bounded memory)."""
    have = [i for i in image_ids if i in ctx.crops]
    for k in range(0, len(have), ENCODER_BATCH):
        batch = have[k : k + ENCODER_BATCH]
        ident, full = ctx.encoders[name].reconstruct(np.stack([ctx.crops[i] for i in batch]))
        yield from zip(batch, ident, full, strict=True)


def reconstruction_section(
    ctx: Context, truth: SyntheticTruth | ScanTruth, progress: Callable[[str], None]
) -> tuple[dict, list[dict]]:
    sec = "reconstruction"

    pred = Predictors(
        ctx.fits,
        ctx.model,
        ctx.shape,
        {name: functools.partial(_encoder_shapes, ctx, name) for name in ctx.encoders},
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


# --- trained encoders side by side ---------------------------------------------------------------
def encoders_section(ctx: Context, doc: dict, samples: list[dict] | None) -> dict:
    """One row per trained encoder (``liu``, ``genova``, ``liu+genova`` objectives, ...) and the
    landmark fit it learnt from: the 3D error of the full shape on the images the encoders see
    against the mean shape's on the same images (their ratio with its interval, subjects drawn
    with replacement), and verification on the encoders' pairs."""
    sec = "encoders"
    if not ctx.encoders:
        return {}
    liu: dict[tuple[str, str], float] = {}
    subject_of: dict[str, str] = {}
    for r in samples or []:
        if r["target"] == "full" and r["failure_reason"] is None and r["liu_mean_mm"] is not None:
            liu[(r["source"], r["image_id"])] = float(r["liu_mean_mm"])
            subject_of[r["image_id"]] = r["subject"]
    verification = doc.get("verification", {}).get("results", {})
    split = doc.get("encoder_split", {})
    configs = {name: enc.config for name, enc in ctx.encoders.items()}
    rows, table = [], []
    for name in ["fit", *ctx.encoders]:
        # every figure on the images the encoders were evaluated on (their crops were decoded)
        ids = sorted(i for i in ctx.crops if (name, i) in liu and ("mean shape", i) in liu)
        own = np.array([liu[(name, i)] for i in ids])
        mean = np.array([liu[("mean shape", i)] for i in ids])
        people = np.array([subject_of[i] for i in ids], dtype=object)
        ratio = float(own.mean() / mean.mean()) if len(ids) and mean.mean() > 0 else None
        cfg = configs.get(name, {})
        entry = {
            "source": name,
            "objective": cfg.get("objective") if name != "fit" else "landmark fit (the labels)",
            "epochs": cfg.get("epochs"),
            "images": len(ids),
            "subjects": len(set(people.tolist())),
            "liu_mean_mm": float(own.mean()) if len(ids) else None,
            "mean_shape_liu_mean_mm": float(mean.mean()) if len(ids) else None,
            "ratio_to_mean_shape": ratio,
            "ratio_ci95": ci95_ratio(own, mean, people, int(ctx.params["seed"])) if len(ids) else None,
        }
        for feature in ("c_id", "α_id"):
            sm = (verification.get(f"{name} {feature}") or {}).get("summary")
            entry[f"{feature}_auc"] = sm["auc"]["mean"] if sm else None
            entry[f"{feature}_auc_ci95"] = sm["auc"].get("ci95") if sm else None
        rows.append(entry)
        table.append(
            {
                "": name,
                "objective": entry["objective"] or "–",
                "epochs": entry["epochs"] if entry["epochs"] is not None else "–",
                "images (subjects)": f"{entry['images']} ({entry['subjects']})",
                "Liu error (mm)": entry["liu_mean_mm"],
                "mean shape (mm)": entry["mean_shape_liu_mean_mm"],
                "÷ mean shape": entry["ratio_to_mean_shape"],
                "95% CI": rp.Interval(entry["ratio_ci95"]),
                "c_id AUC": entry["c_id_auc"] if entry["c_id_auc"] is not None else "–",
                "α_id AUC": entry["α_id_auc"] if entry["α_id_auc"] is not None else "–",
            }
        )
    if not any(r["images"] for r in rows):
        ctx.add(
            sec, rp.Paragraph("not measured: no ground truth for the images the encoders were evaluated on")
        )
        return {"rows": rows}
    ctx.add(
        sec,
        rp.Paragraph(
            f"Each trained encoder on {split.get('measured_on', 'the exported images')}, beside the landmark "
            "fit whose labels they learnt from. 3D error: Liu et al.'s mean per-vertex distance of the full "
            "shape (mm), against the mean shape's on the same images; below 1 the prediction carries shape "
            "the mean lacks. Verification: AUC of the encoder's pairs (the fit's α_id is shared by a "
            "subject's images, so it has none). The per-source tables below hold the rest."
        ),
        rp.Table(table),
    )
    return {"rows": rows}


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
    uris = load_index_uris(ctx.tables, missing) if missing else {}
    gt = truth.table if isinstance(truth, SyntheticTruth) else None
    gt_row = gt.index_of("image_id") if gt is not None else {}
    columns = ["input", "fit: full (pose)", "fit: identity"]
    if gt is not None:
        columns.append("ground truth: full")
    enc = {}
    for name in ctx.encoders:
        columns += [f"{name}: full", f"{name}: identity"]
        enc[name] = {i: (ident, full) for i, ident, full in _encoder_shapes(ctx, name, ids)}
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
        for name in ctx.encoders:
            e = enc[name].get(image_id)
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


def needed_images(
    ctx: Context, pair_lists: list[PairList | None], truth: SyntheticTruth | ScanTruth | None
) -> set[str]:
    """The run's images the encoder must see: pair items (a directory item covers its images), ground
    truth images or scanned subjects' images, and the picture sheet. Decoding only these keeps memory
    bounded on a CASIA-sized export."""
    ids = sorted(str(i) for i in ctx.fits["image_id"])
    subjects = np.asarray(ctx.fits["subject"]).astype(str)
    exact = set(ids)
    need: set[str] = set()
    for item in {x for p in pair_lists if p is not None for x in (*p.a, *p.b)}:
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
def run_fit(model: MorphableModel, manifest: Manifest) -> Callable:
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

    sec = "identity-curve"
    assert ctx.tables is not None
    try:
        landmarks = ctx.tables.table("landmarks")
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
        run_fit(ctx.model, manifest),
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


# --- provenance ------------------------------------------------------------------------------------
def provenance(
    run_root: str,
    manifest: Manifest,
    params: dict,
    model: MorphableModel | None,
    storage_options: dict | None,
) -> dict:
    """What made these figures: the package version, the run's dataset and landmark backend, the
    morphable model's and the landmark error model's sha256, the encoder's checkpoint, the seeds
    and the settings of the stages that produced the labels."""
    from pipeline.storage.run import Run, RunError

    try:
        record = Run(run_root, storage_options).read_record()
    except (RunError, OSError, ValueError):
        record = None
    backend = str(manifest.stage_params("landmarks")["backend"])
    fit = manifest.stage_params("fit")
    error_model = manifest.get(f"models.landmark_error.{backend}") if fit.get("error_model") else None
    encoders = []
    for path in encoder_paths(params.get("encoder")):
        # the folder morphset train wrote, or its export folder
        meta = next(
            (m for m in (Path(path) / "export" / "encoder.json", Path(path) / "encoder.json") if m.is_file()),
            None,
        )
        entry = {"path": str(path)}
        if meta is not None:
            import json

            doc = json.loads(meta.read_text(encoding="utf-8"))
            keep = (
                "state_sha256",
                "torchscript_sha256",
                "model_sha256",
                "epochs",
                "identification",
                "objective",
            )
            entry.update({k: doc[k] for k in keep if k in doc})
        encoders.append(entry)
    return {
        "morphset_version": __version__,
        "built_with_version": record.morphset_version if record else None,
        "dataset": record.dataset if record else None,
        "dataset_root": record.root if record else None,
        "landmark_backend": backend,
        "detect_backend": manifest.stage_params("detect").get("backend"),
        "embed_backend": manifest.stage_params("embed").get("backend"),
        "morphable_model": {"name": model.name, "sha256": model.sha256} if model is not None else None,
        "landmark_error_model": error_model if isinstance(error_model, dict) else None,
        "encoder": encoders[0] if len(encoders) == 1 else None,
        "encoders": encoders,
        "seeds": {
            "evaluate": params.get("seed"),
            "export_split_salt": manifest.stage_params("export").get("split_salt"),
            "train": manifest.stage_params("train").get("seed"),
        },
        "overrides": dict(record.overrides) if record else {},
        "settings": {
            "fit": fit,
            "export": manifest.stage_params("export"),
            "evaluate": dict(params),
        },
    }


def provenance_section(ctx: Context, prov: dict) -> None:
    em = prov.get("landmark_error_model") or {}
    mm = prov.get("morphable_model") or {}
    rows = [
        {
            "": "morphset version (evaluated / built)",
            "value": f"{prov['morphset_version']} / {prov['built_with_version'] or '–'}",
        },
        {"": "dataset", "value": f"{prov['dataset'] or '–'} ({prov['dataset_root'] or '–'})"},
        {
            "": "backends: detect / landmarks / embed",
            "value": f"{prov['detect_backend']} / {prov['landmark_backend']} / {prov['embed_backend']}",
        },
        {"": "morphable model", "value": f"{mm.get('name', '–')} sha256 {mm.get('sha256', '–')}"},
        {"": "landmark error model", "value": f"{em.get('path', 'none')} sha256 {em.get('sha256', '–')}"},
        *(
            {
                "": "encoder" + (f" ({enc['objective']})" if enc.get("objective") else ""),
                "value": enc["path"]
                + (f" weights sha256 {enc['state_sha256']}" if enc.get("state_sha256") else ""),
            }
            for enc in prov.get("encoders") or [{"path": "none"}]
        ),
        {
            "": "seeds: evaluate / train / export split salt",
            "value": " / ".join(str(prov["seeds"][k]) for k in ("evaluate", "train", "export_split_salt")),
        },
        {
            "": "build overrides",
            "value": ", ".join(f"{k}={v}" for k, v in sorted(prov["overrides"].items())) or "none",
        },
    ]
    ctx.add(
        "provenance",
        rp.Table(rows),
        rp.Paragraph("Every setting: report.json, key provenance.settings.", muted=True),
    )


# --- the whole evaluation ------------------------------------------------------------------------------
def summary_section(ctx: Context, doc: dict) -> None:
    """The headline figures, each with its 95 % interval (subjects drawn with replacement), its
    sample count and the set it was measured on; ``doc["headline"]`` holds the same as data."""
    fq = doc["fit_quality"]
    fitted_on = f"every fitted subject ({fq['subjects_fitted']} subjects, {fq['fitted']} images)"
    head: list[dict] = [
        {"figure": "images fitted", "value": f"{fq['fitted']} / {fq['images']}", "measured_on": "the run"},
    ]
    reasons = fq.get("rejected_by_reason", {})
    if any(k.startswith("identity_") for k in reasons):
        head.append(
            {
                "figure": "identity screening: outliers / ambiguous images",
                "value": f"{reasons.get('identity_outlier', 0)} / {reasons.get('identity_ambiguous', 0)}",
                "measured_on": "the run",
            }
        )
    for p in doc.get("identity_curve", {}).get("points", [])[-1:]:
        for metric, key in (("all vertices", "ratio_all_vertices"), ("Liu 95 mm", "ratio_liu")):
            head.append(
                {
                    "figure": f"fit identity ÷ mean shape at M = {p['m']} ({metric})",
                    "mean": p[key],
                    "ci95": p[f"{key}_ci95"],
                    "n": f"{p['draws']} fits of {p['subjects']} subjects",
                    "measured_on": "every subject with M usable images",
                }
            )
    for name, res in doc.get("verification", {}).get("results", {}).items():
        sm = res.get("summary")
        if not sm:
            continue
        for metric, key in (("accuracy %", "accuracy_pct"), ("AUC", "auc")):
            head.append(
                {
                    "figure": f"verification {metric} ({name})",
                    "mean": sm[key]["mean"],
                    "ci95": sm[key].get("ci95"),
                    "n": f"{res['pairs_used']} pairs of {sm[key].get('n_subjects', '?')} subjects",
                    "measured_on": res.get("measured_on", ""),
                }
            )
    on_of = {"fit": fitted_on}
    if "encoder_split" in doc:
        es = doc["encoder_split"]
        for name in ctx.encoders or ["encoder"]:
            on_of[name] = es.get("measured_on") or f"{es['split']} split ({es['subjects']} subjects)"
    for name, e in doc.get("reconstruction", {}).get("results", {}).items():
        for metric, key in (("Liu error mm", "liu_mean_mm"), ("Genova error mm", "genova_mm")):
            st = e["overall"].get(key, {})
            if st.get("n"):
                head.append(
                    {
                        "figure": f"{metric} ({rp.readable(name)})",
                        "mean": st["mean"],
                        "ci95": st.get("ci95"),
                        "n": f"{st['n']} samples of {st.get('subjects', '?')} subjects",
                        "measured_on": on_of.get(name.split("/")[0], "every subject with ground truth"),
                    }
                )
    doc["headline"] = head
    ctx.add(
        "summary",
        rp.Table(
            [
                {
                    "figure": h["figure"],
                    "value": h.get("value", h.get("mean")),
                    "95% CI": rp.Interval(h.get("ci95")) if "mean" in h else "",
                    "n": h.get("n", ""),
                    "measured on": h["measured_on"],
                }
                for h in head
            ]
        ),
        rp.Paragraph(
            "95% intervals: 1,000 draws of the measured subjects with replacement (a subject's images "
            "and pairs go together). Encoder figures are measured on the subjects held out of its "
            "training; fit figures on every subject of the run.",
            muted=True,
        ),
    )


@dataclass
class Evaluation:
    """Everything measured, as data: the report document, per-section blocks and figures (rendered
    by :mod:`.report`), the per-sample rows and the generated pairs."""

    doc: dict
    blocks: dict[str, list[rp.Block]]
    figures: dict[str, rp.FigureData]
    samples: list[dict] | None = None
    generated_pairs: list[PairSet] = field(default_factory=list)


def evaluate_run(
    run_root: str,
    manifest: Manifest,
    params: dict,
    storage_options: dict | None = None,
    progress: Callable[[str], None] = log.info,
) -> Path | str:
    """Evaluate a run and write ``RUN/eval/``; returns the path of ``report.html`` (a run at an
    fsspec URL gets its report there too: written to a local temporary folder, then copied, and
    the returned path is the URL)."""
    import tempfile

    fs, root = fsspec.core.url_to_fs(run_root, **(storage_options or {}))
    ev = compute_evaluation(run_root, manifest, params, storage_options, progress)
    if isinstance(fs, LocalFileSystem):
        return _write_evaluation(Path(root) / "eval", ev)
    with tempfile.TemporaryDirectory(prefix="morphset-eval-") as tmp:
        page = _write_evaluation(Path(tmp) / "eval", ev)
        target = f"{root.rstrip('/')}/eval"
        fs.makedirs(target, exist_ok=True)
        for f in sorted(page.parent.iterdir()):
            fs.put_file(str(f), f"{target}/{f.name}")
    return f"{run_root.rstrip('/')}/eval/{page.name}"


def _write_evaluation(out_dir: Path, ev: Evaluation) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    for ps in ev.generated_pairs:
        write_csv_pairs(ps.pairs, out_dir / (ps.file or f"pairs-{ps.key}.csv"))
    if ev.samples is not None:
        buf = io.BytesIO()
        pq.write_table(from_rows(ev.samples, load_schema("evaluation")), buf)
        atomic_write(out_dir / "samples.parquet", buf.getvalue())
    return rp.write_report(out_dir, ev.doc, ev.figures, ev.blocks)


def encoder_paths(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``stages.evaluate.encoder``: one trained encoder, several (a list: compared side by side), or none."""
    if not value:
        return []
    paths = [value] if isinstance(value, str) else [str(v) for v in value]
    seen = [p for i, p in enumerate(paths) if p in paths[:i]]
    if seen:
        raise ValueError(f"stages.evaluate.encoder: {seen[0]} is given twice")
    return paths


def encoder_names(encoders: dict[str, Any]) -> list[str]:
    """Source names of trained encoders (path -> TrainedEncoder): ``encoder`` for one; beside
    others, ``encoder <objective>`` (the training objective its export records, else the folder's
    name), with the folder's name added where two share an objective."""
    if len(encoders) == 1:
        return ["encoder"]
    labels = [str(e.config.get("objective") or Path(p).name) for p, e in encoders.items()]
    return [
        f"encoder {label}" + (f" ({Path(p).name})" if labels.count(label) > 1 else "")
        for label, p in zip(labels, encoders, strict=True)
    ]


def compute_evaluation(
    run_root: str,
    manifest: Manifest,
    params: dict,
    storage_options: dict | None = None,
    progress: Callable[[str], None] = log.info,
) -> Evaluation:
    """Measure a run (no files written): fit quality, verification, reconstruction, picture sheet."""
    tables = RunTables(run_root, manifest, storage_options)
    fits = load_fits(tables)
    model, why = load_model(manifest)
    ctx = Context(run_root, params, fits, model, {}, storage_options, tables)
    if why:
        ctx.notes.append(why)
    fit_sha = fits_model_sha256(tables)
    if model is not None and fit_sha and fit_sha != model.sha256:
        raise ValueError(
            f"{tables.store('fits').folder} was fitted with morphable model sha256 {fit_sha[:12]}…, the manifest resolves "
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
    file_pairs = read_pair_file(ctx) if params.get("pairs") else None
    pair_sets: list[PairSet] = []
    fit_sources = ["fit α_id"]
    if file_pairs is None:
        good = ctx.fitted
        fit_on = f"every fitted subject ({len(set(good['subject']))} subjects, {len(good)} images)"
        fit_pairs = generated_pairs(ctx, list(good["image_id"]), list(good["subject"]), fit_on)
        if fit_pairs is not None:
            pair_sets.append(PairSet("fit", fit_pairs, True, fit_on, fit_sources, "pairs.csv"))

    encoder_feats: dict[str, tuple[list[str], dict[str, np.ndarray]]] = {}
    paths = encoder_paths(params.get("encoder"))
    if paths:
        from pipeline.train.inference import load_encoder

        loaded = {path: load_encoder(path) for path in paths}
        for path, encoder in loaded.items():
            if model is not None and encoder.model_sha256 != model.sha256:
                raise ValueError(
                    f"{path}: encoder was trained with morphable model {encoder.model_sha256[:12]}…, "
                    f"this run uses {model.sha256[:12]}…"
                )
            encoder.batch_size = params["batch_size"]
        ctx.encoders = dict(zip(encoder_names(loaded), loaded.values(), strict=True))
        encoder_sources = [f"{name} {feature}" for name in ctx.encoders for feature in ("c_id", "α_id")]
        split = ctx.params.get("encoder_split", "val")
        splits = {"val"} if split == "val" else None
        item_ids, item_subjects = load_export_items(tables, splits)
        if split == "val" and not item_ids:
            ctx.notes.append(
                "the export has no validation split: the encoder is evaluated on the subjects it was trained on"
            )
            split, splits = "all", None
            item_ids, item_subjects = load_export_items(tables)
        encoder_on = (
            f"the validation split ({len(set(item_subjects))} subjects held out of training, "
            f"{len(item_ids)} images)"
            if split == "val"
            else f"every exported image ({len(set(item_subjects))} subjects, {len(item_ids)} images)"
        )
        if file_pairs is None and item_ids:
            enc_pairs = generated_pairs(ctx, item_ids, item_subjects, encoder_on)
            if enc_pairs is not None:
                pair_sets.append(
                    PairSet("encoder", enc_pairs, True, encoder_on, encoder_sources, f"pairs-{split}.csv")
                )
        progress("encoder: decoding crops")
        needed = needed_images(ctx, [ps.pairs for ps in pair_sets] + [file_pairs], truth)
        ids, subj, crops = load_export_crops(tables, needed, splits)
        doc["encoder_split"] = {
            "split": split,
            "images": len(item_ids),
            "subjects": len(set(item_subjects)),
            "images_decoded": len(ids),
            "measured_on": encoder_on,
            "note": "encoder figures: "
            + (
                "validation subjects only (held out of training)"
                if split == "val"
                else "every exported image"
            )
            + "; fit figures: every subject of the run",
        }
        ctx.notes.append(
            f"encoder figures are measured on {encoder_on}; fit figures on every subject of the run"
        )
        if not ids:
            ctx.notes.append(f"{run_root}/export has no committed shards: encoder predictions skipped")
            ctx.encoders = {}
        else:
            ctx.crops = dict(zip(ids, crops, strict=True))
            row_of = ctx.fits.index_of("image_id")
            subj = np.array([str(ctx.fits["subject"][row_of[i]]) if i in row_of else i for i in ids])
            for name, encoder in ctx.encoders.items():
                progress(f"{name}: embedding {len(ids)} crops")
                feats = encoder.embed(crops)
                encoder_feats[name] = (ids, feats)
                if model is not None:
                    shapes = identity_vertices(model, feats["alpha_id"], vertex_subset(model))
                    ic = identity_consistency(subj, shapes)
                    key = "identity_consistency_encoder" + ("" if name == "encoder" else f" {name[8:]}")
                    doc["fit_quality"][key] = ic
                    ctx.add("fit-quality", rp.Table([{"source": f"{name} α_id", **ic}]))
    else:
        encoder_sources = ["encoder c_id", "encoder α_id"]
        ctx.notes.append(
            "no trained encoder given (--encoder): encoder predictions and c_id verification skipped"
        )
    if file_pairs is not None:
        on = "the pairs' images"
        pair_sets.append(PairSet("file", file_pairs, False, on, fit_sources + encoder_sources))

    progress("verification")
    if pair_sets:
        doc["verification"] = verification_section(ctx, pair_sets, feature_sources(ctx, encoder_feats))

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

    doc["encoders"] = encoders_section(ctx, doc, samples)
    doc["provenance"] = provenance(run_root, manifest, params, model, storage_options)
    provenance_section(ctx, doc["provenance"])
    progress("picture sheet")
    doc["picture_sheet"] = sheet_section(ctx, truth)
    summary_section(ctx, doc)
    doc["notes"] = ctx.notes
    ctx.add("notes", *([rp.Paragraph(n) for n in ctx.notes] or [rp.Paragraph("none")]))
    return Evaluation(doc, ctx.blocks, ctx.figures, samples, [ps for ps in pair_sets if ps.generated])
