#!/usr/bin/env bash
# Create benchmarks/.venv-maximask: the peer tool MaxiMask in the benchmark's own
# environment (it is never a dependency of robopol-clean).
#
#   bash benchmarks/setup_maximask.sh          # about 20 s; needs PyPI
#
# The venv sees the system site-packages (tensorflow-cpu, numpy, astropy, tqdm are
# already installed there), so only MaxiMask itself is added, with --no-deps: its
# declared `tensorflow` requirement would pull in a second TensorFlow build.
# MaxiMask's command line loads its weights with tf.saved_model.load (no Keras), so
# it runs on TensorFlow 2.21 / Keras 3 as it is; tf_keras / TF_USE_LEGACY_KERAS are
# not needed (only keras.models.load_model on its SavedModel would fail under Keras 3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-maximask"
py="${PYTHON:-python3}"
"$py" -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet --no-deps "maximask==1.4.1"
"$venv/bin/python" -c 'import maximask_and_maxitrack.maximask.maximask as m; import tensorflow as tf; print("MaxiMask importable; TensorFlow", tf.__version__)' 2>/dev/null
echo "MaxiMask installed: $venv/bin/maximask"
