"""One decode per image: the pixel stages of a shard share one task and its decoded images.

detect → landmarks → embed → crop run as one task per shard (pipeline.core.runner.fuse), handing the
decoded pixels on in memory; each stage still commits its own shard. The output must be the
same bytes as when every stage decodes for itself, a failure inside the task must block only
what follows it, and report.json must say how many decodes the build did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import api
from pipeline.imaging.decode import DecodedImages

SUBJECTS, IMAGES = 4, 3
EMBED_ON = {"stages.embed.enabled": True}


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pixels") / "faces"
    api.synth(out, subjects=SUBJECTS, images_per_subject=IMAGES, seed=5, workers=1)
    return out


def _build(run: Path, faces: Path, overrides: dict | None = None, until: str | None = None) -> dict:
    return api.build(
        run,
        "synthetic",
        root=str(faces),
        until=until,
        overrides={**EMBED_ON, **(overrides or {})},
        scheduler="sync",
        progress=False,
        landmarks="dlib",
        shard_size=6,
    )


def _stage_bytes(run: Path, stage: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / stage).glob("**/*.parquet"))}


def test_each_image_is_decoded_once_and_the_output_is_that_of_a_decode_per_stage(faces, tmp_path):
    shared = _build(tmp_path / "shared", faces)
    n = SUBJECTS * IMAGES
    got = {s: shared.stages[s].decodes for s in ("detect", "landmarks", "embed", "crop", "fit", "export")}
    assert got == {"detect": n, "landmarks": 0, "embed": 0, "crop": 0, "fit": None, "export": None}
    assert shared.decodes_per_image == 1.0 and shared.to_dict()["decodes_per_image"] == 1.0
    alone = _build(tmp_path / "alone", faces, {"execution.decoded_images_mib": 0})
    assert all(alone.stages[s].decodes > 0 for s in ("landmarks", "embed", "crop"))
    assert alone.decodes_per_image > 3
    for stage in ("detect", "landmarks", "embed", "crop", "fit", "export"):
        a, b = _stage_bytes(tmp_path / "shared", stage), _stage_bytes(tmp_path / "alone", stage)
        assert a and a == b, stage


def test_a_failing_stage_in_the_shared_task_blocks_only_what_follows(faces, tmp_path, monkeypatch):
    from pipeline.landmarks.stage import LandmarksStage

    def broken(self, inputs, ctx):
        raise RuntimeError("landmarks broke on purpose")

    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(LandmarksStage, "run", broken)
        broke = _build(run, faces, until="fit")
    assert sorted(broke.failed_shards) == ["landmarks/00000", "landmarks/00001"]
    assert "landmarks broke on purpose" in broke.stages["landmarks"].errors[0]
    assert (broke.stages["detect"].computed, broke.stages["embed"].blocked, broke.stages["fit"].blocked) == (
        2,
        2,
        2,
    )
    status = api.status(run)
    assert status["detect"]["done"] == status["detect"]["shards"] == 2  # committed before the failure
    assert status["landmarks"]["failed"] == 2 and status["embed"]["done"] == 0
    report = _build(run, faces)  # mended: resumes after detect, which is not redone
    assert report.ok and report.stages["detect"].computed == 0
    # detect's pixels are gone: landmarks decodes again every image detect found a face in
    import pyarrow.dataset as ds

    found = ds.dataset(sorted(str(p) for p in (run / "detect").glob("**/*.parquet")), format="parquet")
    with_face = found.to_table(columns=["failure_reason"]).column("failure_reason").null_count
    assert with_face >= SUBJECTS * IMAGES - 2
    assert report.stages["landmarks"].decodes == with_face
    assert report.stages["embed"].decodes == report.stages["crop"].decodes == 0


def test_the_store_keeps_a_prefix_within_its_budget(tmp_path):
    import cv2

    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), np.full((100, 100, 3), 40 * i, np.uint8))
        paths.append(str(p))
    images = DecodedImages(budget_bytes=2 * 100 * 100 * 3)  # room for two
    first = [images.read(p).image for p in paths]
    assert images.decodes == 4 and images.kept_bytes == 2 * 30_000
    again = [images.read(p).image for p in paths]
    assert images.decodes == 6  # the first two were kept, the last two decoded again
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not images.read(str(tmp_path / "missing.png")).ok
    assert not images.read(str(tmp_path / "missing.png")).ok and images.decodes == 8  # failures not kept
    changed = images.read(paths[0], size=(100, 90))  # an earlier stage read it at another size
    assert changed.reason == "image_changed" and "100x100" in changed.detail
    assert images.read(paths[0], size=(100, 100)).ok


def test_progress_moves_within_a_shard(faces, tmp_path, monkeypatch, capsys):
    """Detect and landmarks report rows as they finish batches, so a bar moves inside a shard
    (it moved once per 2,000-image shard); bars count images."""
    import re
    import sys

    from pipeline.core import runner

    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.0)
    events: list[tuple[str, int, int]] = []
    executor = runner.SyncExecutor()
    executor.on_progress(lambda stage, shard, n: events.append((stage, shard, n)))
    try:
        _build(tmp_path / "run", faces, {"stages.detect.batch_size": 1, "stages.landmarks.batch_size": 1})
    finally:
        executor.on_progress(None)
    for stage in ("detect", "landmarks", "embed"):
        for shard in (0, 1):
            mine = [n for s, i, n in events if (s, i) == (stage, shard)]
            assert sum(mine) == 6, (stage, shard, mine)  # every row once
            # detect decides rows every 4 batches (4 images here): twice in a 6-image shard;
            # landmarks works in chunks of at least 8, one for this shard
            assert len(mine) >= (2 if stage == "detect" else 1), (stage, shard, mine)

    # a terminal's bars: images of the shards computed, reaching the total
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    api.build(
        tmp_path / "run2", "synthetic", root=str(faces), overrides=EMBED_ON, scheduler="sync",
        progress=True, landmarks="dlib", shard_size=6, until="landmarks",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert re.search(r"detect: 100%.*\b12/12 \[", err), err[-2000:]
    assert re.search(r"landmarks: 100%.*\b12/12 \[", err), err[-2000:]
