"""allcnn_lib: the helper library of the All-CNN / LSUV course notebooks.

Modules follow the data flow: ``data`` -> ``preprocessing`` -> ``models`` / ``initializers`` ->
``training`` -> ``evaluation``, with ``analysis`` and ``plots`` beside them; ``runs`` reads and
writes a run folder (no TensorFlow); ``notebook`` sets up a notebook's first cell and ``cli`` is
the ``allcnn`` command.
"""

import os as _os

# Quiet TensorFlow's C++ start-up chatter before any module imports it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
