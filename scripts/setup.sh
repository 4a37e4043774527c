#!/usr/bin/env bash
# Creates .venv and installs keras_gemma2 with all three backends and the
# test tools. Safe to run again; takes about 3 minutes on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
# The CPU build of PyTorch first: a plain `torch` requirement would pull a
# multi-GB CUDA build.
pip install --quiet torch==2.13.0
pip install --quiet -e ".[torch,test,rag]"
