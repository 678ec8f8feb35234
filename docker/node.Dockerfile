# triage-node: the node image for the DICOM role (listener, completion, routing, export,
# internal DICOMweb for workers) and the web role (worklist, REST API). No TensorFlow:
# those processes never import it (README, "Process model"); workers use
# worker-cpu.Dockerfile or worker-gpu.Dockerfile.
#
#   docker build -f docker/node.Dockerfile -t triage-node:0.1.0 .
#   docker run triage-node:0.1.0 serve --role dicom     (or --role web)
#
# Configuration: the TOML file at TRIAGE_NODE_CONFIG (/etc/triage-node/triage-node.toml,
# the compose deployment's docker/triage-node.toml baked in as the default; mount your
# site's file over it) and TRIAGE_NODE_<SECTION>__<KEY> variables, which win over the
# file: the image sets none, so a site's file decides. Secrets only from *_FILE settings
# pointing at mounted secret files (mode 0600, owned by uid 10001). See docs/deployment.md.

# -- build: a virtual environment with the node and its dependencies ---------------------
FROM python:3.11.9-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node ./node
COPY workers ./workers
COPY models ./models
RUN python -m venv /opt/venv && /opt/venv/bin/pip install .

# -- run -----------------------------------------------------------------------------------
FROM python:3.11.9-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    TRIAGE_NODE_CONFIG=/etc/triage-node/triage-node.toml
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin triage \
    && mkdir -p /data /etc/triage-node && chown triage:triage /data
COPY --from=build /opt/venv /opt/venv
COPY config.example.toml /etc/triage-node/config.example.toml
COPY docker/triage-node.toml docker/rules.toml /etc/triage-node/
# The triage user, numerically: runtimes (Kubernetes runAsNonRoot) can verify it is not root.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# DICOM (plain), DICOM TLS, HTTP (DICOM role: /healthz, /readyz, /metrics; web role: the
# worklist and API), the internal API for workers and the web role (cluster.internal_port).
EXPOSE 11112 2762 8080 8081
# Readiness of the role as the settings say: web.port, HTTPS when web.tls_* is set.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["triage-node", "health"]
ENTRYPOINT ["triage-node"]
CMD ["serve", "--role", "dicom"]
