"""spectral-peft: fine-tune with LoCA, S2FT, FourierFT, LoRA or full fine-tuning; evaluate; compare.

    spectral-peft finetune --method loca --n-frequency 300 --output runs/loca      # MiniLM + BBC News, offline
    spectral-peft finetune --method loca --task tweets.csv --text-column tweet --label-column sentiment \\
        --encoding latin-1 --output runs/tweets
    spectral-peft finetune --method lora --model google/vit-base-patch16-224-in21k --task photos/ --output runs/vit
    spectral-peft evaluate --adapter runs/loca
    spectral-peft compare --methods loca,s2ft,lora,fourierft --budgets 100,300,1000 --ranks 1,4,8 \\
        --seeds 0,1,2 --output runs/grid
    spectral-peft bench --shapes minilm llama linear --output runs/bench
    spectral-peft analyze --tuned runs/full --output runs/full-analysis          # the spectrum of a weight change

This package is the command's front end: its parsers, and the checks of the input that need no library (options,
files, columns, encodings, image folders), so that help and bad input are answered at once. It imports nothing
heavy; a command that runs imports its module in ``spectral_peft.tools`` (torch, transformers, PEFT) then. Bad input
gives ``spectral-peft: error: ...`` on stderr (every problem found, one per line) and exit code 2.
"""

from .commands import PROG, build_parser, main

__all__ = ["PROG", "build_parser", "main"]
