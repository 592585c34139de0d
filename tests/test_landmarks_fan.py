"""FAN backend with a randomly initialised 2DFAN-4 checkpoint in a temporary TORCH_HOME.

The real weights cannot be downloaded on the development machines, so these tests check the
plumbing (weights resolution and verification, crops, batching, coordinates back to image
pixels), not landmark accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config.manifest import load_manifest
from pipeline.landmarks import fan
from pipeline.landmarks.base import WeightsError, sha256_file
from pipeline.landmarks.stage import get_backend, preflight
from pipeline.landmarks.stage import run_shard as landmarks_shard


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    import torch
    from face_alignment.models import FAN

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random-2dfan4.pth.tar"
    torch.save(FAN(4).state_dict(), path)
    return path


@pytest.fixture()
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def backend(random_checkpoint, tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    ckpt = home / "hub" / "checkpoints" / fan.FAN_FILENAME
    ckpt.parent.mkdir(parents=True)
    os.link(random_checkpoint, ckpt)
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    try:
        m = load_manifest(
            overrides={"models.fan.sha256": sha256_file(ckpt), "stages.landmarks.batch_size": 4}
        )
        b = get_backend(m, m.stage_params("landmarks"))
        yield b, m
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old


def _textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)[:h, :w])


# --- pure geometry --------------------------------------------------------------------------------
def test_heatmap_peaks_map_back_to_the_image_points():
    box = np.array([40.0, 60.0, 160.0, 190.0])
    m = fan.crop_matrix(box)
    rng = np.random.default_rng(1)
    pts = np.column_stack([rng.uniform(50, 150, 68), rng.uniform(70, 180, 68)])  # image pixels
    u = pts @ m[:, :2].T + m[:, 2]  # crop pixels
    p = (u - 1.5) / 4.0  # heatmap pixels
    yy, xx = np.mgrid[0 : fan.HEATMAP, 0 : fan.HEATMAP]
    hm = np.exp(
        -((xx[None] - p[:, 0, None, None]) ** 2 + (yy[None] - p[:, 1, None, None]) ** 2) / (2 * 1.5**2)
    )
    got_hm, peak = fan.decode_heatmaps(hm[None].astype(np.float32))
    assert got_hm.shape == (1, 68, 2) and peak.shape == (1, 68)
    assert np.all(peak > 0.8)
    back = fan.heatmap_to_image(got_hm[0], m)
    px_per_heatmap_px = 4.0 / m[0, 0]
    # argmax + quarter-pixel refinement: within half a heatmap pixel
    assert np.abs(back - pts).max() <= 0.5 * px_per_heatmap_px + 1e-6
    assert np.abs(back - pts).mean() < 0.3 * px_per_heatmap_px


def test_crop_matrix_follows_face_alignment_geometry():
    box = np.array([10.0, 20.0, 110.0, 140.0])
    m = fan.crop_matrix(box)
    side = 200.0 * (100 + 120) / 195.0
    assert m[0, 0] == pytest.approx(256 / side) and m[0, 1] == 0 and m[1, 1] == m[0, 0]
    centre = np.array([60.0, 80.0 - 0.12 * 120])
    np.testing.assert_allclose(centre @ m[:, :2].T + m[:, 2], [128, 128])


# --- weights resolution -------------------------------------------------------------------------
def test_missing_weights_fail_before_work_with_instructions(torch_home):
    m = load_manifest(overrides={"stages.landmarks.download": False})
    with pytest.raises(WeightsError) as ei:
        preflight(m)
    msg = str(ei.value)
    assert fan.FAN_FILENAME in msg
    assert str(torch_home / "hub" / "checkpoints") in msg
    assert "stages.landmarks.backend=dlib" in msg
    # the stage itself refuses before reading any image
    from pipeline.core.runner import stage_context

    ctx = stage_context(m, "landmarks")
    with pytest.raises(WeightsError):
        landmarks_shard({"index": None, "detect": None}, ctx)


def test_failed_download_leaves_nothing_behind(torch_home):
    m = load_manifest(
        overrides={
            "models.fan.source": "http://127.0.0.1:9/2DFAN4-11f355bf06.pth.tar",
            "stages.landmarks.download_timeout_s": 5,
        }
    )
    with pytest.raises(WeightsError, match="download from http://127.0.0.1:9/.* failed"):
        preflight(m)
    assert not torch_home.exists()  # no file, no partial file, not even the directories


def test_download_is_verified_and_atomic(torch_home, random_checkpoint):
    url = random_checkpoint.as_uri()
    good_sha = sha256_file(random_checkpoint)
    ckdir = torch_home / "hub" / "checkpoints"
    with pytest.raises(WeightsError, match="sha256"):
        preflight(load_manifest(overrides={"models.fan.source": url, "models.fan.sha256": "a" * 64}))
    assert not torch_home.exists()  # the bad download and the directories made for it are gone
    # without a manifest sha256 the file name's hash prefix is checked: a random net fails it
    with pytest.raises(WeightsError, match="starting with 11f355bf06"):
        preflight(load_manifest(overrides={"models.fan.source": url}))
    assert not torch_home.exists()
    desc = preflight(load_manifest(overrides={"models.fan.source": url, "models.fan.sha256": good_sha}))
    assert fan.FAN_FILENAME in desc
    assert [p.name for p in ckdir.iterdir()] == [fan.FAN_FILENAME]
    assert sha256_file(ckdir / fan.FAN_FILENAME) == good_sha


def test_manifest_file_path_and_corrupt_checkpoint(tmp_path, random_checkpoint):
    # no sha256 and no hash prefix in the name: nothing vouches for the file, so it is refused
    with pytest.raises(WeightsError, match="no sha256 to check"):
        preflight(load_manifest(overrides={"models.fan.file": str(random_checkpoint)}))
    sha = sha256_file(random_checkpoint)
    m = load_manifest(overrides={"models.fan.file": str(random_checkpoint), "models.fan.sha256": sha})
    assert str(random_checkpoint) in preflight(m)
    with pytest.raises(WeightsError, match="not found"):
        preflight(load_manifest(overrides={"models.fan.file": str(tmp_path / "nope.pth.tar")}))
    named = tmp_path / fan.FAN_FILENAME  # a hub-style name promises a hash prefix: checked
    os.link(random_checkpoint, named)
    with pytest.raises(WeightsError, match="starting with 11f355bf06"):
        preflight(load_manifest(overrides={"models.fan.file": str(named)}))
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"definitely not a torch file" * 100)
    with pytest.raises(WeightsError, match="not a 2DFAN-4 state dict"):
        fan.FanBackend(junk, sha256_file(junk))


# --- the backend end to end ---------------------------------------------------------------------
def test_fan_backend_shapes_batching_and_pixel_coordinates(backend):
    b, m = backend
    assert b.name == "fan" and b.version == "1.5.0"
    img = _textured(240, 200)
    boxes = [np.array([40, 50, 160, 190.0]), np.array([100, 120, 195, 235.0])]
    items = [(img, bx) for bx in boxes] + [(img, np.array([5, 5, 5, 5.0]))]  # last: empty box
    try:
        b.batch_size = 4
        together = b.predict(items)
        b.batch_size = 1
        alone = b.predict(items)
    finally:
        b.batch_size = m.stage_params("landmarks")["batch_size"]
    assert isinstance(together[-1], str) and isinstance(alone[-1], str)  # the bad box fails alone
    for t, a in zip(together[:-1], alone[:-1], strict=True):
        pts, conf = t
        assert pts.shape == (68, 2) and conf.shape == (68,) and pts.dtype == np.float32
        assert np.all(np.isfinite(pts)) and np.all(np.isfinite(conf))
        np.testing.assert_allclose(pts, a[0], atol=1e-3)  # batching == one by one
        np.testing.assert_allclose(conf, a[1], atol=1e-4)
    # shifting image and box by whole pixels shifts the landmarks by exactly that much
    dx, dy = 37, 11
    shifted = cv2.copyMakeBorder(img, dy, 0, dx, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    moved = b.predict([(shifted, boxes[0] + [dx, dy, dx, dy])])[0]
    np.testing.assert_allclose(moved[0], together[0][0] + [dx, dy], atol=1e-3)
    # flip_input averages mirrored heatmaps: still 68 finite points inside the crop's reach
    try:
        b.flip_input = True
        flipped = b.predict(items[:1])[0]
    finally:
        b.flip_input = False
    assert flipped[0].shape == (68, 2) and np.all(np.isfinite(flipped[0]))
    assert not np.allclose(flipped[1], together[0][1])  # the mirrored pass changed the heatmaps


@pytest.mark.slow
def test_fan_landmarks_stage_end_to_end(backend, faces_dir):
    from pipeline.detect.stage import get_detector
    from pipeline.detect.stage import run_shard as detect_shard
    from tests.test_detect import ctx_for, images_under, index_table

    _, m = backend
    get_detector()
    index = index_table(images_under(faces_dir)[:3])
    det = detect_shard({"index": index}, ctx_for("detect"))
    out = landmarks_shard({"index": index, "detect": det}, ctx_for("landmarks", m)).to_pylist()
    assert [r["image_id"] for r in out] == index.column("image_id").to_pylist()
    for r in out:
        assert r["failure_reason"] is None
        assert r["backend"] == "fan" and r["weights_sha256"] == m.model("fan")["sha256"]
        pts = np.asarray(r["landmarks"]).reshape(68, 2)
        assert np.all(np.isfinite(pts)) and not np.any(np.isnan(r["confidence"]))
        assert len(r["align_matrix"]) == 6
