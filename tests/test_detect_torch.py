"""The torch MTCNN: its weights (sha256 from the manifest, restricted unpickling), its resampling,
its agreement with the ``mtcnn`` package (the TensorFlow reference, skipped without the
``tensorflow`` extra) and ``min_face_size`` at any value."""

from __future__ import annotations

import io
import pickle

import cv2
import joblib
import numpy as np
import pytest

from pipeline.config.manifest import load_manifest
from pipeline.detect.mtcnn_torch import TorchMTCNN, area_matrix, pyramid
from pipeline.detect.stage import (
    _mtcnn_call,
    choose_primary,
    filter_faces,
    get_detector,
    parse_mtcnn_output,
    prepare_for_detection,
)
from pipeline.detect.weights import MtcnnWeightsError, _restricted_load, read_weights
from pipeline.imaging.decode import read_image
from pipeline.landmarks.accuracy import synthetic_renders


@pytest.fixture(scope="module")
def manifest():
    return load_manifest()


@pytest.fixture(scope="module")
def renders(manifest):
    images, _, _ = synthetic_renders(manifest, 24, seed=4)
    return images


def _joblib_bytes(value: object) -> bytes:
    buf = io.BytesIO()
    joblib.dump(value, buf)
    return buf.getvalue()


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_the_weights_are_checked_then_read_as_plain_arrays(manifest):
    arrays = read_weights(manifest.model("mtcnn"))
    assert [len(arrays[n]) for n in ("pnet", "rnet", "onet")] == [13, 16, 21]
    assert arrays["pnet"][0].shape == (3, 3, 3, 10) and arrays["onet"][12].shape == (1152, 256)
    altered = dict(manifest.model("mtcnn"))
    altered["members"] = {**altered["members"], "mtcnn/assets/weights/rnet.lz4": "0" * 64}
    with pytest.raises(MtcnnWeightsError, match=r"rnet.lz4 has sha256 .* the manifest says 0000"):
        read_weights(altered)
    with pytest.raises(MtcnnWeightsError, match="no sha256"):
        read_weights({"source": "pypi:mtcnn==1.0.0"})


def test_the_unpickler_refuses_anything_but_arrays(capsys):
    assert [a.tolist() for a in _restricted_load(_joblib_bytes([np.arange(3.0)]), "ok")] == [[0.0, 1.0, 2.0]]
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        _restricted_load(_joblib_bytes([np.zeros(2), Payload()]), "evil")
    assert "must never run" not in capsys.readouterr().out
    with pytest.raises(pickle.UnpicklingError, match="dtype"):
        _restricted_load(_joblib_bytes([np.array([1, "a"], dtype=object)]), "objects")


def test_area_resampling_is_cv2s(renders):
    img = renders[0].astype(np.float32)
    for size in (106, 53, 13):
        a, b = area_matrix(img.shape[0], size), area_matrix(img.shape[1], size)
        ours = np.stack([a @ img[:, :, c] @ b.T for c in range(3)], axis=-1)
        np.testing.assert_allclose(
            ours, cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA), atol=1e-3
        )


def test_the_pyramid_starts_at_min_face_size_and_keeps_one_cell():
    s20, s40 = pyramid(250, 20, 0.709), pyramid(250, 40, 0.709)
    assert s20[0] == pytest.approx(0.6) and s40[0] == pytest.approx(0.3)
    assert len(s20) == 8 and len(s40) == 6  # the package's count at 20 (8); it gives 8 at 40 too
    assert 250 * s20[-1] >= 12 > 250 * s20[-1] * 0.709
    assert pyramid(10, 20, 0.709) == []


def _primary(rows: np.ndarray, shape: tuple[int, int], params: dict):
    faces = filter_faces(
        parse_mtcnn_output(rows, 1, [shape], [1.0])[0], params["min_face_px"], params["min_score"]
    )
    p = choose_primary(
        faces.boxes, faces.scores, shape[1], shape[0], params["primary_rule"], params["center_weight"]
    )
    return None if p is None else (faces.boxes[p], faces.points[p])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _agreement(images: list[np.ndarray], ref: object, ours: object, params: dict) -> tuple[float, float, int]:
    good, same, n = 0, 0, 0
    for im in images:
        a = _primary(_mtcnn_call(ref, [im], params), im.shape[:2], params)
        b = _primary(_mtcnn_call(ours, [im], params), im.shape[:2], params)
        if a is None and b is None:
            continue
        n += 1
        if a is None or b is None:
            continue
        iou = _iou(a[0], b[0])
        same += iou > 0.5
        side = a[0][2] - a[0][0]
        good += iou >= 0.9 and np.abs(a[1] - b[1]).max() <= 0.02 * side
    return good / max(n, 1), same / max(n, 1), n


