"""``python -m pyro_meta`` is the ``pyro-meta`` command (what torchrun's ``-m pyro_meta`` starts on each rank)."""

import sys

from .cli import main

sys.exit(main())
