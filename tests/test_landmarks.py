"""Landmarks stage with the offline dlib backend, and the SphereFace alignment it records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config.manifest import load_manifest
from pipeline.config.schemas import load_schema
from pipeline.detect.stage import get_detector
from pipeline.detect.stage import run_shard as detect_shard
from pipeline.imaging import align
from pipeline.landmarks.base import WeightsError
from pipeline.landmarks.stage import get_backend, preflight
from pipeline.landmarks.stage import run_shard as landmarks_shard
from tests.test_detect import ctx_for, images_under, index_table

# iBUG-68 index ranges
EYES = list(range(36, 48))
MOUTH = list(range(48, 68))


# --- alignment (pure) ----------------------------------------------------------------------------
def test_similarity_maps_reference_onto_itself_and_recovers_a_similarity():
    ref = align.REFERENCE_POINTS
    np.testing.assert_allclose(align.similarity_matrix(ref), [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    theta, s, t = np.deg2rad(20), 2.5, np.array([130.0, 45.0])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = (ref @ rot.T) * s + t  # the reference points seen in a rotated, scaled, shifted image
    m = align.align_matrix_from_points(pts.reshape(-1))
    np.testing.assert_allclose(align.transform_points(pts, m), ref, atol=1e-9)
    back = align.transform_points(ref, align.invert_matrix(m))
    np.testing.assert_allclose(back, pts, atol=1e-9)


def test_similarity_rejects_degenerate_points():
    with pytest.raises(align.AlignError):
        align.align_matrix_from_points([5.0] * 10)
    with pytest.raises(align.AlignError):
        align.align_matrix_from_points([1.0, 2.0, float("nan")] + [0.0] * 7)
    with pytest.raises(align.AlignError):
        align.align_matrix_from_points([1.0] * 8)


def test_warp_crop_shape_and_content():
    img = np.zeros((300, 400, 3), np.uint8)
    img[100:120, 200:220] = (255, 0, 0)  # a red square centred at (209.5, 109.5)
    m = align.similarity_matrix(align.REFERENCE_POINTS + [209.5 - 48.0252, 109.5 - 71.7366])
    crop = align.warp_crop(img, m)
    assert crop.shape == (112, 96, 3) and crop.dtype == np.uint8
    # the square lands around the nose reference point
    ys, xs = np.nonzero(crop[..., 0] > 128)
    assert abs(xs.mean() - 48.0252) < 1 and abs(ys.mean() - 71.7366) < 1
    with pytest.raises(align.AlignError):
        align.warp_crop(img[..., 0], m)


# --- dlib backend ------------------------------------------------------------------------------
def test_dlib_weights_are_located_without_importing_the_package_and_verified(tmp_path):
    import sys

    m = load_manifest(overrides={"stages.landmarks.backend": "dlib"})
    desc = preflight(m)
    assert "shape_predictor_68_face_landmarks.dat" in desc
    assert "face_recognition_models" not in sys.modules  # its __init__ needs pkg_resources
    bad = load_manifest(
        overrides={"stages.landmarks.backend": "dlib", "models.dlib_landmarks.sha256": "0" * 64}
    )
    with pytest.raises(WeightsError, match="sha256"):
        preflight(bad)
    missing = load_manifest(
        overrides={"stages.landmarks.backend": "dlib", "models.dlib_landmarks.file": str(tmp_path / "x.dat")}
    )
    with pytest.raises(WeightsError, match="not found"):
        preflight(missing)


@pytest.fixture(scope="module")
def detected(faces_dir, people_dir):
    get_detector()
    paths = images_under(faces_dir) + images_under(people_dir)
    index = index_table(paths)
    return index, detect_shard({"index": index}, ctx_for("detect"))


def test_dlib_landmarks_on_real_photos(detected):
    index, det = detected
    m = load_manifest(overrides={"stages.landmarks.backend": "dlib"})
    out = landmarks_shard({"index": index, "detect": det}, ctx_for("landmarks", m))
    assert out.schema.equals(load_schema("landmarks").arrow, check_metadata=False)
    assert out.column("image_id").to_pylist() == index.column("image_id").to_pylist()
    rows, drows = out.to_pylist(), det.to_pylist()
    ok = 0
    for r, d in zip(rows, drows, strict=True):
        if d["failure_reason"] is not None:
            assert r["failure_reason"] == d["failure_reason"] and r["landmarks"] is None
            continue
        assert r["failure_reason"] is None, r
        ok += 1
        assert r["backend"] == "dlib" and r["weights_sha256"] == m.model("dlib_landmarks")["sha256"]
        assert all(np.isnan(r["confidence"]))
        assert (r["image_width"], r["image_height"]) == (d["width"], d["height"])
        pts = np.asarray(r["landmarks"]).reshape(68, 2)
        x0, y0, x1, y1 = d["primary_box"]
        margin = 0.15 * (x1 - x0)  # MTCNN boxes often stop at the chin
        assert np.all(pts[:, 0] >= x0 - margin) and np.all(pts[:, 0] <= x1 + margin), r["image_id"]
        assert np.all(pts[:, 1] >= y0 - margin) and np.all(pts[:, 1] <= y1 + margin), r["image_id"]
        assert pts[EYES, 1].max() < pts[MOUTH, 1].min(), r["image_id"]  # eyes above mouth
        # dlib's eye centres agree with MTCNN's eye points within a fraction of the face size
        mt = np.asarray(d["primary_points"]).reshape(5, 2)
        eye_l, eye_r = pts[36:42].mean(0), pts[42:48].mean(0)
        assert np.linalg.norm(eye_l - mt[0]) < 0.15 * (x1 - x0)
        assert np.linalg.norm(eye_r - mt[1]) < 0.15 * (x1 - x0)
        # the align matrix maps the five points close to the SphereFace reference
        mat = np.asarray(r["align_matrix"]).reshape(2, 3)
        assert np.abs(align.transform_points(mt, mat) - align.REFERENCE_POINTS).mean() < 4.0
    assert ok >= 0.95 * len(rows)


def test_landmarks_carry_upstream_failures_and_refuse_mismatched_shards(detected, tmp_path):
    index, det = detected
    m = load_manifest(overrides={"stages.landmarks.backend": "dlib"})
    # the file changed between detect and landmarks -> image_changed, not a crash
    from PIL import Image

    first = Path(index.column("uri")[0].as_py())
    changed = tmp_path / first.name
    Image.open(first).convert("RGB").resize((64, 64)).save(changed)
    uris = index.column("uri").to_pylist()
    uris[0] = str(changed)
    idx2 = index.set_column(index.schema.get_field_index("uri"), "uri", [uris])
    out = landmarks_shard({"index": idx2.slice(0, 3), "detect": det.slice(0, 3)}, ctx_for("landmarks", m))
    assert out.column("failure_reason").to_pylist()[0] == "image_changed"
    with pytest.raises(ValueError, match="row for row"):
        landmarks_shard({"index": index.slice(0, 3), "detect": det.slice(1, 3)}, ctx_for("landmarks", m))


def test_backend_is_created_once_per_process():
    from pipeline.core import workercache

    m = load_manifest(overrides={"stages.landmarks.backend": "dlib"})
    p = m.stage_params("landmarks")
    a = get_backend(m, p)
    b = get_backend(m, p)
    assert a is b
    from pipeline.landmarks.dlib_backend import cache_key

    assert workercache.creation_count(("landmarks", "dlib", *_dlib_key(m), *cache_key(p))) == 1


def _dlib_key(m) -> tuple[str, str]:
    from pipeline.landmarks.dlib_backend import resolve_model

    path, sha = resolve_model(m.model("dlib_landmarks"))
    return str(path), sha


@pytest.fixture(scope="module")
def two_photos() -> list[tuple[np.ndarray, np.ndarray]]:
    """The two real photos inside installed wheels, each with dlib's own face box (x0 y0 x1 y1)."""
    import dlib
    import matplotlib
    import skimage
    from PIL import Image

    out = []
    for path in (
        Path(skimage.__file__).parent / "data" / "astronaut.png",
        Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg",
    ):
        image = np.asarray(Image.open(path).convert("RGB"))
        r = max(dlib.get_frontal_face_detector()(image, 1), key=lambda r: r.area())
        out.append((image, np.array([r.left(), r.top(), r.right(), r.bottom()], float)))
    return out


