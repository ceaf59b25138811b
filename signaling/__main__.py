"""``python -m chorus.signaling``: the ``chorus`` command (see :mod:`chorus.signaling.cli`)."""

import sys

from .cli import main

sys.exit(main())
