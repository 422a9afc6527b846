#!/usr/bin/env bash
# Builds ftjax's CPU kernels into ftjax/ops/_build/ against the XLA FFI headers of
# the installed jaxlib:
#   ftjax/ops/onednn_conv.cc   -> libftjax_onednn_conv.so   (convolutions, Debian's libdnnl-dev)
#   ftjax/ops/max_pool.cc      -> libftjax_max_pool.so      (max-pool gradient, OpenMP)
#   ftjax/ops/channel_sums.cc  -> libftjax_channel_sums.so  (BatchNorm channel sums, OpenMP)
# Run by scripts/setup.sh; safe to re-run (a library is skipped when its source, the
# compiler flags, jaxlib and libdnnl are unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-.venv/bin/python}
out_dir=ftjax/ops/_build

missing=()
dpkg -s libdnnl-dev >/dev/null 2>&1 || missing+=(libdnnl-dev)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[build_native] installing Debian packages: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

include=$("$python" -c "import jax; print(jax.ffi.include_dir())")
flags="-O2 -std=c++17 -fPIC -shared -Wno-attributes"
versions="$("$python" -c "import jaxlib; print(jaxlib.__version__)"; dpkg -s libdnnl-dev | grep '^Version')"
mkdir -p "$out_dir"

build() {  # build NAME LIBS...: ftjax/ops/NAME.cc -> $out_dir/libftjax_NAME.so
  local name=$1; shift
  local src=ftjax/ops/$name.cc out=$out_dir/libftjax_$name.so stamp=$out_dir/.stamp_$name
  local want
  want="$( (cat "$src"; echo "$flags $*"; echo "$versions") | sha256sum | cut -d' ' -f1)"
  if [ -f "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  echo "[build_native] compiling $src"
  # Compile next to the target and rename, so a running process never loads half a file.
  g++ $flags -isystem "$include" "$src" -o "$out.tmp.$$" "$@"
  mv -f "$out.tmp.$$" "$out"
  echo "$want" > "$stamp"
  echo "[build_native] built $out"
}

build onednn_conv -ldnnl
build max_pool -fopenmp
build channel_sums -fopenmp