def _dlib(face_px: int | None, jitter: int):
    from pipeline.landmarks.dlib_backend import DlibBackend, resolve_model

    return DlibBackend(*resolve_model(load_manifest().model("dlib_landmarks")), face_px, jitter)


def test_dlib_on_the_photos_own_pixels_once_is_dlibs_own_output(two_photos):
    import dlib

    from pipeline.landmarks.dlib_backend import resolve_model

    predictor = dlib.shape_predictor(str(resolve_model(load_manifest().model("dlib_landmarks"))[0]))
    for image, box in two_photos:
        shape = predictor(image, dlib.rectangle(*(int(v) for v in box)))
        want = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float32)
        np.testing.assert_array_equal(_dlib(None, 1).predict_one(image, box)[0], want)


def test_dlib_points_on_a_resampled_face_are_in_the_photos_pixels(two_photos):
    """Moving the photo moves the points by as much (the crop is the same), and they land where dlib
    puts them on the photo's own pixels, to within dlib's own spread."""
    backend = _dlib(300, 8)
    for image, box in two_photos:
        points = backend.predict_one(image, box)[0]
        moved = np.pad(image, ((3, 0), (7, 0), (0, 0)))
        np.testing.assert_allclose(
            backend.predict_one(moved, box + [7, 3, 7, 3])[0], points + [7, 3], atol=1e-3
        )
        own = _dlib(None, 1).predict_one(image, box)[0]
        eye = np.linalg.norm(own[36] - own[45])
        assert np.sqrt(((points - own) ** 2).sum(1).mean()) < 0.03 * eye


