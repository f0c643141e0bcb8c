# syntax=docker/dockerfile:1
# One Dockerfile, four images (targets):
#   docker build -t arcface-service:cpu .                                  the worker, CPU (default target)
#   docker build --build-arg TF_EXTRAS=and-cuda -t arcface-service:gpu .   the worker with TensorFlow's CUDA wheels
#   docker build --target producer -t arcface-service:producer .           arcface-producer only, no TensorFlow
#   docker build --target dashboard -t arcface-service:dashboard .         rq-dashboard, JSON serializer
# Weights: bake them in with --build-arg WEIGHTS_URL=https://.../arcface_weights.h5 [--build-arg WEIGHTS_SHA256=...]
#   (stored in the image's download cache and used while ARCFACE_MODEL_PATH is unset), or mount a file and point
#   ARCFACE_MODEL_PATH at it (that wins). With neither, the worker downloads deepface's weights when it starts.
# Versions: every Python package is pinned by docker/constraints.txt (refresh: python3.11 docker/lock.py).
# The base image is pinned by tag; for byte-identical rebuilds pin its digest:
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN groupadd --system --gid 10001 arcface \
 && useradd --system --uid 10001 --gid arcface --home-dir /home/arcface --create-home arcface

# Dependencies in layers of their own (editing the source does not reinstall TensorFlow), then the project.
FROM base AS producer-deps
COPY docker/constraints.txt docker/requirements.py pyproject.toml /opt/build/
RUN python -m venv /opt/venv \
 && pip install -c /opt/build/constraints.txt pip setuptools wheel \
 && python /opt/build/requirements.py /opt/build/pyproject.toml > /opt/build/requirements.txt \
 && pip install -c /opt/build/constraints.txt -r /opt/build/requirements.txt

FROM base AS worker-deps
# "and-cuda": TensorFlow's CUDA libraries from pip, resolved together with the worker's own TensorFlow
# requirement, so TensorFlow is installed once; the NVIDIA container runtime provides the driver.
ARG TF_EXTRAS=
COPY docker/constraints.txt docker/requirements.py pyproject.toml /opt/build/
RUN python -m venv /opt/venv \
 && pip install -c /opt/build/constraints.txt pip setuptools wheel \
 && python /opt/build/requirements.py /opt/build/pyproject.toml worker > /opt/build/requirements.txt \
 && pip install -c /opt/build/constraints.txt -r /opt/build/requirements.txt ${TF_EXTRAS:+"tensorflow[$TF_EXTRAS]"}

# The producer CLI (compose's "tools" profile): docker run --rm arcface-service:producer verify a.jpg b.jpg --wait
FROM producer-deps AS producer
COPY pyproject.toml README.md /opt/build/src/
COPY producer /opt/build/src/producer
COPY worker /opt/build/src/worker
RUN pip install --no-deps --no-build-isolation /opt/build/src && rm -rf /opt/build
USER arcface
WORKDIR /home/arcface
ENTRYPOINT ["arcface-producer"]
CMD ["--help"]

# rq-dashboard with rq's JSON serializer (-j; jobs are JSON, never pickle). It has no authentication unless
# RQ_DASHBOARD_USERNAME and RQ_DASHBOARD_PASSWORD are set; compose publishes it on the host's loopback only.
FROM base AS dashboard
COPY docker/constraints.txt /opt/build/
RUN python -m venv /opt/venv \
 && pip install -c /opt/build/constraints.txt pip \
 && pip install -c /opt/build/constraints.txt rq-dashboard six \
 && rm -rf /opt/build
ENV RQ_DASHBOARD_BIND=0.0.0.0 \
    RQ_DASHBOARD_PORT=9181
USER arcface
EXPOSE 9181
ENTRYPOINT ["rq-dashboard", "--json"]

# Baked weights go where the worker's download would put them: <cache dir>/<file name of ARCFACE_MODEL_URL>
# (deepface's arcface_weights.h5). A stage of its own, below the source: editing the code keeps this layer.
FROM base AS weights
ARG WEIGHTS_URL=
ARG WEIGHTS_SHA256=
COPY docker/fetch_weights.py /opt/build/
RUN mkdir -p /opt/arcface/cache && if [ -n "$WEIGHTS_URL" ]; then \
      python /opt/build/fetch_weights.py "$WEIGHTS_URL" "$WEIGHTS_SHA256" /opt/arcface/cache/arcface_weights.h5; \
    fi

FROM worker-deps AS worker
COPY --from=weights --chown=arcface:arcface /opt/arcface /opt/arcface
COPY pyproject.toml README.md /opt/build/src/
COPY producer /opt/build/src/producer
COPY worker /opt/build/src/worker
RUN pip install --no-deps --no-build-isolation /opt/build/src && rm -rf /opt/build
ENV ARCFACE_LOG_FORMAT=json \
    ARCFACE_CACHE_DIR=/opt/arcface/cache \
    ARCFACE_METRICS_PORT=9100
USER arcface
WORKDIR /home/arcface
EXPOSE 9100
# Fails when this container's worker has not sent an rq heartbeat recently (it is not consuming).
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 CMD ["arcface-worker-health"]
ENTRYPOINT ["arcface-worker"]
