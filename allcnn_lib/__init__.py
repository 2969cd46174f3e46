"""allcnn_lib: the helper library of the All-CNN / LSUV course notebooks (see README.md)."""

import os as _os

# Before any module imports TensorFlow. oneDNN: TensorFlow turns its kernels on by itself only
# on AVX-512 CPUs; on AVX2-only ones they train the recipe 1.2-1.4x faster (docs/performance.md).
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
