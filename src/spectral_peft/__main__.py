"""``python -m spectral_peft``: the ``spectral-peft`` command."""

import sys

from .tools.cli import main

sys.exit(main())
