# triage-node, all-in-one CPU image: DICOM listener, web and (with the pipeline) CPU workers.
# Build from the repository root:  docker build -f docker/node.Dockerfile -t triage-node .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRIAGE_NODE_STORAGE__DATA_DIR=/data \
    TRIAGE_NODE_DICOM__HOST=0.0.0.0 \
    TRIAGE_NODE_WEB__HOST=0.0.0.0

RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin triage \
    && mkdir -p /data /opt/triage-node && chown triage /data

WORKDIR /opt/triage-node
COPY pyproject.toml README.md config.example.toml ./
COPY node ./node
COPY workers ./workers
COPY models ./models
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".[ml]"
ENV PATH=/opt/venv/bin:$PATH

USER triage
VOLUME ["/data"]
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)" || exit 1
ENTRYPOINT ["triage-node"]
CMD ["serve"]
