"""``python -m allcnn_lib``: the ``allcnn`` command (see ``allcnn_lib.cli``)."""

from allcnn_lib.cli import main

raise SystemExit(main())
