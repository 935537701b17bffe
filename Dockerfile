# fitserve on an NVIDIA GPU: CUDA runtime base, CUDA build of torch, non-root user, model cache as a volume.
#
#   docker build -t fitserve .                                   # model fetched into the volume at first start
#   docker build -t fitserve --build-arg BAKE_DEFAULT_MODEL=true .   # default model baked into the image
#   docker build -t fitserve-ray --build-arg FITSERVE_EXTRAS=nvml,ray .   # with Ray Serve (KubeRay, deploy/k8s)
#   docker run --gpus all -p 8000:8000 -v fitserve-models:/models fitserve [--model /models/models/<name> ...]
#
# Any `fitserve serve` flag can be appended to `docker run`; FITSERVE_* environment variables work too.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Distribution packages float with the base image's security updates, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/fitserve
ENV PATH=/opt/fitserve/bin:$PATH
# torch first, from the CUDA index, so that installing fitserve never pulls another torch build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY quant ./quant
COPY server ./server
COPY loadtest ./loadtest
COPY src ./src
# The package's extras: nvml (GPU memory readings) always; add ray for the Ray Serve / KubeRay image.
ARG FITSERVE_EXTRAS=nvml
RUN pip install --no-cache-dir "/src[${FITSERVE_EXTRAS}]"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group fitserve \
    && mkdir -p /models \
    && chown fitserve:fitserve /models
COPY --from=build /opt/fitserve /opt/fitserve
ENV PATH=/opt/fitserve/bin:$PATH \
    FITSERVE_HOME=/models \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/fitserve
ARG BAKE_DEFAULT_MODEL=false
RUN if [ "${BAKE_DEFAULT_MODEL}" = "true" ]; then fitserve model fetch; fi
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["fitserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
