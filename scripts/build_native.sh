#!/usr/bin/env bash
# Builds ftjax's oneDNN convolution kernels (ftjax/native/onednn_conv.cc) into
# ftjax/native/_build/libftjax_onednn_conv.so, against Debian's libdnnl-dev and the
# XLA FFI headers of the installed jaxlib. Run by scripts/setup.sh; safe to re-run
# (skipped when the source, the compiler flags and jaxlib are unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-.venv/bin/python}
src=ftjax/native/onednn_conv.cc
out_dir=ftjax/native/_build
out=$out_dir/libftjax_onednn_conv.so

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
stamp="$out_dir/.stamp"
want="$( (cat "$src"; echo "$flags"; "$python" -c "import jaxlib; print(jaxlib.__version__)"; \
          dpkg -s libdnnl-dev | grep '^Version') | sha256sum | cut -d' ' -f1)"
if [ -f "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
mkdir -p "$out_dir"
echo "[build_native] compiling $src"
# Compile next to the target and rename, so a running process never loads half a file.
g++ $flags -isystem "$include" "$src" -o "$out.tmp.$$" -ldnnl
mv -f "$out.tmp.$$" "$out"
echo "$want" > "$stamp"
echo "[build_native] built $out"
