#!/usr/bin/env bash
# Builds ftjax's CPU kernels into ftjax/ops/_build/ of this source checkout, against the
# XLA FFI headers of the installed jaxlib and the oneDNN pinned in
# ftjax/ops/build_kernels.py (PyPI's onednn-cpu-gomp / onednn-devel-cpu-gomp, the same
# pin `pip install .` builds a wheel against):
#   ftjax/ops/onednn_conv.cc   -> libftjax_onednn_conv.so   (convolutions, oneDNN)
#   ftjax/ops/max_pool.cc      -> libftjax_max_pool.so      (max-pool gradient, OpenMP)
#   ftjax/ops/channel_sums.cc  -> libftjax_channel_sums.so  (BatchNorm channel sums, OpenMP)
# Run by scripts/setup.sh; safe to re-run (a library is skipped when its source, the
# compiler flags, jaxlib and oneDNN are unchanged). `python -m ftjax.info` then says
# which kernels are active.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-.venv/bin/python}

if ! command -v g++ >/dev/null 2>&1; then
  echo "[build_native] installing Debian package g++"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++ >/dev/null
fi

missing=$("$python" -m ftjax.ops.build_kernels --missing-requirements)
if [ -n "$missing" ]; then
  echo "[build_native] installing $missing"
  # shellcheck disable=SC2086  # one word per requirement
  "$python" -m pip install -q $missing
fi

"$python" -m ftjax.ops.build_kernels ftjax/ops/_build
