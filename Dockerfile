# CPU image of the ColBERT search server.
#   docker build -t colbert-server .
#   docker run -p 8000:8000 -v colbert-data:/data colbert-server
# The builder stage installs through scripts/setup.sh (the install path the
# README and CI use), prepares the default models and compiles colbert-ai's
# C++ search kernels; the final stage gets the results and no compiler.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
# g++ for colbert-ai's kernels (torch JIT extensions); this stage only.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
# PyPI's plain torch wheel is a CUDA build: take the CPU one (or a mirror).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Paths are the same in both stages: the venv's interpreter links and the
# editable install point at them.
ENV VENV=/opt/venv \
    EXTRAS= \
    TORCH_INDEX_URL=${TORCH_INDEX_URL} \
    PATH=/opt/venv/bin:${PATH} \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions \
    GIT_PYTHON_REFRESH=quiet \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY . .
RUN ./scripts/setup.sh && rm -rf /root/.cache/pip && chmod -R a+rX /app
# Readable by the final stage's user (some steps write through private temp dirs).
RUN python -m models.prepare --models-dir /opt/models \
 && chmod -R a+rX /opt/models
RUN python -c "from colbert_patches.scorer import load_extensions; load_extensions()" \
 && ls /opt/torch_extensions/*/*.so \
 && chmod -R a+rX /opt/torch_extensions

FROM ${PYTHON_IMAGE}
ENV VENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GIT_PYTHON_REFRESH=quiet \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions \
    COLBERT_SERVER_MODELS_DIR=/opt/models \
    COLBERT_SERVER_DATA_DIR=/data \
    UVICORN_HOST=0.0.0.0 \
    UVICORN_PORT=8000 \
    WEB_CONCURRENCY=1 \
    UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN=30
RUN useradd --user-group --uid 10001 --create-home --home-dir /home/colbert colbert \
 && mkdir /data \
 && chown colbert:colbert /data
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/models /opt/models
COPY --from=builder /opt/torch_extensions /opt/torch_extensions
COPY --from=builder /app /app
WORKDIR /app
USER colbert
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['UVICORN_PORT'], timeout=4)"
# uvicorn is PID 1 (serve.sh execs it): SIGTERM from `docker stop` lets
# requests in flight finish (UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN) and the index
# writer stop; give `docker stop -t` more than that timeout.
CMD ["/app/scripts/serve.sh"]
