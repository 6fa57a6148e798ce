#!/usr/bin/env bash
# Creates/updates the local virtualenv (.venv) with omni_jax[test] and the system packages the
# tests and demo use (espeak-ng for speech fixtures, libsndfile for soundfile). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0+cpu}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
ldconfig -p 2>/dev/null | grep -q libsndfile || need_apt+=(libsndfile1)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}") \
      || echo "warning: could not install ${need_apt[*]}; tests that need them will be skipped" >&2
  elif command -v sudo >/dev/null 2>&1; then
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}") \
      || echo "warning: could not install ${need_apt[*]}" >&2
  else
    echo "warning: missing system packages ${need_apt[*]} (no root)" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.omni_jax_installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch (the tests' parity reference) first and as the CPU build, not a multi-GB CUDA one:
  # the +cpu local version from PyTorch's CPU index, named here so no pip config is assumed.
  # TORCH_INDEX= (empty) uses only your pip configuration (a mirror that carries +cpu wheels).
  if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.__version__ != '$TORCH_VERSION')" \
      2>/dev/null; then
    "$VENV/bin/python" -m pip install -q ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
      "torch==$TORCH_VERSION"
  fi
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  touch "$stamp"
fi
