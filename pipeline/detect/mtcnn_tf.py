"""Detector backend ``mtcnn-tf``: the ``mtcnn`` package's own TensorFlow MTCNN (the reference the
torch port is tested against; needs the ``tensorflow`` extra)."""

from __future__ import annotations

import logging
import os
from importlib.metadata import version

import numpy as np

from pipeline.core.stage import Asset, ConfigView
from pipeline.core.threads import configure_tensorflow
from pipeline.detect.base import FaceDetector

MTCNN_MIN_FACE_SIZE = 20  # mtcnn 1.0.0 silently finds nothing at other values (pipeline/detect/stage.py)


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ and Python log noise off the user's terminal (call before import)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # oneDNN's start-up notice is printed before TF's log level applies; turning the custom ops off
    # silences it and measured no slower for MTCNN here.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    for name in ("tensorflow", "absl", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)


class TfMTCNN(FaceDetector):
    def __init__(self) -> None:
        quiet_tensorflow()
        try:
            from mtcnn import MTCNN  # lazy: imports TensorFlow
        except ImportError as exc:
            raise ImportError(
                "stages.detect.backend mtcnn-tf needs TensorFlow, which is an extra: "
                "pip install 'morphset[tensorflow]' (or use the default backend torch)"
            ) from exc
        configure_tensorflow()  # the worker's thread budget, before TensorFlow's runtime starts
        try:
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.ERROR)
        except ImportError:  # absl ships with TensorFlow; nothing to quieten without it
            pass
        self.net = MTCNN(stages="face_and_landmarks_detection", device="CPU:0")

    def raw(self, images: list[np.ndarray], params: dict) -> np.ndarray:
        t_p, t_r, t_o = params["thresholds"]
        # float32 input: from uint8 the library normalises to float64 and converts that to a tensor
        # once per pyramid scale, which measured ~2x slower for lists of 32 (identical boxes).
        return self.net.detect_faces(
            [np.asarray(im, dtype=np.float32) for im in images],
            output_type="numpy",
            box_format="xyxy",
            postprocess=False,
            batch_stack_justification="topleft",
            min_face_size=MTCNN_MIN_FACE_SIZE,
            scale_factor=params["scale_factor"],
            threshold_pnet=t_p,
            threshold_rnet=t_r,
            threshold_onet=t_o,
        )


def resources(params: dict) -> dict[str, float]:
    return {}


def resolve_assets(config: ConfigView) -> dict[str, Asset]:
    p = config.stage_params("detect")
    if float(p["min_face_size"]) != MTCNN_MIN_FACE_SIZE:
        raise ValueError(
            f"{config.path}: stages.detect.min_face_size: the mtcnn-tf backend finds nothing at "
            f"{p['min_face_size']} (mtcnn 1.0.0 works only at {MTCNN_MIN_FACE_SIZE}); use backend torch"
        )
    return {}


def create(params: dict, weights: Asset | None) -> FaceDetector:
    return TfMTCNN()


def cache_key(params: dict) -> tuple:
    return (version("mtcnn"), "CPU:0")