@pytest.mark.slow
def test_torch_mtcnn_finds_what_the_package_finds(renders, faces_dir, people_dir, manifest):
    pytest.importorskip("tensorflow")
    params = manifest.stage_params("detect")
    ref, ours = get_detector({**params, "backend": "mtcnn-tf"}), get_detector(params)
    files = sorted(faces_dir.rglob("*.png")) + sorted(people_dir.rglob("*.jp*g"))
    photos = [prepare_for_detection(read_image(str(p)).unwrap(), 400)[0] for p in files]  # as the stage would
    for name, images in (("renders", renders), ("photos", photos)):
        agree, same_face, n = _agreement(images, ref, ours, params)
        assert n >= 0.9 * len(images), name
        assert agree >= 0.95 and same_face == 1.0, (name, agree, same_face)
    # batched over a list: the same rows as one image at a time
    batch = np.asarray(_mtcnn_call(ours, renders[:8], params))
    for k in range(8):
        one = np.asarray(_mtcnn_call(ours, [renders[k]], params))
        np.testing.assert_allclose(batch[batch[:, 0] == k][:, 1:], one[:, 1:], rtol=1e-4, atol=1e-2)


def test_min_face_size_works_at_any_value(renders, manifest):
    params = manifest.stage_params("detect")
    det = get_detector(params)
    assert isinstance(det, TorchMTCNN)
    found = {}
    for size in (20, 40, 60):
        found[size] = [
            _primary(_mtcnn_call(det, [im], {**params, "min_face_size": size}), im.shape[:2], params)
            for im in renders
        ]
    assert sum(p is not None for p in found[20]) >= 0.95 * len(renders)
    for size in (40, 60):  # the renders' faces are ~100 px: the coarser pyramids still find them
        both = [
            (a, b) for a, b in zip(found[20], found[size], strict=True) if a is not None and b is not None
        ]
        assert len(both) >= 0.95 * len(renders)
        assert np.median([_iou(a[0], b[0]) for a, b in both]) >= 0.85


@pytest.mark.skipif(
    not __import__("pipeline.detect.onnx_pnet").detect.onnx_pnet.available(), reason="no onnx extra"
)
def test_pnet_in_onnxruntime_gives_the_same_faces(renders, faces_dir, manifest):
    """stages.detect.pnet_runtime: the ONNX Runtime P-Net changes where P-Net runs, not what it finds."""
    from pipeline.detect.weights import load_npz, weights_npz

    path, _ = weights_npz(manifest.model("mtcnn"), manifest.cache_dir)
    weights = load_npz(path)
    torch_net = TorchMTCNN(weights, "cpu", "torch")
    onnx_net = TorchMTCNN(weights, "cpu", "onnxruntime")
    assert onnx_net.pnet_runtime == "onnxruntime"
    import torch

    x = torch.from_numpy((renders[0][None].astype(np.float32) - 127.5) / 128.0).permute(0, 3, 1, 2)
    with torch.inference_mode():
        want = [t.numpy() for t in torch_net.pnet(x)]
    got = [t.numpy() for t in onnx_net._pnet_forward(x)]
    for a, b in zip(want, got, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4
    images = list(renders)
    if faces_dir is not None:
        images += [read_image(str(p)).image for p in sorted(faces_dir.rglob("*.jpg"))[:16]]
    a = torch_net.detect(images, 20)
    b = onnx_net.detect(images, 20)
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-2  # the same rows, to float rounding
    with pytest.raises(ValueError, match="runs on a CPU"):
        TorchMTCNN(weights, "meta", "onnxruntime")


def test_an_altered_weights_cache_is_converted_again_not_used(tmp_path, manifest, caplog):
    """The converted MTCNN cache is trusted only while it hashes to what its conversion recorded:
    P-Net weights scaled by 0.5 inside it (the boxes would move) are replaced, with a warning."""
    import logging

    from pipeline.detect.weights import load_npz, weights_npz

    path, sha = weights_npz(manifest.model("mtcnn"), tmp_path)
    assert path.with_name(path.name + ".sha256").read_text().strip() == sha
    clean = load_npz(path)
    tampered = {
        f"{net}_{i:02d}": (a * 0.5 if net == "pnet" else a)
        for net, arrs in clean.items()
        for i, a in enumerate(arrs)
    }
    np.savez(path, **tampered)
    with caplog.at_level(logging.WARNING, logger="pipeline.detect.weights"):
        again, sha2 = weights_npz(manifest.model("mtcnn"), tmp_path)
    assert again == path and sha2 == sha and "converting the MTCNN weights again" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(load_npz(path)["pnet"], clean["pnet"], strict=True))
    path.with_name(path.name + ".sha256").unlink()  # a cache with no record is not trusted either
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.detect.weights"):
        assert weights_npz(manifest.model("mtcnn"), tmp_path) == (path, sha)
    assert "no recorded sha256" in caplog.text