def test_averaged_dlib_points_move_less_between_sizes_of_one_photo(two_photos):
    """The same photo at x0.5, x1 and x2: dlib's points on the photo's own pixels move 1.6 % of the
    outer-eye distance between sizes (RMS over the 68 points, these two photos); on the face resampled
    to 300 px and averaged over 8 moved boxes (the measured option), 0.6 %."""
    from PIL import Image

    def spread(backend) -> float:
        out = []
        for image, box in two_photos:
            h, w = image.shape[:2]
            at = {}
            for k in (0.5, 1.0, 2.0):
                resized = np.asarray(
                    Image.fromarray(image).resize((round(w * k), round(h * k)), Image.LANCZOS)
                )
                at[k] = (backend.predict_one(resized, (box + 0.5) * k - 0.5)[0] + 0.5) / k - 0.5
            eye = np.linalg.norm(at[1.0][36] - at[1.0][45])
            out += [
                np.sqrt(((at[a] - at[b]) ** 2).sum(1).mean()) / eye for a, b in ((0.5, 1), (0.5, 2), (1, 2))
            ]
        return float(np.mean(out))

    own, averaged = spread(_dlib(None, 1)), spread(_dlib(300, 8))
    assert averaged < 0.6 * own, (own, averaged)


def test_detect_and_landmarks_run_through_the_shard_store(faces_dir, tmp_path):
    from pipeline.core.runner import process_shard
    from pipeline.storage.run import Run
    from pipeline.storage.store import ShardStore

    get_detector()
    paths = images_under(faces_dir)[:4]
    bad = tmp_path / "x" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    index = index_table([*paths, bad])
    root = str(tmp_path / "run")
    ShardStore(root, "ingest").write(0, index, load_schema("index"), "fp-index", "p", 0.0)
    m = load_manifest(overrides={"stages.landmarks.backend": "dlib"})
    det_sc = process_shard(Run(root), m, "detect", 0)
    assert det_sc["rows"] == 5 and det_sc["failures"] == {"truncated": 1}
    lm_sc = process_shard(Run(root), m, "landmarks", 0)
    assert lm_sc["rows"] == 5 and lm_sc["failures"] == {"truncated": 1}
    assert process_shard(Run(root), m, "landmarks", 0).get("skipped") is True  # resumable
    lm = ShardStore(root, "landmarks").read(0, load_schema("landmarks"))
    assert lm.column("backend").to_pylist() == ["dlib"] * 5


@pytest.mark.slow
def test_dlib_landmarks_on_synthetic_renders_are_within_a_few_pixels():
    """Rendered faces (pipeline.synthetic.render) with known projected landmarks: MTCNN + dlib land within
    a few pixels on average (250x250 renders, faces ~130 px wide)."""
    pytest.importorskip("pipeline.synthetic.render")
    from pipeline.models.assets import cache_path

    m = load_manifest(overrides={"stages.landmarks.backend": "dlib"})
    if not cache_path(m.model("morphable_model"), m.cache_dir).is_file():
        pytest.skip("converted morphable model not cached (run any command that loads it once)")
    from pipeline.landmarks.accuracy import landmark_errors, synthetic_renders

    renders = synthetic_renders(m, 8, seed=1)
    stats = landmark_errors(
        *renders, get_detector(), m.stage_params("detect"), get_backend(m, m.stage_params("landmarks"))
    )
    assert stats["detected"] >= 7
    assert stats["mean_error_px_visible68"] < 6.0, stats
    assert stats["nme_interocular"] < 0.12, stats
