"""``python -m knnclip.engine.cli``: the same as the ``knnclip`` command."""

import sys

from knnclip.engine.cli import main

sys.exit(main())
