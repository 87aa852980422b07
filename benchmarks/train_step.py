"""Training-step time, adapter overhead, memory and inference of every method against stock PEFT, side by side.

The same as `spectral-peft bench` (see `spectral_peft/tools/bench.py` for what is measured and how):

    python benchmarks/train_step.py --shapes minilm llama linear --output runs/bench
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spectral_peft_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
