"""``python -m spectral_peft``: the ``spectral-peft`` command (its front end is ``spectral_peft_cli``)."""

import sys

from spectral_peft_cli import main

sys.exit(main())
