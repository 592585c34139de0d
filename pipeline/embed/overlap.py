"""Identities shared by two runs: training subjects whose embedding centre lies within a distance
of an evaluation subject's (CASIA-WebFace and LFW share people; training on them inflates the
verification figures). The list is a CSV that ``morphset export --exclude-subjects`` takes.

Centres are those of the fit's identity screening (:mod:`pipeline.embed.identity`, each run's own
``stages.fit.identity_*`` parameters): outliers do not move them and ambiguous subjects have none
(they are counted, not listed).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.distance import cdist

from pipeline.core.tables import RunTables
from pipeline.embed.identity import ScreenParams, embedding_matrix, screen_identities
from pipeline.errors import MorphsetError
from pipeline.storage.atomic import atomic_write

CSV_COLUMNS = ("train_subject", "eval_subject", "distance", "train_images", "eval_images")


class NoEmbeddings(MorphsetError):
    """A run has no committed embeddings to compare."""


@dataclass
class SubjectCentres:
    run: str
    names: list[str]
    centres: np.ndarray  # (K, dim)
    images: dict[str, int]  # embedded images per subject
    without_centre: list[str] = field(default_factory=list)  # no embedding, or ambiguous


def subject_centres(tables: RunTables, screening: ScreenParams) -> SubjectCentres:
    """Every subject's embedding centre over the run's committed embeddings."""
    run = tables.run
    shards = tables.shards("embeddings")
    subjects: list[str] = []
    blocks: list[np.ndarray] = []
    for shard in shards:
        t = tables.read("embeddings", shard, columns=["subject", "embedding"])
        subjects.extend(t.column("subject").to_pylist())
        blocks.append(embedding_matrix(t.column("embedding"), t.num_rows))
    dims = {b.shape[1] for b in blocks if b.shape[1]}
    if not dims:
        raise NoEmbeddings(
            f"{run.url}: no face embeddings ({len(shards)} embed shards"
            + (", all disabled" if shards else "")
            + "); build it with --set stages.embed.enabled=true"
        )
    if len(dims) > 1:
        raise NoEmbeddings(f"{run.url}: embed shards of different lengths {sorted(dims)}; rebuild embed")
    dim = dims.pop()
    emb = np.concatenate([b if b.shape[1] else np.full((len(b), dim), np.nan) for b in blocks])
    names = np.asarray(subjects, dtype=object)
    _, centres = screen_identities(names, emb, screening)
    have = np.all(np.isfinite(emb), axis=1)
    images: dict[str, int] = {}
    for s in names[have]:
        images[s] = images.get(s, 0) + 1
    ordered = sorted(centres)
    return SubjectCentres(
        run=run.url,
        names=ordered,
        centres=np.stack([centres[s] for s in ordered]) if ordered else np.zeros((0, dim)),
        images=images,
        without_centre=sorted(set(subjects) - set(ordered)),
    )


@dataclass
class Overlap:
    pairs: list[
        dict
    ]  # one per (train, eval) subject pair within the threshold, nearest first per train subject
    threshold: float
    train: SubjectCentres
    eval: SubjectCentres

    @property
    def train_subjects(self) -> list[str]:
        return sorted({p["train_subject"] for p in self.pairs})

    def summary(self) -> dict:
        return {
            "threshold": self.threshold,
            "train_run": self.train.run,
            "eval_run": self.eval.run,
            "train_subjects": len(self.train.names),
            "eval_subjects": len(self.eval.names),
            "train_subjects_without_centre": len(self.train.without_centre),
            "eval_subjects_without_centre": len(self.eval.without_centre),
            "pairs": len(self.pairs),
            "shared_train_subjects": len(self.train_subjects),
        }


def find_overlap(train: SubjectCentres, evaluation: SubjectCentres, threshold: float) -> Overlap:
    if train.centres.shape[1] != evaluation.centres.shape[1] and len(train.names) and len(evaluation.names):
        raise NoEmbeddings(
            f"{train.run} and {evaluation.run} have embeddings of different lengths "
            f"({train.centres.shape[1]} vs {evaluation.centres.shape[1]}): built with different backends"
        )
    pairs: list[dict] = []
    if len(train.names) and len(evaluation.names):
        d = cdist(train.centres, evaluation.centres)
        for i, j in zip(*np.nonzero(d <= threshold), strict=True):
            pairs.append(
                {
                    "train_subject": train.names[i],
                    "eval_subject": evaluation.names[j],
                    "distance": round(float(d[i, j]), 4),
                    "train_images": train.images.get(train.names[i], 0),
                    "eval_images": evaluation.images.get(evaluation.names[j], 0),
                }
            )
    pairs.sort(key=lambda p: (p["train_subject"], p["distance"], p["eval_subject"]))
    return Overlap(pairs, threshold, train, evaluation)


def write_csv(overlap: Overlap, path: str) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(overlap.pairs)
    atomic_write(path, buf.getvalue().encode())
