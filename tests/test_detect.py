"""MTCNN detection stage: batching, primary-face choice, real photos, a bad-image corpus."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config.manifest import load_manifest
from pipeline.config.schemas import load_schema
from pipeline.core.runner import stage_context
from pipeline.detect.base import FaceDetector
from pipeline.detect.stage import (
    Faces,
    choose_primary,
    detect_images,
    filter_faces,
    get_detector,
    parse_mtcnn_output,
    plan_batches,
    run_shard,
)
from pipeline.imaging.decode import read_image

IMAGE_EXT = {".png", ".jpg", ".jpeg"}


def images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXT)


def index_table(paths: list[Path], reasons: dict[int, str] | None = None) -> pa.Table:
    rows = []
    subjects = sorted({p.parent.name for p in paths})
    for i, p in enumerate(paths):
        rows.append(
            {
                "image_id": f"{p.parent.name}/{p.name}",
                "subject": p.parent.name,
                "label": subjects.index(p.parent.name),
                "uri": str(p),
                "size_bytes": p.stat().st_size if p.exists() else None,
                "failure_reason": (reasons or {}).get(i),
            }
        )
    from pipeline.config.schemas import from_rows

    return from_rows(rows, load_schema("index"))


def ctx_for(stage: str, manifest=None, **over):
    m = manifest or load_manifest(overrides={f"stages.{stage}.{k}": v for k, v in over.items()} or None)
    return stage_context(m, stage)


# --- pure helpers (no TensorFlow) --------------------------------------------------------------
def test_plan_batches_groups_similar_sizes_and_respects_batch_size():
    shapes = [(250, 250)] * 5 + [(1000, 800)] * 3 + [(252, 250)]
    plan = plan_batches(shapes, batch_size=4, max_pad_ratio=1.3)
    assert sorted(i for b in plan for i in b) == list(range(len(shapes)))
    assert all(len(b) <= 4 for b in plan)
    for b in plan:
        areas = [shapes[i][0] * shapes[i][1] for i in b]
        hmax = max(shapes[i][0] for i in b)
        wmax = max(shapes[i][1] for i in b)
        assert hmax * wmax <= 1.3 * min(areas)  # small and large images never share a call
    assert len(plan) == 3  # 6 small ones in 4 + 2, the 3 large ones together


def test_plan_batches_caps_padded_pixels():
    plan = plan_batches([(1000, 1000)] * 10, batch_size=32, max_pad_ratio=2, max_batch_pixels=3_000_000)
    assert [len(b) for b in plan] == [3, 3, 3, 1]


def test_parse_output_splits_per_image_clips_and_rescales():
    # image 0: one face partly outside the left edge; image 1: none; image 2: two faces
    rows = np.array(
        [
            [0, -5, 10, 50, 60, 0.99, 10, 30, 20, 15, 25, 20, 21, 30, 40, 41],
            [2, 10, 10, 30, 30, 0.95, 12, 18, 15, 13, 17, 14, 14, 20, 25, 25],
            [2, 40, 40, 90, 90, 0.80, 50, 70, 60, 55, 65, 50, 50, 60, 70, 70],
        ],
        dtype=np.float64,
    )
    faces = parse_mtcnn_output(rows, 3, [(100, 100)] * 3, [1.0, 1.0, 0.5])
    assert [len(f) for f in faces] == [1, 0, 2]
    np.testing.assert_allclose(faces[0].boxes[0], [0, 10, 50, 60])
    # points interleaved x, y: left eye (10, 20), right eye (30, 21)
    np.testing.assert_allclose(faces[0].points[0][:4], [10, 20, 30, 21])
    np.testing.assert_allclose(faces[2].boxes[1], [80, 80, 180, 180])  # / scale 0.5
    # a border offset is removed before clipping
    shifted = parse_mtcnn_output(
        rows[:1] + [0, 7, 7, 7, 7, 0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7], 1, [(100, 100)], [1.0], [7]
    )
    np.testing.assert_allclose(shifted[0].boxes, faces[0].boxes)
    np.testing.assert_allclose(shifted[0].points, faces[0].points)
    assert parse_mtcnn_output(np.empty((0, 16)), 2, [(9, 9)] * 2, [1, 1])[1].boxes.shape == (0, 4)


def test_filter_faces_by_size_and_score():
    f = Faces(
        np.array([[0, 0, 10, 40], [0, 0, 40, 40], [0, 0, 50, 50]], np.float32),
        np.array([0.99, 0.5, 0.95], np.float32),
        np.zeros((3, 10), np.float32),
    )
    kept = filter_faces(f, min_face_px=20, min_score=0.9)
    np.testing.assert_array_equal(kept.scores, np.array([0.95], np.float32))


def test_choose_primary_rules():
    w = h = 200
    boxes = np.array(
        [[80, 80, 120, 120], [0, 0, 60, 60], [130, 10, 200, 80]], np.float64
    )  # centre, corner, big
    scores = np.array([0.95, 0.999, 0.99])
    assert choose_primary(boxes, scores, w, h, "center_score") == 0  # near the centre wins a small score gap
    assert choose_primary(boxes, scores, w, h, "score") == 1
    assert choose_primary(boxes, scores, w, h, "largest") == 2
    assert choose_primary(boxes, scores, w, h, "center") == 0
    assert choose_primary(boxes, scores, w, h, "center_score", center_weight=0.0) == 1
    # only the corner face, limited to central faces -> none
    assert choose_primary(boxes[1:2], scores[1:2], w, h, "center_score", max_center_distance=0.5) is None
    assert choose_primary(boxes[1:2], scores[1:2], w, h, "center_score") == 0
    assert choose_primary(np.zeros((0, 4)), np.zeros(0), w, h, "score") is None
    with pytest.raises(ValueError, match="primary_rule"):
        choose_primary(boxes, scores, w, h, "biggest")


# --- with MTCNN (TensorFlow; one detector per test process) -------------------------------------
@pytest.fixture(scope="module")
def detector():
    return get_detector()


@pytest.fixture(scope="module")
def params():
    return load_manifest().stage_params("detect")


def test_detects_faces_in_real_photos(detector, faces_dir, people_dir):
    paths = images_under(faces_dir) + images_under(people_dir)
    assert len(paths) >= 45
    out = run_shard({"index": index_table(paths)}, ctx_for("detect"))
    assert out.schema.equals(load_schema("detections").arrow, check_metadata=False)
    assert out.num_rows == len(paths)
    assert out.column("image_id").to_pylist() == [f"{p.parent.name}/{p.name}" for p in paths]
    rows = out.to_pylist()
    found = [r for r in rows if r["failure_reason"] is None]
    assert len(found) >= 0.95 * len(paths), [(r["image_id"], r["failure_reason"]) for r in rows]
    for r in found:
        x0, y0, x1, y1 = r["primary_box"]
        assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]
        pts = np.asarray(r["primary_points"]).reshape(5, 2)
        assert pts[0, 0] < pts[1, 0]  # left eye left of right eye (as seen)
        assert max(pts[0, 1], pts[1, 1]) < pts[2, 1] < min(pts[3, 1], pts[4, 1])  # eyes, nose, mouth
        assert r["primary_score"] >= 0.9 and r["face_count"] >= 1


def test_batched_detection_equals_single_calls(detector, params, faces_dir):
    paths = images_under(faces_dir)[:8]
    images = [read_image(str(p)).unwrap() for p in paths]
    batched = detect_images(detector, images, {**params, "batch_size": 8, "retry_pad": None})
    single = detect_images(detector, images, {**params, "batch_size": 1, "retry_pad": None})
    for b, s in zip(batched, single, strict=True):
        assert len(b) == len(s)
        np.testing.assert_allclose(b.boxes, s.boxes, atol=0.5)
        np.testing.assert_allclose(b.points, s.points, atol=0.5)


def test_mixed_sizes_and_downscaling_map_back_to_full_resolution(detector, params, people_dir):
    path = images_under(people_dir)[0]
    img = read_image(str(path)).unwrap()
    full = detect_images(detector, [img], {**params, "max_side": None})[0]
    small = detect_images(detector, [img], {**params, "max_side": 512})[0]
    tiny = np.full((60, 80, 3), 128, np.uint8)  # padded into the same call, has no face
    mixed = detect_images(detector, [tiny, img], {**params, "max_side": 512, "max_pad_ratio": 1000.0})
    assert len(full) >= 1 and len(small) >= 1 and len(mixed[0]) == 0
    i_full = int(np.argmax(full.scores))
    i_small = int(np.argmax(small.scores))
    side = full.boxes[i_full][2] - full.boxes[i_full][0]
    # the same face, in full-resolution pixels, within a few percent of its size
    assert np.abs(small.boxes[i_small] - full.boxes[i_full]).max() < 0.08 * side
    np.testing.assert_allclose(mixed[1].boxes, small.boxes, atol=1.0)


def test_bad_image_corpus_one_reason_per_file_no_crash(detector, tmp_path, faces_dir):
    good_src = images_under(faces_dir)[0]
    blank = io.BytesIO()
    Image.new("RGB", (120, 100), (128, 128, 128)).save(blank, format="PNG")
    jpeg = io.BytesIO()
    Image.open(good_src).convert("RGB").save(jpeg, format="JPEG", quality=90)
    corpus = {
        "good.png": (good_src.read_bytes(), None),
        "empty.jpg": (b"", "empty_file"),
        "notes.jpg": (b"hello, I am a text file\n", "not_an_image"),
        "cut.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 3], "truncated"),
        "huge.png": (None, "too_many_pixels"),
        "blank.png": (blank.getvalue(), "no_face"),
        "tiny.png": (None, "no_face"),
        "gone.jpg": (None, "missing"),
        "skipped.jpg": (good_src.read_bytes(), "unreadable"),  # reason given by the index
    }
    paths = []
    for name, (data, _) in corpus.items():
        p = tmp_path / "subject" / name
        p.parent.mkdir(exist_ok=True)
        if name == "huge.png":
            Image.new("RGB", (3000, 2000)).save(p)  # over the limit set below
        elif name == "tiny.png":
            Image.new("RGB", (8, 6), (200, 150, 120)).save(p)
        elif data is not None:
            p.write_bytes(data)
        paths.append(p)
    index = index_table(paths, reasons={len(paths) - 1: "unreadable"})
    m = load_manifest(overrides={"stages.decode.max_pixels": 5_000_000})
    out = run_shard({"index": index}, ctx_for("detect", m)).to_pylist()
    got = {Path(r["image_id"]).name: r["failure_reason"] for r in out}
    assert got == {name: reason for name, (_, reason) in corpus.items()}
    assert [Path(r["image_id"]).name for r in out] == list(corpus)


class StubDetector(FaceDetector):
    """Stands in for MTCNN: one face at a fixed place in every image that is not 'poisoned'.

    A poisoned image (pixel [0, 0] == 255) makes any list containing it raise; an image smaller
    than ``needs_side`` (in both dimensions) yields no face, as MTCNN does for faces filling the frame.
    """

    def __init__(self, needs_side: int = 0):
        self.calls: list[int] = []
        self.needs_side = needs_side

    def raw(self, images, params):
        self.calls.append(len(images))
        images = [np.asarray(im, dtype=np.float32) for im in images]
        rows = []
        for k, im in enumerate(images):
            assert im.dtype == np.float32
            if im[0, 0, 0] == 255:
                raise ValueError("poisoned")
            h, w = im.shape[:2]
            if min(h, w) < self.needs_side:
                continue
            x0, y0 = w / 2 - 20, h / 2 - 20
            pts = [
                w / 2 - 8,
                w / 2 + 8,
                w / 2,
                w / 2 - 6,
                w / 2 + 6,
                h / 2 - 5,
                h / 2 - 5,
                h / 2 + 2,
                h / 2 + 10,
                h / 2 + 10,
            ]
            rows.append([k, x0, y0, x0 + 40, y0 + 40, 0.99, *pts])
        return np.array(rows, dtype=np.float64).reshape(-1, 16)


def test_one_failing_image_does_not_fail_its_batch(params):
    images = [np.full((100, 100, 3), 80, np.uint8) for _ in range(5)]
    images[2][0, 0] = 255
    stub = StubDetector()
    out = detect_images(stub, images, {**params, "batch_size": 8, "retry_pad": None})
    assert isinstance(out[2], str) and "poisoned" in out[2]
    assert all(len(out[i]) == 1 for i in (0, 1, 3, 4))
    assert stub.calls == [5, 1, 1, 1, 1, 1]  # the batch, then one by one
    np.testing.assert_allclose(out[0].boxes[0], [30, 30, 70, 70])


def test_bordered_retry_maps_back_to_image_pixels(params):
    img = np.full((100, 120, 3), 80, np.uint8)
    stub = StubDetector(needs_side=110)  # finds the face only once a border is added
    assert len(detect_images(stub, [img], {**params, "retry_pad": None})[0]) == 0
    f = detect_images(stub, [img], {**params, "retry_pad": 0.15})[0]
    assert len(f) == 1
    # the stub puts the face at the centre of what it sees; mapped back it is the image centre
    np.testing.assert_allclose(f.boxes[0], [40, 30, 80, 70])
    np.testing.assert_allclose(f.points[0][4:6], [60, 52])  # nose
