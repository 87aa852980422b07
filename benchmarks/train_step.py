"""Training-step time of spectral adapters against stock PEFT, measured side by side in one process.

Configurations are interleaved (A, B, C, A, B, C, ...) after warm-up so that machine noise hits all alike; the
median and the spread (min..max) over the repetitions are reported, with ratios to stock LoRA.

    python benchmarks/train_step.py [--methods lora fourierft fastfourierft loca loca-locations s2ft]
                                    [--batch-size 32] [--seq-len 128] [--n-frequency 1000] [--repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import FourierFTConfig, LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from spectral_peft import FastFourierFTConfig, LocaConfig, S2FTConfig, prepare_s2ft  # noqa: E402
from spectral_peft.data import default_model_path  # noqa: E402
from spectral_peft.loca.layer import LocaLinear  # noqa: E402

TARGETS = ["query", "value"]


def build(method: str, base, n: int, rank: int, batch):
    head = {"modules_to_save": ["classifier"]}
    model = copy.deepcopy(base)
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, **head))
    if method == "fourierft":
        return get_peft_model(model, FourierFTConfig(n_frequency=n, target_modules=TARGETS, **head))
    if method == "fastfourierft":
        return get_peft_model(model, FastFourierFTConfig(n_frequency=n, target_modules=TARGETS, **head))
    if method in ("loca", "loca-locations"):
        peft_model = get_peft_model(model, LocaConfig(n_frequency=n, target_modules=TARGETS, **head))
        if method == "loca-locations":
            for layer in peft_model.modules():
                if isinstance(layer, LocaLinear):
                    layer.set_phase("default", train_coefficients=False, train_locations=True)
        return peft_model
    if method == "s2ft":
        return prepare_s2ft(model, S2FTConfig(n_frequency=n, target_modules=TARGETS, prior="gradient", prior_batches=1, **head), [batch])
    raise ValueError(f"unknown method {method!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["lora", "fourierft", "fastfourierft", "loca", "loca-locations", "s2ft"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--n-frequency", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=5)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch_size, args.seq_len)),
        "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
        "labels": torch.randint(0, 5, (args.batch_size,)),
    }
    models, optimizers = {}, {}
    for method in args.methods:
        models[method] = build(method, base, args.n_frequency, args.rank, batch).train()
        optimizers[method] = torch.optim.AdamW([p for p in models[method].parameters() if p.requires_grad], lr=1e-4)

    def step(method: str) -> float:
        start = time.perf_counter()
        models[method](**batch).loss.backward()
        optimizers[method].step()
        optimizers[method].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {m: [] for m in args.methods}
    for rep in range(args.warmup + args.repeats):
        for method in args.methods:
            elapsed = step(method)
            if rep >= args.warmup:
                times[method].append(elapsed)
    reference = statistics.median(times["lora"]) if "lora" in times else None
    rows = []
    print(f"{'method':16s} {'median s':>9s} {'min..max':>15s} {'/ lora':>7s}  trainable")
    for method in args.methods:
        median = statistics.median(times[method])
        trainable = sum(p.numel() for p in models[method].parameters() if p.requires_grad)
        ratio = median / reference if reference else float("nan")
        rows.append({"method": method, "median_s": median, "min_s": min(times[method]), "max_s": max(times[method]),
                     "ratio_to_lora": ratio, "trainable_params": trainable})
        print(f"{method:16s} {median:9.3f} {min(times[method]):7.3f}..{max(times[method]):<7.3f} {ratio:7.2f}  {trainable}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "threads": torch.get_num_threads(), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
