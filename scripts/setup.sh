#!/usr/bin/env bash
# Installs everything ftjax needs into ./.venv on a fresh Debian machine with access to
# the package registries only: the Fashion-MNIST Debian package, the Python packages
# (pinned by constraints.txt), the oneDNN convolution kernels (built against Debian's
# libdnnl-dev), and the offline TFDS copy of fashion_mnist.
# Safe to re-run: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi

stamp=".venv/.ftjax-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing Python packages (a few minutes on a fresh machine)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[torch,test]"
  echo "$want" > "$stamp"
fi

# CPU kernels (ftjax/ops/*.cc: oneDNN convolutions, max pooling, BatchNorm channel sums)
# into ftjax/ops/_build/: Debian libdnnl-dev + g++.
bash scripts/build_native.sh

# Builds TFDS's fashion_mnist from the Debian files once (no network).
.venv/bin/python -m ftjax.data.prepare fashion_mnist
echo "[setup] done"
