"""Would ONNX Runtime make the CPU detector faster? (issue 17: "try ONNX Runtime for the CPU path")

Exports the torch MTCNN's three networks (the mtcnn 1.0.0 weights) to ONNX and times, on one
thread and on the same inputs, each network's forward pass in torch and in ONNX Runtime: P-Net on
every pyramid level of a list of 36 renders (250x250, min_face_size 20), R-Net and O-Net on the
candidate patches that list produces. Also the whole torch cascade, to show the networks' share.
Needs `pip install onnx onnxruntime` (not a project dependency); prints {"onnxruntime": false}
without them. Prints JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import best_of  # noqa: E402  (benchmarks/timing.py, beside this script)


def main() -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        print(json.dumps({"onnxruntime": False}))
        return
    torch.set_num_threads(1)
    from pipeline.config.manifest import load_manifest
    from pipeline.detect import mtcnn_torch as mt
    from pipeline.detect.stage import get_detector
    from pipeline.synthetic.synth import SynthParams, model_regions, render_sample

    manifest = load_manifest()
    params = manifest.stage_params("detect") | {"backend": "torch", "device": "cpu"}
    det = get_detector(params)
    net: mt.TorchMTCNN = det.net if hasattr(det, "net") else det  # the TorchMTCNN inside
    from pipeline.models.assets import resolve_morphable_model

    model = resolve_morphable_model(manifest)
    p = SynthParams.from_stage(manifest.stage_params("synth") | {"seed": 3, "textures": "painted"})
    import cv2

    images = []
    for s in range(36):
        jpeg, _ = render_sample(model, model_regions(model), p, s, 0)
        images.append(cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1), cv2.COLOR_BGR2RGB))
    torch.set_grad_enabled(False)  # the cascade's helpers are called outside its inference_mode
    batch = (np.stack(images).astype(np.float32) - 127.5) / 128.0
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    scales = mt.pyramid(250, 20, 0.709)
    levels = [net._resized(x, batch, int(250 * s), int(250 * s)).contiguous() for s in scales]
    levels = [lv for lv in levels if min(lv.shape[2:]) >= mt.CELL]
    rows = mt.square(net._pnet(x, batch, scales, 0.6))
    r_in = mt.crop_and_resize(x, rows[:, 1:5], rows[:, 0].astype(np.int64), 24)
    rrows = mt.square(net._rnet(x, rows, 0.7))
    o_in = mt.crop_and_resize(x, rrows[:, 1:5], rrows[:, 0].astype(np.int64), 48)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module, example in (
            ("pnet", net.pnet, levels[0]),
            ("rnet", net.rnet, r_in),
            ("onet", net.onet, o_in),
        ):
            path = os.path.join(tmp, f"{name}.onnx")
            axes = {"x": {0: "n", 2: "h", 3: "w"}} if name == "pnet" else {"x": {0: "n"}}
            torch.onnx.export(module, (example,), path, input_names=["x"], dynamic_axes=axes, dynamo=False)
            sessions[name] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def torch_pnet():
        with torch.inference_mode():
            for lv in levels:
                net.pnet(lv)

    def ort_pnet():
        for lv in levels:
            sessions["pnet"].run(None, {"x": lv.numpy()})

    def run_torch(module, t):
        def f():
            with torch.inference_mode():
                module(t)

        return f

    def run_ort(name, t):
        a = t.numpy()
        return lambda: sessions[name].run(None, {"x": a})

    # the same numbers from both
    with torch.inference_mode():
        ref = net.onet(o_in)[2].numpy()
    got = sessions["onet"].run(None, {"x": o_in.numpy()})[2]
    n = len(images)
    out = {
        "images": n,
        "pyramid_levels": len(levels),
        "rnet_patches": int(r_in.shape[0]),
        "onet_patches": int(o_in.shape[0]),
        "onet_max_abs_difference": float(np.abs(ref - got).max()),
        "ms_per_image": {
            "torch_pnet": 1000 * best_of(torch_pnet, 5) / n,
            "onnxruntime_pnet": 1000 * best_of(ort_pnet, 5) / n,
            "torch_rnet": 1000 * best_of(run_torch(net.rnet, r_in), 5) / n,
            "onnxruntime_rnet": 1000 * best_of(run_ort("rnet", r_in), 5) / n,
            "torch_onet": 1000 * best_of(run_torch(net.onet, o_in), 5) / n,
            "onnxruntime_onet": 1000 * best_of(run_ort("onet", o_in), 5) / n,
            "torch_whole_cascade": 1000 * best_of(lambda: net.detect(images, 20), 5) / n,
        },
        "torch": torch.__version__,
        "onnxruntime_version": ort.__version__,
        "threads": 1,
    }
    out["ms_per_image"] = {k: round(v, 2) for k, v in out["ms_per_image"].items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
