"""allcnn_lib: the helper library of the All-CNN / LSUV course notebooks (see README.md)."""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before any module imports TensorFlow

__version__ = "0.1.0"
