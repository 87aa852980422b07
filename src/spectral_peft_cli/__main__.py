"""``python -m spectral_peft_cli``: the ``spectral-peft`` command."""

import sys

from .commands import main

sys.exit(main())
