# triage-node worker on an NVIDIA GPU. The base image brings TensorFlow built for CUDA
# with its CUDA/cuDNN libraries; the host needs the NVIDIA driver and the NVIDIA
# Container Toolkit (docker run --gpus all, or the compose "gpu" profile).
#
#   docker build -f docker/worker-gpu.Dockerfile -t triage-node-worker:0.1.0-gpu .
#   docker run --gpus all triage-node-worker:0.1.0-gpu worker --concurrency 1
#
# The "ml" extra is not installed here: it would add tensorflow-cpu beside the base
# image's GPU build. The node and Keras 3 go into the base's Python next to its
# TensorFlow (pip keeps the installed numpy where it satisfies our range); the build
# fails if TensorFlow or Keras cannot be imported afterwards.
# One worker process per GPU, concurrency 1: the model fills the GPU, not the CPU.

FROM tensorflow/tensorflow:2.18.0-gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TF_FORCE_GPU_ALLOW_GROWTH=true \
    TRIAGE_NODE_CONFIG=/etc/triage-node/triage-node.toml
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin triage \
    && mkdir -p /data /etc/triage-node && chown triage:triage /data
WORKDIR /opt/triage-node
COPY pyproject.toml README.md ./
COPY node ./node
COPY workers ./workers
COPY models ./models
RUN python3 -m pip install . "keras>=3.3" \
    && python3 -I -c "import tensorflow, keras, node, workers, models; print('tensorflow', tensorflow.__version__, 'keras', keras.__version__)" \
    && rm -rf /opt/triage-node
COPY config.example.toml /etc/triage-node/config.example.toml
# The default configuration (worker.storage = "dicomweb", the health port); mount your
# site's file over it. The image sets no TRIAGE_NODE_<SECTION>__<KEY>: the file decides.
COPY docker/triage-node.toml docker/rules.toml /etc/triage-node/
# The triage user, numerically: runtimes (Kubernetes runAsNonRoot) can verify it is not root.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 9100
# Readiness of the worker (consuming, broker, database, models) on worker.http_port.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["triage-node", "health", "--worker"]
ENTRYPOINT ["triage-node"]
CMD ["worker", "--queues", "stat,urgent,routine", "--concurrency", "1"]
