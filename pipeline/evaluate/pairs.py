"""Verification pair lists: LFW ``pairs.txt``, YouTube Faces ``splits.txt``, CSV, and generated pairs.

Every parser returns a :class:`PairList`: two item ids per pair, the same/different label and the
fold (0-based) each pair belongs to. An item id is an ``image_id`` of the run (path relative to the
dataset root) or a directory prefix of image ids (a YouTube Faces video: its frames' features are
averaged, see :func:`pipeline.evaluate.verification.item_features`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LFW_IMAGE_EXT = ".jpg"


class PairsError(ValueError):
    """A pairs file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class PairList:
    a: list[str]
    b: list[str]
    same: np.ndarray  # (n,) bool
    fold: np.ndarray  # (n,) int, 0-based
    source: str = ""

    def __len__(self) -> int:
        return len(self.a)

    @property
    def n_folds(self) -> int:
        return int(self.fold.max()) + 1 if len(self) else 0


def lfw_image_id(name: str, number: int) -> str:
    """``Aaron_Peirsol 1`` -> ``Aaron_Peirsol/Aaron_Peirsol_0001.jpg`` (LFW's file naming)."""
    return f"{name}/{name}_{number:04d}{LFW_IMAGE_EXT}"


def _int(token: str, path: str, lineno: int, what: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise PairsError(f"{path}:{lineno}: {what} must be an integer, got {token!r}") from None
    return value


def parse_lfw_pairs(text: str, path: str = "pairs.txt") -> PairList:
    """Parse LFW's ``pairs.txt``.

    First line ``n_sets n_per_set`` (``10 300`` for View 2; a single number means one set, as in
    ``pairsDevTrain.txt``); then per set ``n_per_set`` matched lines ``name i j`` followed by
    ``n_per_set`` mismatched lines ``name1 i name2 j``. Set k becomes fold k.
    """
    lines = [(i + 1, ln.split()) for i, ln in enumerate(text.splitlines())]
    lines = [(n, toks) for n, toks in lines if toks]
    if not lines:
        raise PairsError(f"{path}: empty pairs file, expected a first line like '10 300'")
    head_no, head = lines[0]
    if len(head) == 1:
        n_sets, n_per = 1, _int(head[0], path, head_no, "pairs per set")
    elif len(head) == 2:
        n_sets = _int(head[0], path, head_no, "number of sets")
        n_per = _int(head[1], path, head_no, "pairs per set")
    else:
        raise PairsError(
            f"{path}:{head_no}: first line must be 'n_sets n_per_set' (e.g. '10 300'), got {head}"
        )
    if n_sets < 1 or n_per < 1:
        raise PairsError(f"{path}:{head_no}: set count and pairs per set must be positive")
    body = lines[1:]
    expected = 2 * n_sets * n_per
    if len(body) != expected:
        raise PairsError(
            f"{path}: header announces {n_sets} sets x (2 x {n_per}) = {expected} pair lines, found {len(body)}"
        )
    a, b, same, fold = [], [], [], []
    for k, (lineno, toks) in enumerate(body):
        set_no, within = divmod(k, 2 * n_per)
        matched = within < n_per
        if matched:
            if len(toks) != 3:
                raise PairsError(
                    f"{path}:{lineno}: set {set_no + 1} expects a matched pair 'name i j' here, got {len(toks)} fields"
                )
            name, i, j = toks[0], _int(toks[1], path, lineno, "i"), _int(toks[2], path, lineno, "j")
            a.append(lfw_image_id(name, i))
            b.append(lfw_image_id(name, j))
        else:
            if len(toks) != 4:
                raise PairsError(
                    f"{path}:{lineno}: set {set_no + 1} expects a mismatched pair 'name1 i name2 j' here, got {len(toks)} fields"
                )
            i, j = _int(toks[1], path, lineno, "i"), _int(toks[3], path, lineno, "j")
            a.append(lfw_image_id(toks[0], i))
            b.append(lfw_image_id(toks[2], j))
        same.append(matched)
        fold.append(set_no)
    return PairList(a, b, np.array(same, bool), np.array(fold, np.int64), path)


def parse_ytf_splits(text: str, path: str = "splits.txt") -> PairList:
    """Parse YouTube Faces' ``splits.txt``: comma-separated
    ``split number, pair number, first video, second video, is same (1/0)[, ...]``.

    Videos are ``name/video_number`` (directories of frames under ``frame_images_DB``); a header line
    (first field not an integer) is skipped. Split s (1-based) becomes fold s-1.
    """
    a, b, same, fold = [], [], [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = [f.strip() for f in line.split(",")]
        if not line.strip():
            continue
        if not fields[0].lstrip("-").isdigit():
            if a:  # a header is only allowed before the first pair
                raise PairsError(f"{path}:{lineno}: split number must be an integer, got {fields[0]!r}")
            continue
        if len(fields) < 5:
            raise PairsError(
                f"{path}:{lineno}: expected 'split, pair, first video, second video, is same', got {len(fields)} fields"
            )
        split = _int(fields[0], path, lineno, "split number")
        label = _int(fields[4], path, lineno, "is same person")
        if split < 1 or label not in (0, 1):
            raise PairsError(
                f"{path}:{lineno}: split must be >= 1 and 'is same' 0 or 1, got {split}, {label}"
            )
        if not fields[2] or not fields[3]:
            raise PairsError(f"{path}:{lineno}: empty video name")
        a.append(fields[2].strip("/"))
        b.append(fields[3].strip("/"))
        same.append(bool(label))
        fold.append(split - 1)
    if not a:
        raise PairsError(f"{path}: no pairs found")
    return PairList(a, b, np.array(same, bool), np.array(fold, np.int64), path)


_TRUE = {"1", "true", "same", "yes", "match", "matched", "genuine"}
_FALSE = {"0", "false", "different", "diff", "no", "mismatch", "mismatched", "impostor"}


def parse_csv_pairs(text: str, path: str = "pairs.csv", n_folds: int = 10) -> PairList:
    """CSV with a header: columns ``a``, ``b``, ``same`` (1/0, same/different, true/false) and an
    optional ``fold`` (0-based integer). Without ``fold`` pairs are dealt round-robin into ``n_folds``."""
    reader = csv.DictReader(text.splitlines())
    cols = {c.strip().lower() for c in (reader.fieldnames or [])}
    missing = {"a", "b", "same"} - cols
    if missing:
        raise PairsError(
            f"{path}:1: CSV header must name columns a, b, same (and optionally fold); missing {sorted(missing)}"
        )
    a, b, same, fold = [], [], [], []
    for k, row in enumerate(reader):
        lineno = k + 2
        row = {(key or "").strip().lower(): (v or "").strip() for key, v in row.items()}
        lab = row["same"].lower()
        if lab in _TRUE:
            same.append(True)
        elif lab in _FALSE:
            same.append(False)
        else:
            raise PairsError(
                f"{path}:{lineno}: column 'same' must be 1/0 or same/different, got {row['same']!r}"
            )
        if not row["a"] or not row["b"]:
            raise PairsError(f"{path}:{lineno}: empty item id in column a or b")
        a.append(row["a"])
        b.append(row["b"])
        if "fold" in cols:
            f = _int(row["fold"], path, lineno, "fold")
            if f < 0:
                raise PairsError(f"{path}:{lineno}: fold must be >= 0, got {f}")
            fold.append(f)
        else:
            fold.append(k % n_folds)
    if not a:
        raise PairsError(f"{path}: no pairs found")
    return PairList(a, b, np.array(same, bool), np.array(fold, np.int64), path)


def read_pairs(path: str | Path, n_folds: int = 10) -> PairList:
    """Parse a pairs file, choosing the format from its name and first line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: pairs file not found")
    text = p.read_text(encoding="utf-8-sig")
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if p.suffix.lower() == ".csv":
        return parse_csv_pairs(text, str(p), n_folds)
    if "," in first:
        return parse_ytf_splits(text, str(p))
    return parse_lfw_pairs(text, str(p))


def generate_pairs(
    items_by_subject: dict[str, list[str]], n_folds: int = 10, pairs_per_fold: int = 30, seed: int = 0
) -> PairList:
    """Deterministic balanced pairs in the LFW style: each fold holds up to ``pairs_per_fold``
    matched and as many mismatched pairs, no pair twice. Subjects are split across folds (as in LFW
    View 2, a subject appears in one fold only) whenever there are at least as many eligible subjects
    as folds; with fewer, folds share subjects (never pairs). A few subjects have few distinct pairs:
    a fold then holds fewer (the caller decides whether what is left measures anything)."""
    subjects = sorted(s for s, items in items_by_subject.items() if items)
    multi = [s for s in subjects if len(items_by_subject[s]) >= 2]
    if len(multi) < 1 or len(subjects) < 2:
        raise ValueError(
            "cannot generate verification pairs: need at least one subject with 2 images and 2 subjects"
        )
    rng = np.random.default_rng(seed)
    # subjects -> folds round-robin (multi-image subjects dealt separately so every fold can form
    # matched pairs); falls back to sharing all subjects between folds when there are too few
    order_multi = [str(s) for s in rng.permutation(multi)]
    order_single = [str(s) for s in rng.permutation(sorted(set(subjects) - set(multi)))]
    disjoint = len(multi) >= n_folds and len(subjects) >= 2 * n_folds
    if disjoint:
        fold_subjects = [order_multi[k::n_folds] + order_single[k::n_folds] for k in range(n_folds)]
    else:
        fold_subjects = [order_multi + order_single] * n_folds
    seen: set[tuple[str, str]] = set()

    def draw(subs: list[str], matched: bool, n: int) -> list[tuple[str, str]]:
        """Up to n distinct pairs never drawn before (rejection of repeats, bounded where few exist)."""
        subs_multi = [s for s in subs if len(items_by_subject[s]) >= 2]
        out: list[tuple[str, str]] = []
        for _ in range(20 * n):
            if len(out) == n:
                break
            if matched:
                items = items_by_subject[subs_multi[rng.integers(len(subs_multi))]]
                i, j = rng.choice(len(items), size=2, replace=False)
                x, y = items[i], items[j]
            else:
                s1, s2 = rng.choice(len(subs), size=2, replace=False)
                l1, l2 = items_by_subject[subs[s1]], items_by_subject[subs[s2]]
                x, y = l1[rng.integers(len(l1))], l2[rng.integers(len(l2))]
            key = (x, y) if x <= y else (y, x)
            if key not in seen:
                seen.add(key)
                out.append((x, y))
        return out

    if disjoint:
        folds = [(draw(fs, True, pairs_per_fold), draw(fs, False, pairs_per_fold)) for fs in fold_subjects]
    else:
        # folds share subjects: draw both classes from all of them, as many different pairs as
        # same ones, and deal them round-robin so every fold holds both classes
        matched = draw(fold_subjects[0], True, n_folds * pairs_per_fold)
        mismatched = draw(fold_subjects[0], False, len(matched))
        matched = matched[: len(mismatched)]
        folds = [(matched[k::n_folds], mismatched[k::n_folds]) for k in range(n_folds)]
    a, b, same, fold = [], [], [], []
    for k, (m, d) in enumerate(folds):
        for pairs, label in ((m, True), (d, False)):
            for x, y in pairs:
                a.append(x)
                b.append(y)
                same.append(label)
                fold.append(k)
    return PairList(a, b, np.array(same, bool), np.array(fold, np.int64), "generated")


def write_csv_pairs(pairs: PairList, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "same", "fold"])
        for x, y, s, k in zip(pairs.a, pairs.b, pairs.same, pairs.fold, strict=True):
            w.writerow([x, y, int(s), int(k)])
