# syntax=docker/dockerfile:1
# CPU image by default; GPU image: docker build --build-arg TF_EXTRAS=and-cuda -t arcface-service:gpu .
# Weights: mount them (ARCFACE_MODEL_PATH=/models/arcface_weights.h5) or bake them in with
#   --build-arg WEIGHTS_URL=https://.../arcface_weights.h5 [--build-arg WEIGHTS_SHA256=...]
FROM python:3.11-slim AS build
# "and-cuda" pulls TensorFlow's CUDA libraries from pip; the NVIDIA container runtime provides the driver.
ARG TF_EXTRAS=
WORKDIR /src
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir ".[worker]" \
 && if [ -n "$TF_EXTRAS" ]; then /opt/venv/bin/pip install --no-cache-dir "tensorflow[$TF_EXTRAS]>=2.16,<2.22"; fi

FROM build AS weights
ARG WEIGHTS_URL=
ARG WEIGHTS_SHA256=
RUN mkdir -p /models && if [ -n "$WEIGHTS_URL" ]; then \
      /opt/venv/bin/python -c "import sys; from pathlib import Path; from worker.weights import download; download(sys.argv[1], Path('/models/arcface_weights.h5'), sys.argv[2] or None)" "$WEIGHTS_URL" "$WEIGHTS_SHA256"; \
    fi

FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 arcface && useradd --system --uid 10001 --gid arcface --home-dir /home/arcface --create-home arcface
COPY --from=build /opt/venv /opt/venv
COPY --from=weights --chown=arcface:arcface /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ARCFACE_LOG_FORMAT=json \
    ARCFACE_CACHE_DIR=/home/arcface/.cache/arcface-service \
    TF_CPP_MIN_LOG_LEVEL=2
USER arcface
WORKDIR /home/arcface
# Fails when this container's worker has not sent an rq heartbeat recently (it is not consuming).
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 CMD ["arcface-worker-health"]
ENTRYPOINT ["arcface-worker"]
