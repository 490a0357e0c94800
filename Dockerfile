# Multi-stage build of every binary of the pipeline on Debian's OpenCV 4.6.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libopencv-dev clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --workspace \
 && cp target/release/pipeline target/release/extract target/release/detect \
       target/release/crop target/release/persist /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libopencv-core406 libopencv-imgproc406 libopencv-imgcodecs406 libopencv-objdetect406 \
      libopencv-dnn406 opencv-data ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
# OpenCV 4.6 loads only the 2022mar YuNet file; without it detect falls back to Haar (and says so).
RUN mkdir -p /models \
 && (curl -fsSL --max-time 60 -o /models/face_detection_yunet_2022mar.onnx \
      https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/face_detection_yunet_2022mar.onnx \
     || echo "YuNet model not fetched: detect will fall back to the Haar cascade")
COPY --from=build /usr/local/bin/ /usr/local/bin/
COPY topology.toml /etc/facepipe/topology.toml
ENV PIPELINE_TOPOLOGY=/etc/facepipe/topology.toml
WORKDIR /var/lib/facepipe
CMD ["pipeline", "--help"]
