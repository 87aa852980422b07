"""Peak resident memory of `spectral-peft finetune` on a 135M-parameter Llama-architecture causal LM.

The model has SmolLM-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocabulary 49152,
tied embeddings; 134.5M parameters, 540 MB in float32) with random weights, built once into --work with the offline
MiniLM tokenizer (its ids all fall inside the vocabulary); the task is a text file of BBC News articles. Each method
runs `spectral-peft finetune` in a fresh process (batch 2 x 128 tokens, the default evaluation batch of 32) and the
process's peak RSS is read from the kernel (ru_maxrss of the finished child):

    python benchmarks/lm_memory.py --methods loca lora [--steps 4] [--work /tmp/lm-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time


def build_model(folder: pathlib.Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spectral_peft.tools.data import default_model_path

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=2048, pad_token_id=0)
    model = LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters", file=sys.stderr)
    model.save_pretrained(folder)
    tokenizer = pathlib.Path(default_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(tokenizer / name, folder / name)


def build_text(path: pathlib.Path, articles: int) -> None:
    from spectral_peft.tools.data import bbc_news_dir

    files = sorted(bbc_news_dir().glob("*/*.txt"))[::10][:articles]
    path.write_text("\n\n".join(f.read_bytes().decode("utf-8", "replace") for f in files))


def peak_of(argv: list[str]) -> tuple[float, float, int]:
    """Runs ``argv``; returns its own peak RSS in MiB (wait4's usage of that child alone), wall time, exit code."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, time.perf_counter() - start, child.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["loca", "lora"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--articles", type=int, default=60, help="BBC News articles in the text file")
    parser.add_argument("--work", default="/tmp/lm-memory")
    parser.add_argument("--extra", default="", help="more finetune options, one string")
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    model, text = work / "llama-135m", work / "articles.txt"
    if not (model / "config.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        build_model(model)
    if not text.is_file():
        build_text(text, args.articles)
    results = []
    for method in args.methods:
        output = work / f"run-{method}"
        argv = [sys.executable, "-m", "spectral_peft", "finetune", "--method", method, "--model", str(model),
                "--task", str(text), "--batch-size", "2", "--max-length", "128", "--steps", str(args.steps),
                "--eval-every", "0", "--save-every", "0", "--output", str(output), "--overwrite",
                *args.extra.split()]
        peak, wall, code = peak_of(argv)
        results.append({"method": method, "peak_rss_mib": round(peak), "wall_s": round(wall, 1), "exit": code,
                        "command": " ".join(argv[1:])})
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
