"""P-Net in ONNX Runtime, for the torch MTCNN's CPU path (``stages.detect.pnet_runtime``).

Measured (``benchmarks/detect_onnx.py``, one thread, the pyramid of 36 renders): ONNX Runtime
runs P-Net 1.7x faster than torch (5.6 vs 9.5 ms per image), while R-Net and O-Net, small batched
dense layers, are faster in torch (1.2 vs 1.7 and 0.7 vs 0.9 ms). So only P-Net moves, and only on a
CPU. The graph is written here node by node from the loaded :class:`PNet`'s parameters with
``onnx.helper`` (no exporter, no file: the session is built from bytes in memory) and gives the
same numbers as torch to float32 rounding (``tests/test_detect_torch.py``).

Needs the ``onnx`` extra (``onnx`` and ``onnxruntime``); :func:`available` says whether it is here.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

# the graph is written from a loaded P-Net (``pipeline.detect.mtcnn_torch.PNet``), which imports
# this module lazily: it is taken as a torch module here, so the two modules do not import each other
PNet = torch.nn.Module

OPSET = 17


def available() -> bool:
    """Both ``onnx`` (to write the graph) and ``onnxruntime`` (to run it) are importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def pnet_graph(pnet: PNet) -> bytes:
    """The serialised ONNX model of ``pnet``: input ``x`` (N, 3, H, W) float32; outputs ``reg``
    (N, 4, H', W') and ``prob`` (N, H', W'), the face probability, as :meth:`PNet.forward`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], []

    def const(name: str, value: torch.Tensor | np.ndarray) -> str:
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        # np.array(copy) keeps a 0-d index 0-d (ascontiguousarray would make it 1-d)
        inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))
        return name

    def conv(x: str, layer: torch.nn.Conv2d, name: str) -> str:
        w, b = const(f"{name}.w", layer.weight), const(f"{name}.b", layer.bias)
        nodes.append(helper.make_node("Conv", [x, w, b], [name], kernel_shape=list(layer.kernel_size)))
        return name

    def prelu(x: str, layer: torch.nn.PReLU, name: str) -> str:
        slope = const(f"{name}.slope", layer.weight.detach().reshape(-1, 1, 1))
        nodes.append(helper.make_node("PRelu", [x, slope], [name]))
        return name

    h = prelu(conv("x", pnet.conv1, "conv1"), pnet.prelu1, "prelu1")
    nodes.append(
        helper.make_node("MaxPool", [h], ["pool1"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    )
    h = prelu(conv("pool1", pnet.conv2, "conv2"), pnet.prelu2, "prelu2")
    h = prelu(conv(h, pnet.conv3, "conv3"), pnet.prelu3, "prelu3")
    conv(h, pnet.conv4_1, "reg")
    logits = conv(h, pnet.conv4_2, "logits")
    nodes.append(helper.make_node("Softmax", [logits], ["softmax"], axis=1))
    nodes.append(
        helper.make_node("Gather", ["softmax", const("face", np.array(1, np.int64))], ["prob"], axis=1)
    )
    graph = helper.make_graph(
        nodes,
        "mtcnn-pnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [
            helper.make_tensor_value_info("reg", TensorProto.FLOAT, ["n", 4, "h2", "w2"]),
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["n", "h2", "w2"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 9)  # what any onnxruntime >= 1.18 reads
    onnx.checker.check_model(model)
    return model.SerializeToString()


class OnnxPNet:
    """Called like a :class:`PNet` on CPU tensors; runs the graph in one ONNX Runtime session."""

    def __init__(self, pnet: PNet, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # the worker's thread budget (pipeline/core/threads.py), not the machine's core count
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(pnet_graph(pnet), opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reg, prob = self.session.run(None, {"x": np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        return torch.from_numpy(reg), torch.from_numpy(prob)
