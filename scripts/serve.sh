#!/usr/bin/env bash
# Production serving: uvicorn with N worker processes and a graceful shutdown
# (on SIGTERM or Ctrl-C, requests in flight get up to the timeout to finish,
# then each worker's lifespan stops its index writer). The Docker image's
# entry point; `make serve` locally. Server settings come from COLBERT_SERVER_*
# variables or a .env file in the working directory.
#
#   UVICORN_HOST=127.0.0.1                  (the image: 0.0.0.0)
#   UVICORN_PORT=8000
#   WEB_CONCURRENCY=1                       worker processes
#   UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN=30    seconds in-flight requests get at shutdown
#   VENV=.venv                              (the image: /opt/venv)
# Further arguments go to uvicorn (e.g. --log-level warning).
set -euo pipefail
# The repository root, in plain bash (no dirname: the image's PATH is minimal);
# "bash serve.sh" run from scripts/ has no slash in $0.
case $0 in */*) cd "${0%/*}/.." ;; *) cd .. ;; esac
exec "${VENV:-.venv}/bin/uvicorn" main:app \
  --host "${UVICORN_HOST:-127.0.0.1}" \
  --port "${UVICORN_PORT:-8000}" \
  --workers "${WEB_CONCURRENCY:-1}" \
  --timeout-graceful-shutdown "${UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN:-30}" \
  "$@"
