# triage-node worker on the CPU: Celery worker running the Keras models (tensorflow-cpu,
# the "ml" extra). Needs no shared disk: with worker.storage = "dicomweb" it fetches
# instances from the node by WADO-RS and uploads its results (docs/deployment.md).
#
#   docker build -f docker/worker-cpu.Dockerfile -t triage-node-worker:0.1.0-cpu .
#   docker run triage-node-worker:0.1.0-cpu worker --concurrency 1
#
# This image also runs everything else ("serve" with pipeline.workers > 0: all in one).

FROM python:3.11.9-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node ./node
COPY workers ./workers
COPY models ./models
RUN python -m venv /opt/venv && /opt/venv/bin/pip install ".[ml]"

FROM python:3.11.9-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    CUDA_VISIBLE_DEVICES="" \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TRIAGE_NODE_CONFIG=/etc/triage-node/triage-node.toml
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin triage \
    && mkdir -p /data /etc/triage-node && chown triage:triage /data
COPY --from=build /opt/venv /opt/venv
COPY config.example.toml /etc/triage-node/config.example.toml
# The default configuration (worker.storage = "dicomweb", the health port); mount your
# site's file over it. The image sets no TRIAGE_NODE_<SECTION>__<KEY>: the file decides.
COPY docker/triage-node.toml docker/rules.toml /etc/triage-node/
# The triage user, numerically: runtimes (Kubernetes runAsNonRoot) can verify it is not root.
USER 10001:10001
WORKDIR /data
# The worker's cache of fetched instances (bounded by worker.cache_max_bytes).
VOLUME ["/data"]
# /healthz, /readyz, /metrics of the worker.
EXPOSE 9100
# Readiness of the worker (consuming, broker, database, models) on worker.http_port.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["triage-node", "health", "--worker"]
ENTRYPOINT ["triage-node"]
CMD ["worker", "--queues", "stat,urgent,routine", "--concurrency", "1"]
