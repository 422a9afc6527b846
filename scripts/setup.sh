#!/usr/bin/env bash
# Installs everything ftjax needs into ./.venv on a fresh Debian machine with access to
# the package registries only: the Fashion-MNIST Debian package, the Python packages
# (pinned by constraints.txt; ftjax itself editable, which compiles the CPU kernels
# against the pip-installed oneDNN pinned in ftjax/ops/build_kernels.py), and the
# offline TFDS copy of fashion_mnist.
# Safe to re-run: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# g++ compiles the CPU kernels during the editable install below.
missing=()
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || missing+=(dataset-fashion-mnist)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi

stamp=".venv/.ftjax-installed"
want="$(cat pyproject.toml constraints.txt setup.py | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing Python packages (a few minutes on a fresh machine)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[torch,test]"
  echo "$want" > "$stamp"
fi

# CPU kernels (ftjax/ops/*.cc: oneDNN convolutions, max pooling, BatchNorm channel sums)
# into ftjax/ops/_build/ with g++ and PyPI's pinned oneDNN: rebuilt here when a source
# changed since the install above (each library is skipped when unchanged).
bash scripts/build_native.sh
.venv/bin/python -m ftjax.info

# Builds TFDS's fashion_mnist from the Debian files once (no network).
.venv/bin/python -m ftjax.data.prepare fashion_mnist
echo "[setup] done"
