# waypoint as a container entrypoint on a CUDA PyTorch base image.
#
# Mirrors scripts/setup.sh: libtorch is the one inside the image's torch==2.13.0 (tch 0.26 needs that
# version), found at build time through LIBTORCH_USE_PYTORCH=1 and at run time through the rpath that
# build.rs writes, with torch_cuda linked so the binary sees the GPU. Nothing downloads libtorch.
#
#   docker build -t waypoint .
#   docker run --gpus all waypoint train --checkpoint_base_uri s3://bucket/runs --run_id r1 ...
#
# Both stages must use the same image family so torch's lib/ sits at the same path (the rpath).
ARG PYTORCH_DEVEL=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
ARG PYTORCH_RUNTIME=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

FROM ${PYTORCH_DEVEL} AS build
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH LIBTORCH_USE_PYTORCH=1
RUN python -c 'import torch, sys; v = torch.__version__.split("+")[0]; sys.exit(0 if v == "2.13.0" else f"torch {v}: tch 0.26 needs 2.13.0")'
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin waypoint \
    && ldd target/release/waypoint | grep -q libtorch_cuda

FROM ${PYTORCH_RUNTIME}
COPY --from=build /src/target/release/waypoint /usr/local/bin/waypoint
# Runs as a torchrun worker too: torchrun --nproc_per_node N --no-python waypoint train ...
ENTRYPOINT ["/usr/local/bin/waypoint"]
CMD ["train"]
