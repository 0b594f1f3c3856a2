#!/usr/bin/env bash
# Set up selfsight in ./.venv on a fresh machine: the package, the default data set
# (Debian's dataset-fashion-mnist when apt is usable; otherwise torchvision downloads it on
# first use), and with --test the test dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="tensorboard"
[ "${1:-}" = "--test" ] && extras="test"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[${extras}]"
if [ "$extras" = "test" ]; then
  # Real images for the tests: foolbox's wheel ships 20 CIFAR-10/100 PNGs and 20 ImageNet JPEGs
  # (only its data files are used, so its dependencies are not installed); scikit-image's photos;
  # scikit-learn: the independent logistic-regression reference of the linear-probe test.
  .venv/bin/python -m pip install -q --no-deps "foolbox==3.3.4"
  .venv/bin/python -m pip install -q "scikit-image>=0.21" "hypothesis>=6" "scikit-learn>=1.3"
  # ONNX export (torch.onnx's exporter needs onnx + onnxscript) checked against onnxruntime
  .venv/bin/python -m pip install -q "onnx>=1.16" "onnxscript>=0.3" "onnxruntime>=1.18"
  # Debian's chromium: the HTML report is rendered in a real headless browser (tests/viz/test_report_browser.py)
  if ! command -v chromium >/dev/null; then
    CSUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && CSUDO="sudo -n"
    if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$CSUDO" ]; }; then
      ($CSUDO apt-get update -qq && $CSUDO apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "note: could not install chromium with apt; the browser test of the HTML report will be skipped"
    else
      echo "note: no apt-get/root: chromium not installed; the browser test of the HTML report will be skipped"
    fi
  fi
fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "note: could not install dataset-fashion-mnist with apt; selfsight will download Fashion-MNIST through torchvision"
  else
    echo "note: no apt-get/root: selfsight will download Fashion-MNIST through torchvision on first use"
  fi
fi
echo "selfsight installed in .venv ($(.venv/bin/selfsight --version))"
