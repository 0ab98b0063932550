"""``python -m s2d2`` (and ``torchrun ... -m s2d2``): the ``s2d2`` command."""

import sys

from s2d2.cli import main

sys.exit(main())
